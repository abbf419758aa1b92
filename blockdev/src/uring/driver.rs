//! The driver thread: owns the ring, batches submissions, completes requests.
//! See the [module docs](super) for the protocol.

use super::sys;
use crate::{AlignedBuf, OwnedRangeGuard};
use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{oneshot, Notify};

/// The largest single read or write handed to the kernel; longer ones are issued in
/// pieces (the kernel would cut them at 2 GiB anyway, and `len` is a u32).
const MAX_RW: usize = 1 << 30;

/// A buffered read at least this large is copied out of the page cache by one of
/// io_uring's worker threads rather than inline in this thread's `io_uring_enter`: the
/// copies of several large reads then run side by side instead of one after another on
/// this thread, which was the bottleneck of 1 MiB NBD reads.
const COPY_IN_WORKERS_MIN: usize = 256 << 10;

/// `user_data` of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

/// An operation on the device's file.
pub(super) enum Op {
    /// Read into the buffer, which comes back in the completion.
    Read { buf: AlignedBuf, offset: u64 },
    /// Write the buffer.
    Write {
        buf: WriteBuf,
        offset: u64,
        rw_flags: i32,
    },
    /// fdatasync.
    Fsync,
    /// fallocate(mode).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// The data of a write: the caller's bytes, or an aligned copy of them.
pub(super) enum WriteBuf {
    Shared(Bytes),
    Bounce(AlignedBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Shared(b) => b,
            WriteBuf::Bounce(b) => b.as_slice(),
        }
    }
}

/// What the caller gets back.
pub(super) struct Completion {
    pub(super) result: io::Result<()>,
    pub(super) op: Op,
}

type Finished = (oneshot::Sender<Completion>, Completion);

struct Request {
    op: Op,
    /// Bytes of a read or write done so far.
    done: usize,
    /// Released when the kernel is done, not when the caller's future is dropped.
    guard: Option<OwnedRangeGuard>,
    tx: oneshot::Sender<Completion>,
}

struct Queue {
    requests: Vec<Request>,
    /// The owner is gone: finish what is in flight and exit.
    closing: bool,
    /// The thread has exited; nothing will be served.
    dead: bool,
}

/// Counters of the driver's work, for benchmarks and tuning: requests per system call is
/// the batching factor, wakeups per request the cost of waking the thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// Requests completed (each piece of a split or resubmitted request counts once).
    pub requests: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Times the thread went to sleep waiting for work or completions.
    pub sleeps: u64,
    /// Eventfd writes by submitters (system calls made on the tokio side).
    pub wakeups: u64,
    /// Batches of completions handed to the relay task.
    pub relayed_batches: u64,
    /// Buffered reads served from the page cache on the caller's thread (not counted in
    /// `requests`).
    pub inline_reads: u64,
    /// Buffered writes made on the caller's thread (not counted in `requests`).
    pub inline_writes: u64,
    /// Times a slow inline write paused inline writes.
    pub inline_write_pauses: u64,
    /// Page-cache ranges handed out for zero-copy sending (`BlockDev::cached_range`).
    pub cached_ranges: u64,
}

/// Published by the thread once per loop, on a cache line of their own, so that
/// counting does not make the submitters' cache lines bounce between CPUs.
#[derive(Default)]
#[repr(align(128))]
struct Counters {
    requests: AtomicU64,
    enters: AtomicU64,
    sleeps: AtomicU64,
    relayed_batches: AtomicU64,
    wakeups: AtomicU64,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Raised by the thread before it sleeps; cleared by whoever wakes it.
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    counters: Counters,
    /// Mirrors `Queue::dead` for readers that take no lock (the inline I/O of buffered
    /// files checks it, so that a device whose driver is gone takes no more writes).
    stopped: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Carries completions from the driver thread into the tokio runtime.
///
/// Completing a oneshot from a foreign thread schedules the waiting task through the
/// runtime's shared inject queue, under a lock the workers also take; 32 completions in
/// a row meant 32 contended lock round trips between CPUs. Instead the thread hands the
/// whole batch to one relay task (a single cross-thread wake), and the relay, running on
/// a worker, completes the oneshots: those wakes go to the worker's local run queue.
struct Relay {
    batch: Mutex<Vec<Finished>>,
    notify: Notify,
    /// The relay task is running; when false the thread completes oneshots itself.
    alive: AtomicBool,
    /// The driver thread has exited: the relay task ends.
    closed: AtomicBool,
}

impl Relay {
    fn batch(&self) -> MutexGuard<'_, Vec<Finished>> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes everything waiting in the relay from the calling thread.
    fn drain_here(&self) {
        let batch = std::mem::take(&mut *self.batch());
        for (tx, c) in batch {
            let _ = tx.send(c);
        }
    }

    /// The relay task: runs on the runtime that opened the device until the driver
    /// thread exits or the runtime shuts down.
    async fn run(self: Arc<Self>) {
        /// Marks the relay dead however the task ends (including the runtime dropping
        /// it), and completes what it would have.
        struct Alive(Arc<Relay>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.alive.store(false, Ordering::SeqCst);
                self.0.drain_here();
            }
        }
        let alive = Alive(self);
        let relay = &alive.0;
        let mut spare = Vec::new();
        loop {
            relay.notify.notified().await;
            std::mem::swap(&mut *relay.batch(), &mut spare);
            for (tx, c) in spare.drain(..) {
                let _ = tx.send(c);
            }
            if relay.closed.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// The driver is gone (it failed); the device is unusable.
#[derive(Debug)]
pub(super) struct DriverGone;

/// Handle to a driver thread. Dropping it lets the thread finish what is in flight and
/// exit.
pub(super) struct Driver {
    shared: Arc<Shared>,
}

impl Driver {
    /// Starts a driver thread for `file` with at most `queue_depth` requests in flight
    /// and at most `max_batch` submitted per system call. Called inside a multi-threaded
    /// tokio runtime, it also starts the relay task there.
    pub(super) fn start(
        file: Arc<File>,
        queue_depth: u32,
        max_batch: usize,
        copy_in_workers: bool,
        name: String,
    ) -> io::Result<Driver> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                requests: Vec::new(),
                closing: false,
                dead: false,
            }),
            sleeping: AtomicBool::new(false),
            eventfd: sys::eventfd()?,
            counters: Counters::default(),
            stopped: AtomicBool::new(false),
        });
        let relay = Arc::new(Relay {
            batch: Mutex::new(Vec::new()),
            notify: Notify::new(),
            alive: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        // Only on a multi-threaded runtime: its workers always run, whereas a
        // current-thread runtime makes progress only while someone drives it, and the
        // device may be used from elsewhere meanwhile.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                relay.alive.store(true, Ordering::SeqCst);
                rt.spawn(relay.clone().run());
            }
        }
        // The ring is built on the thread that will use it (IORING_SETUP_SINGLE_ISSUER).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let limits = (queue_depth, max_batch, copy_in_workers);
            let worker = Worker::new(file, limits, thread_shared, relay);
            match worker {
                Ok(w) => {
                    let _ = ready_tx.send(Ok(()));
                    w.run();
                }
                Err((e, relay)) => {
                    relay.closed.store(true, Ordering::Release);
                    relay.notify.notify_one();
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        spawned?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("io_uring driver thread died during setup"))??;
        Ok(Driver { shared })
    }

    /// Queues `op`, a read or write of which the first `done` bytes are already done
    /// (`done` is less than its length; 0 for anything else); the receiver resolves when
    /// the kernel has completed the rest. `guard` is held until then.
    pub(super) fn submit_rest(
        &self,
        op: Op,
        done: usize,
        guard: Option<OwnedRangeGuard>,
    ) -> Result<oneshot::Receiver<Completion>, DriverGone> {
        let len = match &op {
            Op::Read { buf, .. } => buf.len(),
            Op::Write { buf, .. } => buf.as_slice().len(),
            Op::Fsync | Op::Fallocate { .. } => 0,
        };
        debug_assert!(
            done == 0 || done < len,
            "submit_rest: {done} of {len} bytes done"
        );
        // A request with nothing left would make the driver point past its buffer.
        let done = if done < len { done } else { 0 };
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.shared.queue();
            if q.dead {
                return Err(DriverGone);
            }
            q.requests.push(Request {
                op,
                done,
                guard,
                tx,
            });
        }
        // Ordered after the push by the queue mutex: if the thread raised the flag
        // before its last look at the queue, we see the flag; otherwise it sees the
        // request. Only the submitter that clears the flag pays the system call.
        if self.shared.sleeping.load(Ordering::Relaxed)
            && self.shared.sleeping.swap(false, Ordering::AcqRel)
        {
            self.shared.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            sys::eventfd_signal(self.shared.eventfd.as_raw_fd());
        }
        Ok(rx)
    }

    /// Submits `op` and waits for it.
    pub(super) async fn run(
        &self,
        op: Op,
        guard: Option<OwnedRangeGuard>,
    ) -> Result<Completion, DriverGone> {
        self.run_rest(op, 0, guard).await
    }

    /// [`Driver::submit_rest`], and waits for it.
    pub(super) async fn run_rest(
        &self,
        op: Op,
        done: usize,
        guard: Option<OwnedRangeGuard>,
    ) -> Result<Completion, DriverGone> {
        self.submit_rest(op, done, guard)?
            .await
            .map_err(|_| DriverGone)
    }

    pub(super) fn stats(&self) -> DriverStats {
        let c = &self.shared.counters;
        DriverStats {
            requests: c.requests.load(Ordering::Relaxed),
            enters: c.enters.load(Ordering::Relaxed),
            sleeps: c.sleeps.load(Ordering::Relaxed),
            wakeups: c.wakeups.load(Ordering::Relaxed),
            relayed_batches: c.relayed_batches.load(Ordering::Relaxed),
            ..DriverStats::default()
        }
    }

    /// False once the thread has stopped (failed, or its owner went away).
    pub(super) fn is_running(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire)
    }

    /// Makes [`Driver::is_running`] say false, as after a failure (tests of what
    /// callers do then; the thread itself goes on serving).
    #[cfg(test)]
    pub(super) fn pretend_stopped(&self) {
        self.shared.stopped.store(true, Ordering::Release);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shared.queue().closing = true;
        // Always signal: the armed eventfd read must complete for the thread to exit.
        sys::eventfd_signal(self.shared.eventfd.as_raw_fd());
    }
}

/// The thread's state.
struct Worker {
    ring: IoUring,
    shared: Arc<Shared>,
    relay: Arc<Relay>,
    /// Keeps the descriptor open while requests use it.
    _file: Arc<File>,
    fd: types::Fd,
    /// Requests in the kernel, indexed by `user_data`.
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Taken from the queue, waiting for a free slot.
    pending: VecDeque<Request>,
    /// Swapped with the queue's vector, so draining it allocates nothing.
    incoming: Vec<Request>,
    /// Completions copied out of the ring (user_data, result).
    reaped: Vec<(u64, i32)>,
    /// Completed requests not yet handed over.
    finished: Vec<Finished>,
    /// The eventfd read's target.
    wake_buf: Box<u64>,
    wake_armed: bool,
    closing: bool,
    /// Most entries handed to the kernel in one `io_uring_enter`.
    max_batch: usize,
    /// Large reads of a buffered file go to io_uring's worker threads (IOSQE_ASYNC).
    copy_in_workers: bool,
    /// Local counts, published to `shared.counters` once per loop.
    requests: u64,
    enters: u64,
    sleeps: u64,
    relayed_batches: u64,
}

impl Worker {
    #[allow(clippy::result_large_err)] // the relay comes back so the caller can close it
    fn new(
        file: Arc<File>,
        (queue_depth, max_batch, copy_in_workers): (u32, usize, bool),
        shared: Arc<Shared>,
        relay: Arc<Relay>,
    ) -> Result<Worker, (io::Error, Arc<Relay>)> {
        let queue_depth = queue_depth.clamp(1, 4096) as usize;
        // One more entry for the eventfd read.
        let entries = (queue_depth as u32 + 1).next_power_of_two();
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_submit_all()
            .build(entries)
            .or_else(|_| IoUring::new(entries));
        let ring = match ring {
            Ok(r) => r,
            Err(e) => {
                shared.queue().dead = true;
                shared.stopped.store(true, Ordering::Release);
                return Err((e, relay));
            }
        };
        let fd = types::Fd(file.as_raw_fd());
        Ok(Worker {
            ring,
            shared,
            relay,
            _file: file,
            fd,
            slots: (0..queue_depth).map(|_| None).collect(),
            free: (0..queue_depth).rev().collect(),
            in_flight: 0,
            pending: VecDeque::new(),
            incoming: Vec::new(),
            reaped: Vec::new(),
            finished: Vec::new(),
            wake_buf: Box::new(0),
            wake_armed: false,
            closing: false,
            max_batch: max_batch.max(1),
            copy_in_workers,
            requests: 0,
            enters: 0,
            sleeps: 0,
            relayed_batches: 0,
        })
    }

    fn run(mut self) {
        self.arm_wake();
        let result = self.serve();
        // Whatever happened, the relay task must end.
        self.relay.closed.store(true, Ordering::Release);
        self.relay.notify.notify_one();
        if let Err(e) = result {
            self.die(e);
        }
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.take_queue();
            self.fill()?;
            if self.closing && self.in_flight == 0 && self.pending.is_empty() && !self.wake_armed {
                // The queue is marked dead under its lock, so nothing can slip in.
                let mut q = self.shared.queue();
                if q.requests.is_empty() {
                    q.dead = true;
                    self.shared.stopped.store(true, Ordering::Release);
                    return Ok(());
                }
                continue;
            }
            let mut want = 0;
            if self.ring.completion().is_empty() {
                // About to sleep: raise the flag, then look at the queue once more.
                self.shared.sleeping.store(true, Ordering::SeqCst);
                if self.shared.queue().requests.is_empty() {
                    want = 1;
                } else {
                    self.shared.sleeping.store(false, Ordering::Relaxed);
                }
            }
            if want == 1 || !self.ring.submission().is_empty() {
                self.enter(want)?;
            }
            if want == 1 {
                self.sleeps += 1;
                self.shared.sleeping.store(false, Ordering::Relaxed);
            }
            self.reap()?;
        }
    }

    fn publish(&self) {
        let c = &self.shared.counters;
        c.requests.store(self.requests, Ordering::Relaxed);
        c.enters.store(self.enters, Ordering::Relaxed);
        c.sleeps.store(self.sleeps, Ordering::Relaxed);
        c.relayed_batches
            .store(self.relayed_batches, Ordering::Relaxed);
    }

    fn enter(&mut self, want: usize) -> io::Result<()> {
        self.enters += 1;
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // Interrupted, or the completion queue is full and must be reaped first
                // (cannot happen with our sizes, but is harmless): the loop goes on.
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Moves everything queued to `pending`.
    fn take_queue(&mut self) {
        {
            let mut q = self.shared.queue();
            std::mem::swap(&mut q.requests, &mut self.incoming);
            self.closing = q.closing;
        }
        self.pending.extend(self.incoming.drain(..));
    }

    /// Moves pending requests into the ring while slots are free, handing them to the
    /// kernel every `max_batch` entries.
    fn fill(&mut self) -> io::Result<()> {
        while !self.free.is_empty() {
            let Some(req) = self.pending.pop_front() else {
                break;
            };
            if req.tx.is_closed() {
                // The caller went away before the request reached the kernel: skip it.
                continue;
            }
            let Some(slot) = self.free.pop() else {
                break;
            };
            self.slots[slot] = Some(req);
            self.in_flight += 1;
            self.push(slot)?;
            if self.ring.submission().len() >= self.max_batch {
                self.enter(0)?;
            }
        }
        Ok(())
    }

    /// Pushes the submission entry for the request in `slot` (its next piece).
    fn push(&mut self, slot: usize) -> io::Result<()> {
        let fd = self.fd;
        let Some(req) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let done = req.done;
        let entry = match &mut req.op {
            Op::Read { buf, offset } => {
                let len = (buf.len() - done).min(MAX_RW) as u32;
                // SAFETY: done < buf.len(), so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                let entry = opcode::Read::new(fd, ptr, len)
                    .offset(*offset + done as u64)
                    .build();
                if self.copy_in_workers && len as usize >= COPY_IN_WORKERS_MIN {
                    entry.flags(squeue::Flags::ASYNC)
                } else {
                    entry
                }
            }
            Op::Write {
                buf,
                offset,
                rw_flags,
            } => {
                let data = &buf.as_slice()[done..];
                let len = data.len().min(MAX_RW) as u32;
                opcode::Write::new(fd, data.as_ptr(), len)
                    .offset(*offset + done as u64)
                    .rw_flags(*rw_flags)
                    .build()
            }
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        self.push_entry(entry.user_data(slot as u64))
    }

    fn push_entry(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points to is owned by a request in `slots`
            // (or is `wake_buf`), which stays put until the entry's completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full (cannot happen: the ring has room for queue_depth + 1): make room.
            self.enter(0)?;
        }
    }

    fn arm_wake(&mut self) {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(WAKE_TOKEN);
        if self.push_entry(entry).is_ok() {
            self.wake_armed = true;
        }
    }

    fn reap(&mut self) -> io::Result<()> {
        self.reaped
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut reaped = std::mem::take(&mut self.reaped);
        for &(user_data, res) in &reaped {
            if user_data == WAKE_TOKEN {
                self.wake_armed = false;
                if !self.closing {
                    self.arm_wake();
                }
                continue;
            }
            self.complete(user_data as usize, res)?;
        }
        reaped.clear();
        self.reaped = reaped;
        // Counters first, so a caller that sees its completion sees it counted.
        self.publish();
        self.deliver();
        Ok(())
    }

    /// Hands the finished requests to their callers: through the relay task when it
    /// runs, directly otherwise.
    fn deliver(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        // A lone completion gains nothing from the relay's extra hop.
        if self.finished.len() > 1 && self.relay.alive.load(Ordering::SeqCst) {
            self.relay.batch().append(&mut self.finished);
            self.relay.notify.notify_one();
            self.relayed_batches += 1;
            // The relay may have died (its runtime shut down) after we looked; it drains
            // the batch on its way out, and if we appended after that, so do we.
            if !self.relay.alive.load(Ordering::SeqCst) {
                self.relay.drain_here();
            }
            return;
        }
        for (tx, c) in self.finished.drain(..) {
            let _ = tx.send(c);
        }
    }

    fn complete(&mut self, slot: usize, res: i32) -> io::Result<()> {
        self.requests += 1;
        let Some(req) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let result = if res < 0 {
            match -res {
                libc::EAGAIN | libc::EINTR => return self.push(slot),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        } else {
            let total = match &req.op {
                Op::Read { buf, .. } => buf.len(),
                Op::Write { buf, .. } => buf.as_slice().len(),
                Op::Fsync | Op::Fallocate { .. } => 0,
            };
            if total == 0 {
                Ok(())
            } else if res == 0 {
                Err(match req.op {
                    Op::Read { .. } => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    ),
                    _ => io::Error::new(io::ErrorKind::WriteZero, "write made no progress"),
                })
            } else {
                req.done += res as usize;
                if req.done < total {
                    // Short read or write: go on from where it stopped.
                    return self.push(slot);
                }
                Ok(())
            }
        };
        if let Some(req) = self.slots[slot].take() {
            self.in_flight -= 1;
            self.free.push(slot);
            let Request { op, guard, tx, .. } = req;
            // The kernel is done with the range: release it now, not when the caller
            // gets around to running.
            drop(guard);
            self.finished.push((tx, Completion { result, op }));
        }
        Ok(())
    }

    /// The ring failed beyond repair: fail everything. Buffers the kernel may still
    /// touch are leaked rather than freed under it.
    fn die(mut self, e: io::Error) {
        let msg = format!("io_uring driver failed: {e}");
        self.deliver();
        let queued = {
            let mut q = self.shared.queue();
            q.dead = true;
            self.shared.stopped.store(true, Ordering::Release);
            std::mem::take(&mut q.requests)
        };
        for req in self.pending.drain(..).chain(queued) {
            let _ = req.tx.send(Completion {
                result: Err(io::Error::other(msg.clone())),
                op: req.op,
            });
        }
        for slot in self.slots.iter_mut() {
            if let Some(req) = slot.take() {
                // Dropping the sender fails the caller's future.
                let Request { op, tx, guard, .. } = req;
                std::mem::forget(op);
                drop(guard);
                drop(tx);
            }
        }
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
    }
}

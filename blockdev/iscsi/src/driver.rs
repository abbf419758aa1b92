//! The driver thread: owns the libiscsi context, submits commands with libiscsi's async
//! API, and drives its event loop with poll(2) on the session socket and an eventfd
//! that wakes it for new requests. Completions go back to tokio through oneshot
//! channels, so the runtime never blocks on libiscsi.
//!
//! Connection loss (a failed `iscsi_service`, or a request older than the I/O timeout)
//! tears the context down: libiscsi then calls every outstanding callback with
//! `SCSI_STATUS_CANCELLED`, which completes those requests with an `Offline` error that
//! says the connection was lost. The thread reconnects with a new context (libiscsi's
//! own auto-reconnect is off: it would replay commands silently); until it succeeds,
//! every new request fails at once with `Offline("... reconnecting ...")`. A request
//! whose caller stopped waiting before the thread picked it up is dropped unsent.

use crate::ffi;
use crate::sense::{self, Sense};
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_void};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A SCSI command for the driver.
#[derive(Debug)]
pub(crate) enum Cmd {
    Read {
        lba: u64,
        len: u32,
    },
    Write {
        lba: u64,
        data: Bytes,
        fua: bool,
    },
    /// `data` is the compare buffer followed by the write buffer.
    Caw {
        lba: u64,
        data: Bytes,
        fua: bool,
    },
    Sync,
    Unmap {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        block: Bytes,
    },
    ReadCapacity16,
    Inquiry {
        page: u8,
    },
}

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Not connected, or the connection dropped with the command outstanding.
    Offline(String),
    /// No answer within the I/O timeout (the session was reset).
    Timeout,
    /// libiscsi refused to queue it, or a transport error.
    Transport(String),
    /// CHECK CONDITION with this sense.
    Check(Option<Sense>),
    /// Another SCSI status.
    Status(i32),
}

pub(crate) type Reply = Result<Bytes, Failure>;

pub(crate) struct Req {
    pub(crate) cmd: Cmd,
    pub(crate) tx: oneshot::Sender<Reply>,
}

/// Connection parameters.
#[derive(Clone)]
pub(crate) struct ConnParams {
    pub(crate) initiator: CString,
    pub(crate) target: CString,
    pub(crate) portal: CString,
    pub(crate) lun: c_int,
    pub(crate) user: Option<CString>,
    pub(crate) password: Option<CString>,
    pub(crate) block_size: u32,
    pub(crate) io_timeout: Duration,
    pub(crate) reconnect_interval: Duration,
    pub(crate) name: String,
}

/// Per-command state handed to libiscsi as `private_data`.
struct Ctx {
    id: u64,
    tx: oneshot::Sender<Reply>,
    /// Buffers libiscsi reads until completion.
    _keep: Option<Bytes>,
    _unmap: Option<Box<[ffi::UnmapList; 1]>>,
    table: *const RefCell<HashMap<u64, Outstanding>>,
}

struct Outstanding {
    since: Instant,
    timed_out: bool,
}

struct Conn {
    ctx: *mut ffi::iscsi_context,
}

fn last_error(ctx: *mut ffi::iscsi_context) -> String {
    if ctx.is_null() {
        return "cannot create an iSCSI context".into();
    }
    // SAFETY: `ctx` is a live context; iscsi_get_error returns a NUL-terminated string
    // owned by the context (or NULL), valid until the next libiscsi call on it.
    let p = unsafe { ffi::iscsi_get_error(ctx) };
    if p.is_null() {
        return "unknown libiscsi error".into();
    }
    // SAFETY: non-null, NUL-terminated, see above; copied out at once.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn connect(p: &ConnParams) -> Result<Conn, String> {
    // SAFETY: the initiator name is a valid C string; a NULL return is handled.
    let ctx = unsafe { ffi::iscsi_create_context(p.initiator.as_ptr()) };
    if ctx.is_null() {
        return Err("cannot create an iSCSI context".into());
    }
    let conn = Conn { ctx };
    // SAFETY: `ctx` is live and owned by `conn`; every argument is a valid C string that
    // libiscsi copies.
    unsafe {
        ffi::iscsi_set_noautoreconnect(ctx, 1);
        if ffi::iscsi_set_targetname(ctx, p.target.as_ptr()) != 0
            || ffi::iscsi_set_session_type(ctx, ffi::ISCSI_SESSION_NORMAL) != 0
        {
            return Err(last_error(ctx));
        }
        if let Some(u) = &p.user {
            let empty = CString::default();
            let pw = p.password.as_ref().unwrap_or(&empty);
            if ffi::iscsi_set_initiator_username_pwd(ctx, u.as_ptr(), pw.as_ptr()) != 0 {
                return Err(last_error(ctx));
            }
        }
        if ffi::iscsi_full_connect_sync(ctx, p.portal.as_ptr(), p.lun) != 0 {
            return Err(last_error(ctx));
        }
    }
    Ok(conn)
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `ctx` is live and owned by this Conn; destroying it invokes every
        // outstanding callback (with SCSI_STATUS_CANCELLED) on this thread, and the
        // context is not used afterwards.
        unsafe {
            ffi::iscsi_destroy_context(self.ctx);
        }
    }
}

unsafe extern "C" fn on_complete(
    _iscsi: *mut ffi::iscsi_context,
    status: c_int,
    command_data: *mut c_void,
    private_data: *mut c_void,
) {
    // SAFETY: `private_data` is the Box<Ctx> leaked by `submit` for this command, and
    // libiscsi calls each command's callback exactly once.
    let ctx = unsafe { Box::from_raw(private_data.cast::<Ctx>()) };
    let task = command_data.cast::<ffi::ScsiTask>();
    // SAFETY: the table lives on the driver thread's stack frame for as long as any
    // command can complete (callbacks run inside iscsi_service/iscsi_destroy_context,
    // called from that frame).
    let timed_out = unsafe { &*ctx.table }
        .borrow_mut()
        .remove(&ctx.id)
        .is_some_and(|o| o.timed_out);
    let datain = || -> Vec<u8> {
        if task.is_null() {
            return Vec::new();
        }
        // SAFETY: a non-null task passed to the callback is live until we free it; its
        // datain describes `size` bytes at `data` (or is empty).
        unsafe {
            let d = &(*task).datain;
            if d.data.is_null() || d.size <= 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(d.data, d.size as usize).to_vec()
            }
        }
    };
    let reply = match status {
        ffi::SCSI_STATUS_GOOD => Ok(Bytes::from(datain())),
        ffi::SCSI_STATUS_CHECK_CONDITION => {
            // libiscsi keeps the sense segment in datain: 2-byte length, then sense.
            let d = datain();
            Err(Failure::Check(d.get(2..).and_then(sense::parse)))
        }
        ffi::SCSI_STATUS_CANCELLED if timed_out => Err(Failure::Timeout),
        ffi::SCSI_STATUS_CANCELLED => Err(Failure::Offline(
            "connection lost with the command outstanding; reconnecting".into(),
        )),
        ffi::SCSI_STATUS_TIMEOUT => Err(Failure::Timeout),
        ffi::SCSI_STATUS_ERROR => Err(Failure::Transport("transport error".into())),
        other => Err(Failure::Status(other)),
    };
    if !task.is_null() {
        // SAFETY: the task was allocated by libiscsi for this command and is finished.
        unsafe { ffi::scsi_free_scsi_task(task) };
    }
    let _ = ctx.tx.send(reply);
}

fn submit(
    conn: &Conn,
    p: &ConnParams,
    id: u64,
    req: Req,
    table: &RefCell<HashMap<u64, Outstanding>>,
) {
    let bs = p.block_size as c_int;
    let mut keep = None;
    let mut unmap = None;
    let data_ptr = |b: &Bytes| b.as_ptr().cast_mut();
    match &req.cmd {
        Cmd::Write { data, .. } | Cmd::Caw { data, .. } => keep = Some(data.clone()),
        Cmd::WriteSame { block, .. } => keep = Some(block.clone()),
        Cmd::Unmap { lba, blocks } => {
            unmap = Some(Box::new([ffi::UnmapList {
                lba: *lba,
                num: *blocks,
            }]))
        }
        _ => {}
    }
    let unmap_ptr = unmap
        .as_mut()
        .map_or(std::ptr::null_mut(), |u| u.as_mut_ptr());
    let ctx = Box::new(Ctx {
        id,
        tx: req.tx,
        _keep: keep,
        _unmap: unmap,
        table,
    });
    let private = Box::into_raw(ctx).cast::<c_void>();
    let c = conn.ctx;
    let lun = p.lun;
    // SAFETY: `c` is a live, connected context used only on this thread. Data pointers
    // point into `Bytes` kept alive by the Ctx until the callback runs (libiscsi only
    // reads data-out buffers). `private` is a leaked Box<Ctx> reclaimed exactly once,
    // by the callback or below when submission fails.
    let task = unsafe {
        match &req.cmd {
            Cmd::Read { lba, len } => {
                ffi::iscsi_read16_task(c, lun, *lba, *len, bs, 0, 0, 0, 0, 0, on_complete, private)
            }
            Cmd::Write { lba, data, fua } => ffi::iscsi_write16_task(
                c,
                lun,
                *lba,
                data_ptr(data),
                data.len() as u32,
                bs,
                0,
                0,
                c_int::from(*fua),
                0,
                0,
                on_complete,
                private,
            ),
            Cmd::Caw { lba, data, fua } => ffi::iscsi_compareandwrite_task(
                c,
                lun,
                *lba,
                data_ptr(data),
                data.len() as u32,
                bs,
                0,
                0,
                c_int::from(*fua),
                0,
                0,
                on_complete,
                private,
            ),
            Cmd::Sync => {
                ffi::iscsi_synchronizecache16_task(c, lun, 0, 0, 0, 0, on_complete, private)
            }
            Cmd::Unmap { .. } => {
                ffi::iscsi_unmap_task(c, lun, 0, 0, unmap_ptr, 1, on_complete, private)
            }
            Cmd::WriteSame {
                lba,
                blocks,
                unmap,
                block,
            } => ffi::iscsi_writesame16_task(
                c,
                lun,
                *lba,
                data_ptr(block),
                block.len() as u32,
                *blocks,
                0,
                c_int::from(*unmap),
                0,
                0,
                on_complete,
                private,
            ),
            Cmd::ReadCapacity16 => ffi::iscsi_readcapacity16_task(c, lun, on_complete, private),
            Cmd::Inquiry { page } => {
                ffi::iscsi_inquiry_task(c, lun, 1, c_int::from(*page), 255, on_complete, private)
            }
        }
    };
    if task.is_null() {
        // SAFETY: libiscsi did not take the command, so the callback will never run and
        // the Box is still ours.
        let ctx = unsafe { Box::from_raw(private.cast::<Ctx>()) };
        let _ = ctx.tx.send(Err(Failure::Transport(last_error(c))));
        return;
    }
    table.borrow_mut().insert(
        id,
        Outstanding {
            since: Instant::now(),
            timed_out: false,
        },
    );
}

/// Creates the eventfd the handle writes to wake the thread.
pub(crate) fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor (checked) is owned by the OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wakes the driver.
pub(crate) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own; failure (counter
    // full) still leaves it readable, which is all a wake needs.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd we own.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}

fn poll(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = timeout.as_millis().min(1000) as c_int;
    // SAFETY: `fds` is a valid, writable array of pollfd of the given length.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}

/// The thread body. Sends the first connection's result on `ready`; exits when every
/// handle is gone and nothing is outstanding.
pub(crate) fn run(
    p: ConnParams,
    rx: mpsc::Receiver<Req>,
    wake_fd: OwnedFd,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let table: RefCell<HashMap<u64, Outstanding>> = RefCell::new(HashMap::new());
    let mut conn = match connect(&p) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            Some(c)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut down_reason = String::new();
    let mut next_attempt = Instant::now();
    let mut attempts = 0u32;
    let mut next_id = 0u64;
    let mut closed = false;
    loop {
        loop {
            match rx.try_recv() {
                // A request whose caller has given up (timed out, future dropped) is
                // not sent: it may have waited here while the thread was reconnecting,
                // and a write must not land long after its issuer stopped waiting for
                // it (the lock manager's fencing margin counts on that).
                Ok(req) if req.tx.is_closed() => {}
                Ok(req) => match &conn {
                    Some(c) => {
                        next_id += 1;
                        submit(c, &p, next_id, req, &table);
                    }
                    None => {
                        let _ = req.tx.send(Err(Failure::Offline(format!(
                            "{}: connection lost ({down_reason}); reconnecting, attempt {attempts}",
                            p.name
                        ))));
                    }
                },
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && table.borrow().is_empty() {
            return;
        }
        match &conn {
            Some(c) => {
                // SAFETY: live context, this thread only.
                let (fd, events) =
                    unsafe { (ffi::iscsi_get_fd(c.ctx), ffi::iscsi_which_events(c.ctx)) };
                let mut fds = [
                    libc::pollfd {
                        fd,
                        events: events as i16,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake_fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                poll(&mut fds, Duration::from_millis(100));
                if fds[1].revents != 0 {
                    drain_eventfd(&wake_fd);
                }
                let mut broken = None;
                if fds[0].revents != 0 {
                    // SAFETY: live context; callbacks run here, on this thread.
                    if unsafe { ffi::iscsi_service(c.ctx, c_int::from(fds[0].revents)) } < 0 {
                        broken = Some(last_error(c.ctx));
                    }
                }
                let now = Instant::now();
                let mut overdue = false;
                for o in table.borrow_mut().values_mut() {
                    if now.duration_since(o.since) > p.io_timeout {
                        o.timed_out = true;
                        overdue = true;
                    }
                }
                if overdue && broken.is_none() {
                    broken = Some(format!("no answer within {:?}", p.io_timeout));
                }
                if let Some(why) = broken {
                    tracing::warn!(target = %p.name, %why, "iSCSI connection lost; reconnecting");
                    down_reason = why;
                    attempts = 0;
                    // Dropping the context cancels what is outstanding (callbacks run).
                    conn = None;
                    next_attempt = Instant::now();
                }
            }
            None => {
                if closed {
                    return;
                }
                let now = Instant::now();
                if now >= next_attempt {
                    attempts += 1;
                    match connect(&p) {
                        Ok(c) => {
                            tracing::info!(target = %p.name, attempts, "iSCSI reconnected");
                            conn = Some(c);
                            continue;
                        }
                        Err(e) => {
                            down_reason = e;
                            next_attempt = Instant::now() + p.reconnect_interval;
                        }
                    }
                }
                let mut fds = [libc::pollfd {
                    fd: wake_fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                poll(
                    &mut fds,
                    next_attempt.saturating_duration_since(Instant::now()),
                );
                if fds[0].revents != 0 {
                    drain_eventfd(&wake_fd);
                }
            }
        }
    }
}

//! [`UringFile`]: a [`BlockDev`](crate::BlockDev) over a regular file or a block device,
//! through io_uring.
//!
//! # Shape
//!
//! - `file.rs`: [`UringFile`], the `BlockDev` implementation: range checks, range locks,
//!   buffers, the fallbacks of write-zeroes, the inline page-cache I/O of buffered
//!   files; opening (file or block device, O_DIRECT negotiation, geometry, serial
//!   number).
//! - `driver.rs`: the driver thread that owns the ring, and the request queue tokio tasks
//!   put requests into.
//! - `sys.rs`: the few raw system interfaces (ioctls, statx, statfs, sysfs,
//!   `preadv2`/`pwritev2`).
//!
//! # The driver
//!
//! One thread per open device owns an io_uring instance. A request (read, write, fsync,
//! fallocate) goes from the calling task into a mutex-protected queue, and the task awaits
//! a tokio oneshot. The thread loops: it takes *everything* queued, turns as much of it
//! into submission entries as the queue depth allows (the rest waits in the queue, so at
//! most `queue_depth` requests are ever in the kernel), hands them to the kernel, and
//! sleeps in `io_uring_enter` until a completion arrives; when it has nothing more to
//! submit, the last submission and the sleep are one system call. Completions complete
//! the oneshots; short reads and writes are resubmitted for their remainder without a
//! round trip through the caller.
//!
//! Waking the thread costs no system call per request. An eventfd read is always armed in
//! the ring, so the thread sleeping in `io_uring_enter` wakes up when the eventfd is
//! written. The thread raises a `sleeping` flag before it sleeps and then checks the queue
//! once more; a submitter that queued a request checks the flag afterwards and writes the
//! eventfd only if it is the one that clears the flag. The queue mutex orders the two
//! checks, so a request can never be queued unseen while the thread sleeps (no lost
//! wakeup), and while the thread is busy (flag down) submitters make no system call at
//! all. Under load one eventfd write wakes the thread for a whole batch.
//!
//! Two refinements came out of benchmarking against fio (`bench/blockdev-vs-fio.sh`):
//!
//! - **Capped batches** ([`UringOptions::max_submit_batch`], default 8). The kernel plugs
//!   the block layer for the duration of one submission call, so the device's doorbell
//!   rings only after the last entry of the batch has gone through the file system. A
//!   32-entry batch kept a virtio disk idle for the ~150 µs that took, and a loop of
//!   single-threaded raw io_uring reads lost 15-25% of its IOPS to it. Several smaller
//!   submissions per wakeup still amortise the system call.
//! - **Completions relayed through one task.** Completing a oneshot from a foreign thread
//!   schedules the waiting task through the runtime's shared inject queue, whose lock the
//!   workers take too; a burst of 32 completions took ~40 µs of contended cross-CPU lock
//!   traffic before the first task could resubmit. When the device is opened inside a
//!   multi-threaded runtime, the thread instead hands each batch of completions to a relay
//!   task on that runtime (one cross-thread wake), which completes the oneshots from a
//!   worker, where the wakes go to the local run queue. Single completions, and devices
//!   opened outside such a runtime (or outliving it), are completed directly.
//!
//! # Buffered files: the page cache on the caller's thread
//!
//! For a buffered file the ring is mostly a detour. A read the page cache holds is a
//! memory copy, yet through the ring it cost two thread hand-offs (caller to driver,
//! driver to relay); and ext4 cannot take a buffered write without possibly blocking
//! (no RWF_NOWAIT), so io_uring passes every such write on to an io-wq worker: one
//! more hand-off each way. Context switches were the largest item in a profile of 4 KiB
//! NBD reads (23%), and the NBD server lost to nbdkit's plain thread pool. So with
//! [`UringOptions::cached_io_inline`] (the default):
//!
//! - **Reads** first try `preadv2(RWF_NOWAIT)` on the caller's thread: it copies only
//!   what is cached and never waits for the disk. What it could not read (not cached,
//!   an error, past the end) goes to the ring as before, from where it stopped.
//! - **Writes** (not FUA: those wait for the disk) first try `pwritev2(RWF_NOWAIT)`;
//!   what the kernel would have to wait for goes to the ring. Where the file system has
//!   no non-blocking buffered writes (ext4 answers EOPNOTSUPP), the write is made with a
//!   plain `pwritev2` on the caller's thread, which takes microseconds unless the kernel
//!   throttles dirty pages, the journal is full or the file system is frozen. So that
//!   such a stall holds at most one tokio worker: only one such write per file runs at
//!   a time (others go to the ring meanwhile); after one that took longer than
//!   [`SLOW_INLINE_WRITE`] the file's writes go through the ring for
//!   [`INLINE_WRITE_PAUSE`]; and only on local file systems (ext2/3/4, tmpfs), never on
//!   FUSE or network ones, whose server decides how long a write takes.
//! - Both only up to [`INLINE_MAX_BYTES`]: larger transfers go through the ring.
//! - Neither once the driver thread has stopped: the device is then offline, and a
//!   write it could never flush must not be taken.
//! - **Ranges to send as they are**: [`BlockDev::cached_range`](crate::BlockDev::cached_range)
//!   hands a caller that writes read data to a socket (the NBD server) the file range
//!   itself when `cachestat(2)` finds every page of it cached and its two ends are
//!   ready. The caller `sendfile`s it: the socket takes references to the page-cache
//!   pages instead of two copies (into a buffer and out of it), which were most of a
//!   1 MiB read's CPU time. Not on kernels without `cachestat` (before 6.5), not on
//!   network or FUSE file systems, not when inline reads are off; and not atomic
//!   against compare-and-write (see the method).
//!
//! O_DIRECT files always use the ring: their I/O always waits for the device.
//!
//! Large buffered reads (256 KiB and up) that do go through the ring carry IOSQE_ASYNC:
//! io_uring would otherwise copy them out of the page cache inside the driver thread's
//! `io_uring_enter`, one after another, and that thread became the bottleneck of 1 MiB
//! NBD reads; in io_uring's workers the copies run side by side (+16% MiB/s, `nbd-vs-nbdkit
//! --compare`). Buffered writes need nothing of the kind: ext4 sends them to the workers
//! anyway, where io_uring serialises writes to one file, as the inode lock would.
//!
//! Apart from those inline writes, and a `sendfile` of a cached range whose pages were
//! evicted after the check (the NBD driver pauses that path after a slow one), nothing
//! here blocks a tokio worker: the only
//! locks taken on the runtime are the queue and relay mutexes (each held for a `Vec`
//! push or swap) and the tokio range locks.
//!
//! Buffers belong to the request until the kernel is done with them. Reads take an
//! [`AlignedBuf`](crate::AlignedBuf) from the buffer pool without clearing it (the
//! kernel overwrites it; a read that fails or comes up short is never handed out, and
//! its buffer goes back unseen) and hand it back frozen into [`Bytes`](bytes::Bytes)
//! (no copy); it returns to the pool when the last clone is dropped. Writes submit the caller's `Bytes` as they are when the address suits
//! O_DIRECT (the alignment statx reports, else 4096) or the file is buffered, and copy
//! into an aligned bounce buffer otherwise. If the caller's future is dropped, the
//! request (with its buffer and, for writes, its range lock) still lives in the driver
//! until the kernel completes it; requests whose caller went away before they reached the
//! ring are skipped. Dropping the `UringFile` tells the thread to finish what is in
//! flight and exit; it does not wait for it.
//!
//! # Why hand-written
//!
//! No maintained crate drives io_uring from a multi-threaded tokio runtime the way a
//! storage backend needs. `tokio-uring` (0.5) runs its own single-threaded runtime per
//! thread, with the ring tied to that thread's tasks, so tokio's multi-threaded
//! scheduler, which the network side of Basalt runs on, cannot use it; `glommio` and
//! `monoio` are whole thread-per-core runtimes that replace tokio; `compio` is another
//! runtime (in beta); `rio` is GPL and unmaintained. What remains is the low-level
//! `io-uring` crate (tokio-rs), which this module uses, plus a few hundred lines of
//! driver. A dedicated thread per device also gives batching across every task that uses
//! the device and one place to bound its queue depth.
//!
//! # O_DIRECT
//!
//! [`DirectMode::Auto`] opens with O_DIRECT and probes it with one aligned read; if the
//! file system refuses (EINVAL at open or at the probe, as tmpfs and some FUSE file
//! systems do, or a block size smaller than the device's direct I/O alignment), the file
//! is reopened buffered. [`UringFile::is_direct`] says which was used.
//! [`DirectMode::Require`] fails instead, [`DirectMode::Off`] never tries.

mod driver;
mod file;
mod sys;

pub use driver::DriverStats;
pub use file::UringFile;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An inline buffered write slower than this (the kernel throttled or the journal was
/// full) sends the file's writes back through the ring for a while.
pub const SLOW_INLINE_WRITE: Duration = Duration::from_millis(1);

/// Larger buffered reads and writes always go through the ring: copying them costs more
/// than the hand-offs, and off the caller's thread (in io_uring's workers, see the
/// module docs) the copy overlaps with the caller's network I/O (1 MiB NBD reads inline
/// were 15% slower than through the ring).
pub const INLINE_MAX_BYTES: usize = 64 << 10;

/// How long writes go through the ring after a slow inline write.
pub const INLINE_WRITE_PAUSE: Duration = Duration::from_secs(1);

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirectMode {
    /// O_DIRECT when the file system supports it, buffered otherwise.
    #[default]
    Auto,
    /// O_DIRECT or fail.
    Require,
    /// Buffered (through the page cache).
    Off,
}

/// How to open a [`UringFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    /// The most requests in the kernel at once (1 to 4096); more wait in the queue.
    pub queue_depth: u32,
    /// O_DIRECT policy.
    pub direct: DirectMode,
    /// Open read-only; every modification fails with
    /// [`BlockError::ReadOnly`](crate::BlockError::ReadOnly).
    pub read_only: bool,
    /// Logical block size. For a file, default 512; for a block device, default its
    /// logical sector size, and an override must be a multiple of it.
    pub block_size: Option<u32>,
    /// The most requests the driver hands to the kernel in one `io_uring_enter`
    /// (default 8, at least 1). See the module docs on why batches are capped.
    pub max_submit_batch: u32,
    /// Buffered files only: serve reads the page cache holds, and writes the page cache
    /// can take, on the calling thread instead of through the ring (default true). See
    /// the module docs. (Large buffered reads go to io_uring's workers either way.)
    pub cached_io_inline: bool,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: 128,
            direct: DirectMode::Auto,
            read_only: false,
            block_size: None,
            max_submit_batch: 8,
            cached_io_inline: true,
        }
    }
}

/// Why [`UringFile::open`] failed. Every message names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Nothing at the path.
    #[error("{}: no such file or device", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path exists but may not be opened as asked.
    #[error("{}: permission denied", path.display())]
    PermissionDenied {
        /// The path.
        path: PathBuf,
    },
    /// A directory, character device, socket...
    #[error("{}: is a {kind}, not a regular file or a block device", path.display())]
    NotFileOrBlockDevice {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The size is not a whole number of blocks.
    #[error("{}: size {size} bytes is not a multiple of the {block_size}-byte block size", path.display())]
    SizeNotMultiple {
        /// The path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The block size asked for.
        block_size: u32,
    },
    /// A zero-length file or device.
    #[error("{}: is empty (0 bytes)", path.display())]
    Empty {
        /// The path.
        path: PathBuf,
    },
    /// The block size (or queue depth) cannot be used.
    #[error("{}: {what}", path.display())]
    InvalidOption {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// [`DirectMode::Require`] and the file system refuses O_DIRECT.
    #[error("{}: O_DIRECT is not supported here: {source}", path.display())]
    DirectUnsupported {
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// io_uring could not be set up (too old a kernel, disabled by
    /// `kernel.io_uring_disabled`, or out of locked memory).
    #[error("{}: cannot set up io_uring: {source}", path.display())]
    Uring {
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Any other failure of the system call `op`.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The failing call.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    fn from_io(path: &Path, op: &'static str, e: io::Error) -> Self {
        let path = path.to_path_buf();
        match e.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound { path },
            io::ErrorKind::PermissionDenied => OpenError::PermissionDenied { path },
            _ => OpenError::Io {
                path,
                op,
                source: e,
            },
        }
    }
}

/// A device that cannot be opened is, to the layer above, offline.
impl From<OpenError> for crate::BlockError {
    fn from(e: OpenError) -> Self {
        crate::BlockError::Offline(e.to_string())
    }
}

/// Creates a sparse file of `size_bytes` at `path` for use as a device. Refuses to
/// overwrite an existing file, and does not create missing parent directories.
pub fn create_sparse_file(path: &Path, size_bytes: u64) -> io::Result<()> {
    let context = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => context(e, "refusing to overwrite an existing file"),
            io::ErrorKind::NotFound => context(e, "the parent directory does not exist"),
            _ => context(e, "cannot create"),
        })?;
    file.set_len(size_bytes)
        .map_err(|e| context(e, "cannot set the size"))
}

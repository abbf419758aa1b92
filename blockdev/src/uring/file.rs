//! [`UringFile`]: opening, geometry, and the `BlockDev` operations.

use super::driver::{Completion, Driver, DriverGone, DriverStats, Op, WriteBuf};
use super::{
    sys, DirectMode, OpenError, UringOptions, INLINE_MAX_BYTES, INLINE_WRITE_PAUSE,
    SLOW_INLINE_WRITE,
};
use crate::{
    check_compare_and_write, check_range, first_difference, AlignedBuf, BlockDev, BlockError,
    CachedRange, Capabilities, CompareOutcome, Extent, ExtentKind, Geometry, OwnedRangeGuard,
    RangeLocks, Result, WriteFlags, ZeroFlags,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Size of the zero buffer that write-zeroes falls back to.
const ZERO_CHUNK: usize = 1 << 20;

/// Most data runs one `block_status` call looks up in a file; the rest of the range is
/// reported as data (always true).
const MAX_STATUS_RUNS: usize = 4096;

/// A regular file or a block device, read and written through io_uring.
/// See the [module docs](super).
pub struct UringFile {
    path: PathBuf,
    driver: Driver,
    /// For the system calls that do not go through the ring (SEEK_DATA).
    file: Arc<File>,
    geometry: Geometry,
    direct: bool,
    /// Writes from buffers at addresses with this alignment go to the kernel as they are.
    mem_align: usize,
    block_device: Option<(u64, u64)>,
    serial: Option<String>,
    queue_depth: u32,
    locks: RangeLocks,
    /// Buffered I/O on the caller's thread (see the module docs).
    inline: Inline,
}

/// State of a buffered file's inline reads and writes.
struct Inline {
    /// Reads try the page cache first; cleared if the file system refuses RWF_NOWAIT.
    reads: AtomicBool,
    /// One of `WRITES_*`.
    writes: AtomicU8,
    /// Blocking inline writes are allowed at all: only on local file systems whose
    /// writes wait for nothing remote (ext2/3/4, tmpfs). A FUSE or network file system
    /// could hold the writer for as long as its server takes.
    blocking_allowed: bool,
    /// A blocking inline write is under way: the next goes to the ring, so at most one
    /// tokio worker per file is ever inside one.
    blocking_busy: AtomicBool,
    /// Blocking inline writes are paused until this many nanoseconds after `epoch`.
    paused_until: AtomicU64,
    epoch: Instant,
    read_count: AtomicU64,
    write_count: AtomicU64,
    pauses: AtomicU64,
    cached_ranges: AtomicU64,
    /// `cached_range` may ask `cachestat(2)`; cleared on a kernel without it.
    cachestat: AtomicBool,
}

/// Writes go through the ring (O_DIRECT, or inline I/O turned off).
const WRITES_RING: u8 = 0;
/// Writes try `pwritev2(RWF_NOWAIT)` first.
const WRITES_NOWAIT: u8 = 1;
/// The file system has no RWF_NOWAIT buffered writes: plain inline writes, paused
/// after a slow one.
const WRITES_BLOCKING: u8 = 2;

/// Whether an error says the kernel or file system lacks RWF_NOWAIT for this file.
fn nowait_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

impl Inline {
    fn new(enabled: bool, blocking_allowed: bool) -> Inline {
        Inline {
            reads: AtomicBool::new(enabled),
            writes: AtomicU8::new(if enabled { WRITES_NOWAIT } else { WRITES_RING }),
            blocking_allowed,
            blocking_busy: AtomicBool::new(false),
            paused_until: AtomicU64::new(0),
            epoch: Instant::now(),
            read_count: AtomicU64::new(0),
            write_count: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            cached_ranges: AtomicU64::new(0),
            cachestat: AtomicBool::new(enabled),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl UringFile {
    /// Opens `path`, a regular file or a block device. Blocking (a few system calls and
    /// sysfs reads): from async code use [`UringFile::open_async`].
    pub fn open(path: &Path, options: &UringOptions) -> Result<UringFile, OpenError> {
        if !(1..=4096).contains(&options.queue_depth) {
            return Err(OpenError::InvalidOption {
                path: path.to_path_buf(),
                what: format!("queue depth {} is not in 1..=4096", options.queue_depth),
            });
        }
        let meta = std::fs::metadata(path).map_err(|e| OpenError::from_io(path, "stat", e))?;
        let ft = meta.file_type();
        let block_device = if ft.is_block_device() {
            Some(sys::major_minor(meta.rdev()))
        } else if ft.is_file() {
            None
        } else {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(OpenError::NotFileOrBlockDevice {
                path: path.to_path_buf(),
                kind,
            });
        };

        // Open and learn the geometry buffered first: the block size decides whether
        // O_DIRECT can work at all.
        let probe_file = open_file(path, options.read_only, false)?;
        let (size, block_size, physical, caps, optimal) = match block_device {
            Some((major, minor)) => {
                let io = |op| move |e| OpenError::from_io(path, op, e);
                let logical = sys::logical_block_size(&probe_file).map_err(io("BLKSSZGET"))?;
                let physical = sys::physical_block_size(&probe_file).map_err(io("BLKPBSZGET"))?;
                let size = sys::block_device_size(&probe_file).map_err(io("BLKGETSIZE64"))?;
                let bs = options.block_size.unwrap_or(logical);
                check_block_size(path, bs)?;
                if !bs.is_multiple_of(logical) {
                    return Err(OpenError::InvalidOption {
                        path: path.to_path_buf(),
                        what: format!(
                            "block size {bs} is not a multiple of the device's {logical}-byte sectors"
                        ),
                    });
                }
                let attr = |name| sys::queue_attr(major, minor, name);
                let number = |name| attr(name).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                // Punching a hole in a block device is a write-zeroes that may unmap and
                // never falls back to writing zeroes: it needs device support.
                let zeroes = number("write_zeroes_max_bytes") > 0;
                let caps = Capabilities {
                    discard: zeroes,
                    discard_zeroes: zeroes,
                    fast_zeroes: zeroes,
                    volatile_cache: attr("write_cache").is_none_or(|s| s.contains("back")),
                    read_only: options.read_only,
                };
                let optimal = u32::try_from(number("optimal_io_size")).unwrap_or(0);
                (size, bs, physical.max(bs), caps, optimal)
            }
            None => {
                let bs = options.block_size.unwrap_or(512);
                check_block_size(path, bs)?;
                let caps = Capabilities {
                    discard: true,
                    discard_zeroes: true,
                    fast_zeroes: true,
                    volatile_cache: true,
                    read_only: options.read_only,
                };
                (meta.len(), bs, bs.max(4096), caps, 0)
            }
        };
        if size == 0 {
            return Err(OpenError::Empty {
                path: path.to_path_buf(),
            });
        }
        if size % u64::from(block_size) != 0 {
            return Err(OpenError::SizeNotMultiple {
                path: path.to_path_buf(),
                size,
                block_size,
            });
        }

        let (file, direct, mem_align) = match options.direct {
            DirectMode::Off => (probe_file, false, 1),
            mode => match open_direct(path, options.read_only, block_size) {
                Ok((file, mem_align)) => (file, true, mem_align),
                Err(e) if !refuses_direct(&e) => {
                    return Err(OpenError::from_io(path, "open with O_DIRECT", e))
                }
                // The file system refused: fall back to the page cache.
                Err(_) if mode == DirectMode::Auto => (probe_file, false, 1),
                Err(source) => {
                    return Err(OpenError::DirectUnsupported {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
        };
        let file = Arc::new(file);
        let name = format!(
            "uring-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        // Thread names are limited to 15 bytes by the kernel.
        let name: String = name.chars().take(15).collect();
        let driver = Driver::start(
            file.clone(),
            options.queue_depth,
            options.max_submit_batch as usize,
            !direct,
            name,
        )
        .map_err(|source| OpenError::Uring {
            path: path.to_path_buf(),
            source,
        })?;
        let serial = block_device.and_then(|(major, minor)| sys::serial(major, minor));
        let blocking_writes = block_device.is_none() && sys::is_local_page_cache_fs(&file);
        Ok(UringFile {
            path: path.to_path_buf(),
            driver,
            file,
            geometry: Geometry {
                block_size,
                physical_block_size: physical,
                blocks: size / u64::from(block_size),
                optimal_io_size: optimal,
                max_io_bytes: 0,
                capabilities: caps,
            },
            direct,
            mem_align,
            block_device,
            serial,
            queue_depth: options.queue_depth,
            locks: RangeLocks::default(),
            inline: Inline::new(options.cached_io_inline && !direct, blocking_writes),
        })
    }

    /// [`UringFile::open`] on tokio's blocking pool.
    pub async fn open_async(path: PathBuf, options: UringOptions) -> Result<UringFile, OpenError> {
        let p = path.clone();
        tokio::task::spawn_blocking(move || UringFile::open(&p, &options))
            .await
            .unwrap_or_else(|e| {
                Err(OpenError::Io {
                    path,
                    op: "open",
                    source: io::Error::other(e.to_string()),
                })
            })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when I/O bypasses the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device.is_some()
    }

    /// The serial number (or WWID) of a block device from sysfs, if it has one.
    pub fn serial(&self) -> Option<String> {
        self.serial.clone()
    }

    /// The queue depth it was opened with.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    /// Counters of the driver thread, and of the I/O done without it.
    pub fn driver_stats(&self) -> DriverStats {
        DriverStats {
            inline_reads: self.inline.read_count.load(Ordering::Relaxed),
            inline_writes: self.inline.write_count.load(Ordering::Relaxed),
            inline_write_pauses: self.inline.pauses.load(Ordering::Relaxed),
            cached_ranges: self.inline.cached_ranges.load(Ordering::Relaxed),
            ..self.driver.stats()
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.geometry.capabilities.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    async fn run(&self, op: Op, guard: Option<OwnedRangeGuard>) -> Result<Completion> {
        self.driver
            .run(op, guard)
            .await
            .map_err(|DriverGone| self.offline())
    }

    fn offline(&self) -> BlockError {
        BlockError::Offline(format!(
            "{}: the io_uring driver thread has stopped",
            self.path.display()
        ))
    }

    /// Reads what the page cache holds of a buffered read on the calling thread (module
    /// docs) and returns how many bytes of `buf` that filled: the ring does the rest, and
    /// reports errors the usual way.
    fn read_cached(&self, buf: &mut AlignedBuf, offset: u64) -> usize {
        if buf.len() > INLINE_MAX_BYTES
            || !self.inline.reads.load(Ordering::Relaxed)
            || !self.driver.is_running()
        {
            return 0;
        }
        match sys::pread_nowait(&self.file, buf.as_mut_slice(), offset) {
            Ok(n) => {
                if n == buf.len() {
                    self.inline.read_count.fetch_add(1, Ordering::Relaxed);
                }
                n
            }
            Err(e) => {
                if nowait_unsupported(&e) {
                    self.inline.reads.store(false, Ordering::Relaxed);
                }
                0
            }
        }
    }

    /// Makes a buffered write on the calling thread as far as it can (module docs).
    /// Returns what is left for the ring: `None` when the write is done.
    fn write_cached(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> io::Result<Option<(u64, Bytes)>> {
        let mode = self.inline.writes.load(Ordering::Relaxed);
        // A device whose driver is gone is offline: the ring path says so, and a write
        // that could never be flushed must not be taken here either.
        if mode == WRITES_RING || fua || data.len() > INLINE_MAX_BYTES || !self.driver.is_running()
        {
            return Ok(Some((offset, data)));
        }
        if mode == WRITES_NOWAIT {
            let (done, result) = sys::pwrite(&self.file, &data, offset, libc::RWF_NOWAIT);
            match result {
                Ok(()) => {
                    self.inline.write_count.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Ok(Some((offset + done as u64, data.slice(done..))));
                }
                Err(e) if done == 0 && nowait_unsupported(&e) => {
                    let next = if self.inline.blocking_allowed {
                        WRITES_BLOCKING
                    } else {
                        WRITES_RING
                    };
                    self.inline.writes.store(next, Ordering::Relaxed);
                    if next == WRITES_RING {
                        return Ok(Some((offset, data)));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if self.inline.paused_until.load(Ordering::Relaxed) > self.inline.now()
            || self.inline.blocking_busy.swap(true, Ordering::Acquire)
        {
            return Ok(Some((offset, data)));
        }
        let start = Instant::now();
        let (_, result) = sys::pwrite(&self.file, &data, offset, 0);
        let took = start.elapsed();
        self.inline.blocking_busy.store(false, Ordering::Release);
        if took > SLOW_INLINE_WRITE {
            let until = self
                .inline
                .now()
                .saturating_add(INLINE_WRITE_PAUSE.as_nanos() as u64);
            self.inline.paused_until.store(until, Ordering::Relaxed);
            self.inline.pauses.fetch_add(1, Ordering::Relaxed);
        }
        result?;
        self.inline.write_count.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }

    async fn read_unlocked(&self, offset: u64, len: usize) -> Result<Bytes> {
        // Stale contents are fine: the driver fails a read that does not fill the whole
        // buffer, and a failed read's buffer goes back to the pool unseen.
        let mut buf = AlignedBuf::for_overwrite(len);
        let cached = self.read_cached(&mut buf, offset);
        if cached == len {
            return Ok(buf.freeze());
        }
        let c = self
            .driver
            .run_rest(Op::Read { buf, offset }, cached, None)
            .await
            .map_err(|DriverGone| self.offline())?;
        c.result
            .map_err(|e| BlockError::io("read", offset, len as u64, e))?;
        match c.op {
            Op::Read { buf, .. } => Ok(buf.freeze()),
            _ => Err(BlockError::InvalidRequest(
                "driver returned another op".into(),
            )),
        }
    }

    async fn write_locked(
        &self,
        offset: u64,
        data: Bytes,
        flags: WriteFlags,
        guard: OwnedRangeGuard,
    ) -> Result<()> {
        let len = data.len() as u64;
        let io_error = |e| BlockError::io("write", offset, len, e);
        let (offset, data) = match self.write_cached(offset, data, flags.fua) {
            Ok(None) => return Ok(()),
            Ok(Some(rest)) => rest,
            Err(e) => return Err(io_error(e)),
        };
        let buf = if self.direct && !AlignedBuf::is_aligned(&data, self.mem_align) {
            WriteBuf::Bounce(AlignedBuf::copy_from(&data))
        } else {
            WriteBuf::Shared(data)
        };
        let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
        let op = Op::Write {
            buf,
            offset,
            rw_flags,
        };
        self.run(op, Some(guard)).await?.result.map_err(io_error)
    }

    async fn fallocate(&self, op: &'static str, offset: u64, len: u64, mode: i32) -> Result<()> {
        let guard = self.locks.shared_owned(offset, len).await;
        let op_ = Op::Fallocate { offset, len, mode };
        self.run(op_, Some(guard))
            .await?
            .result
            .map_err(|e| BlockError::io(op, offset, len, e))
    }

    /// Write-zeroes the slow way: writes of a shared zero buffer.
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        static ZEROES: OnceLock<Bytes> = OnceLock::new();
        let zeroes = ZEROES.get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK).freeze());
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK as u64);
            let guard = self.locks.shared_owned(at, n).await;
            let data = zeroes.slice(..n as usize);
            self.write_locked(at, data, WriteFlags::default(), guard)
                .await?;
            at += n;
        }
        Ok(())
    }
}

/// Runs `f` on tokio's blocking pool when called inside a runtime (so a slow system call
/// does not stall a worker), inline otherwise.
async fn off_runtime<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string()))),
        Err(_) => f(),
    }
}

/// The extents of `[offset, offset + len)` given the runs of data in it (sorted, disjoint,
/// inside the range): holes shrink to whole blocks of `bs`, and a block that is only
/// partly a hole counts as data, so every extent is block-aligned and they cover the
/// range exactly.
fn extents_from_data_runs(offset: u64, len: u64, bs: u64, runs: &[(u64, u64)]) -> Vec<Extent> {
    fn push(out: &mut Vec<Extent>, kind: ExtentKind, len: u64) {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(e) if e.kind == kind => e.len += len,
            _ => out.push(Extent { len, kind }),
        }
    }
    let end = offset + len;
    let mut out = Vec::new();
    // Everything before `at` is in `out`.
    let mut at = offset;
    for &(start, stop) in runs.iter().chain(std::iter::once(&(end, end))) {
        // Clamped so that out-of-order or overlapping input cannot go backwards.
        let data_start = start.clamp(at, end);
        let data_end = stop.clamp(data_start, end);
        // The hole [at, data_start), cut to whole blocks.
        let hole_start = at.next_multiple_of(bs).min(data_start);
        let hole_end = (data_start / bs * bs).max(hole_start);
        push(&mut out, ExtentKind::Data, hole_start - at);
        push(&mut out, ExtentKind::Hole, hole_end - hole_start);
        push(&mut out, ExtentKind::Data, data_end - hole_end);
        at = data_end;
    }
    out
}

fn check_block_size(path: &Path, bs: u32) -> Result<(), OpenError> {
    if bs.is_power_of_two() && (512..=65536).contains(&bs) {
        return Ok(());
    }
    Err(OpenError::InvalidOption {
        path: path.to_path_buf(),
        what: format!("block size {bs} is not a power of two from 512 to 65536"),
    })
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File, OpenError> {
    open_raw(path, read_only, direct).map_err(|e| OpenError::from_io(path, "open", e))
}

fn open_raw(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    o.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
    o.open(path)
}

/// True for the errors with which a file system says it cannot do direct I/O (at open,
/// or at our probe read): EINVAL, or our own alignment verdict.
fn refuses_direct(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL) || e.kind() == io::ErrorKind::InvalidInput
}

/// Opens with O_DIRECT and proves it works at `block_size` with one aligned read;
/// returns the file and the memory alignment direct I/O needs.
fn open_direct(path: &Path, read_only: bool, block_size: u32) -> io::Result<(File, usize)> {
    let file = open_raw(path, read_only, true)?;
    let mut mem_align = AlignedBuf::ALIGN;
    if let Some((mem, offset)) = sys::dio_alignment(&file) {
        if offset > block_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("direct I/O needs {offset}-byte alignment, the block size is {block_size}"),
            ));
        }
        if mem > 0 && (mem as usize) <= AlignedBuf::ALIGN {
            mem_align = mem as usize;
        }
    }
    let mut buf = AlignedBuf::zeroed(block_size as usize);
    sys::pread(&file, buf.as_mut_slice(), 0)?;
    Ok((file, mem_align))
}

#[async_trait]
impl BlockDev for UringFile {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.geometry, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let _range = self.locks.shared(offset, len as u64).await;
        self.read_unlocked(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let guard = self.locks.shared_owned(offset, len).await;
        self.write_locked(offset, data, flags, guard).await
    }

    async fn flush(&self) -> Result<()> {
        if self.geometry.capabilities.read_only {
            return Ok(());
        }
        self.run(Op::Fsync, None)
            .await?
            .result
            .map_err(|e| BlockError::io("flush", 0, 0, e))
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        if !self.geometry.capabilities.discard {
            return Err(BlockError::Unsupported("discard"));
        }
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate("discard", offset, len, mode).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let caps = self.geometry.capabilities;
        if flags.fast_only && !caps.fast_zeroes {
            return Err(BlockError::Unsupported("fast write-zeroes"));
        }
        let mode = if flags.may_unmap && caps.discard {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate("write_zeroes", offset, len, mode).await {
            Err(BlockError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                if flags.fast_only {
                    return Err(BlockError::Unsupported("fast write-zeroes"));
                }
                self.write_zero_buffers(offset, len).await
            }
            other => other,
        }
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let len = check_compare_and_write(&self.geometry, offset, &compare, &data)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(CompareOutcome::Written);
        }
        // Exclusive until the write completes in the kernel: the guard travels with the
        // write request.
        let guard = self.locks.exclusive_owned(offset, len).await;
        let current = self.read_unlocked(offset, data.len()).await?;
        if let Some(at) = first_difference(&current, &compare) {
            return Ok(CompareOutcome::Miscompare { offset: at });
        }
        self.write_locked(offset, data, flags, guard).await?;
        Ok(CompareOutcome::Written)
    }

    /// Regular files report their holes (SEEK_DATA/SEEK_HOLE, on the blocking pool);
    /// block devices say "all data".
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.geometry, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.block_device.is_some() {
            return Ok(vec![Extent {
                len,
                kind: ExtentKind::Data,
            }]);
        }
        self.file_block_status(offset, len).await
    }

    /// Buffered files with inline reads (the page cache is what a read would copy from),
    /// on local file systems only (a network or FUSE file system's `sendfile` may ask its
    /// server first): the range if `cachestat(2)` finds every page of it in the cache and
    /// a one-byte `RWF_NOWAIT` read of its first and last byte finds those pages ready
    /// (`cachestat` also counts pages whose readahead is still in flight; asking the two
    /// ends catches most of those for two cheap system calls). Pages evicted between the
    /// check and the `sendfile` make the caller's thread wait for the disk; the NBD
    /// driver pauses this path after a slow `sendfile` (as inline writes pause).
    async fn cached_range(&self, offset: u64, len: u64) -> Result<Option<CachedRange>> {
        check_range(&self.geometry, offset, len)?;
        if len == 0
            || !self.inline.blocking_allowed
            || !self.inline.reads.load(Ordering::Relaxed)
            || !self.inline.cachestat.load(Ordering::Relaxed)
            || !self.driver.is_running()
        {
            return Ok(None);
        }
        match sys::fully_cached(&self.file, offset, len) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // No cachestat (a kernel before 6.5), or not for this file: stop asking.
            Err(_) => {
                self.inline.cachestat.store(false, Ordering::Relaxed);
                return Ok(None);
            }
        }
        let mut byte = [0u8; 1];
        for at in [offset, offset + len - 1] {
            if !matches!(sys::pread_nowait(&self.file, &mut byte, at), Ok(1)) {
                return Ok(None);
            }
        }
        self.inline.cached_ranges.fetch_add(1, Ordering::Relaxed);
        Ok(Some(CachedRange::new(self.file.clone(), offset, len)))
    }
}

impl UringFile {
    async fn file_block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let file = self.file.clone();
        let end = offset + len;
        let runs = off_runtime(move || sys::data_runs(&file, offset, end, MAX_STATUS_RUNS)).await;
        let runs = match runs {
            Ok(runs) => runs,
            // A file system without SEEK_DATA: everything is data, which is always true.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                vec![(offset, end)]
            }
            Err(e) => return Err(BlockError::io("block_status", offset, len, e)),
        };
        let bs = u64::from(self.geometry.block_size);
        Ok(extents_from_data_runs(offset, len, bs, &runs))
    }
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("direct", &self.direct)
            .field("block_device", &self.block_device.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::create_sparse_file;
    use super::*;
    use crate::conformance::{self, assert_reads, pattern};
    use crate::SharedBlockDev;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SIZE: u64 = 32 << 20;

    fn opts(direct: DirectMode, block_size: u32) -> UringOptions {
        UringOptions {
            direct,
            block_size: Some(block_size),
            ..UringOptions::default()
        }
    }

    /// A fresh sparse file of `size` bytes in a temporary directory, opened buffered
    /// (the directory lives as long as the returned guard).
    fn buffered_file(name: &str, size: u64) -> (tempfile::TempDir, UringFile) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        create_sparse_file(&p, size).unwrap();
        let f = UringFile::open(&p, &opts(DirectMode::Off, 512)).unwrap();
        (dir, f)
    }

    async fn run_conformance(name: &str, direct: DirectMode, block_size: u32) {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicU32::new(0);
        conformance::run(name, || async {
            let path = dir
                .path()
                .join(format!("dev{}", n.fetch_add(1, Ordering::Relaxed)));
            create_sparse_file(&path, SIZE).unwrap();
            let f = UringFile::open(&path, &opts(direct, block_size)).unwrap();
            if direct == DirectMode::Require {
                assert!(f.is_direct());
            }
            if direct == DirectMode::Off {
                assert!(!f.is_direct());
            }
            Arc::new(f) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_file_direct_512() {
        run_conformance("UringFile/direct/512", DirectMode::Require, 512).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_file_direct_4096() {
        run_conformance("UringFile/direct/4096", DirectMode::Require, 4096).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_file_buffered() {
        run_conformance("UringFile/buffered/512", DirectMode::Off, 512).await;
    }

    /// A loop device over a sparse file: a real block device path (ioctls, sysfs,
    /// fallocate on a block device). Needs root and loop devices; skipped otherwise.
    struct Loop {
        dev: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Loop {
        /// Attaches a loop device over a sparse file. The suite runs as root, like the
        /// appliance; without loop devices the test fails rather than pass unrun.
        fn attach(size: u64) -> Loop {
            let dir = tempfile::tempdir().unwrap();
            let backing = dir.path().join("backing");
            create_sparse_file(&backing, size).unwrap();
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(&backing)
                .output()
                .expect("losetup (util-linux) is installed");
            assert!(
                out.status.success(),
                "losetup failed (the block-device tests need root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            Loop { dev, _dir: dir }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_loop_block_device() {
        // One loop device for the whole suite (attaching is slow); each check gets a
        // zeroed device by discarding it all first.
        let lo = Loop::attach(SIZE);
        let path = lo.dev.clone();
        let first = UringFile::open(&path, &UringOptions::default()).unwrap();
        assert!(first.is_block_device());
        assert_eq!(first.geometry().capacity_bytes(), SIZE);
        println!(
            "loop device {}: {:?}, direct {}",
            path.display(),
            first.geometry(),
            first.is_direct()
        );
        drop(first);
        conformance::run("UringFile/loop", || async {
            let f = UringFile::open(&path, &UringOptions::default()).unwrap();
            f.write_zeroes(0, SIZE, ZeroFlags::default()).await.unwrap();
            Arc::new(f) as SharedBlockDev
        })
        .await;
        // A block device has no holes to report.
        let f = UringFile::open(&path, &UringOptions::default()).unwrap();
        assert_eq!(
            f.block_status(0, SIZE).await.unwrap(),
            vec![Extent {
                len: SIZE,
                kind: ExtentKind::Data
            }]
        );
    }

    #[tokio::test]
    async fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let e = UringFile::open(&missing, &UringOptions::default()).unwrap_err();
        assert!(matches!(e, OpenError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");

        let e = UringFile::open(dir.path(), &UringOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                OpenError::NotFileOrBlockDevice {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );

        let odd = dir.path().join("odd");
        create_sparse_file(&odd, 4096 + 100).unwrap();
        let e = UringFile::open(&odd, &UringOptions::default()).unwrap_err();
        assert!(
            matches!(e, OpenError::SizeNotMultiple { size: 4196, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("odd"), "{e}");

        let small = dir.path().join("small");
        create_sparse_file(&small, 512 * 3).unwrap();
        let e = UringFile::open(&small, &opts(DirectMode::Auto, 4096)).unwrap_err();
        assert!(matches!(e, OpenError::SizeNotMultiple { .. }), "{e}");
        let e = UringFile::open(&small, &opts(DirectMode::Auto, 1000)).unwrap_err();
        assert!(matches!(e, OpenError::InvalidOption { .. }), "{e}");

        let empty = dir.path().join("empty");
        create_sparse_file(&empty, 0).unwrap();
        let e = UringFile::open(&empty, &UringOptions::default()).unwrap_err();
        assert!(matches!(e, OpenError::Empty { .. }), "{e}");

        let e = UringFile::open(
            &std::path::PathBuf::from("/dev/null"),
            &UringOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                OpenError::NotFileOrBlockDevice {
                    kind: "character device",
                    ..
                }
            ),
            "{e}"
        );

        // Permission: only meaningful when not root (root bypasses file modes).
        // SAFETY: plain system call.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            let locked = dir.path().join("locked");
            create_sparse_file(&locked, 4096).unwrap();
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
            let e = UringFile::open(&locked, &UringOptions::default()).unwrap_err();
            assert!(matches!(e, OpenError::PermissionDenied { .. }), "{e}");
        }
    }

    #[test]
    fn create_sparse_file_refuses_overwrite_and_missing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_sparse_file(&p, 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        // Sparse: almost nothing allocated.
        assert!(std::fs::metadata(&p).unwrap().blocks() < 64);
        let e = create_sparse_file(&p, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("overwrite"), "{e}");
        let e = create_sparse_file(&dir.path().join("no/such/dir/f"), 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("parent"), "{e}");
    }

    #[tokio::test]
    async fn read_only_rejects_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro");
        create_sparse_file(&p, 1 << 20).unwrap();
        let o = UringOptions {
            read_only: true,
            ..UringOptions::default()
        };
        let f = UringFile::open(&p, &o).unwrap();
        assert!(f.geometry().capabilities.read_only);
        let r = f.write(0, pattern(1, 512), WriteFlags::default()).await;
        assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}");
        assert!(matches!(f.discard(0, 512).await, Err(BlockError::ReadOnly)));
        assert_reads(&f, 0, &[0; 512], "read-only read").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen_and_discard_punches_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        create_sparse_file(&p, 8 << 20).unwrap();
        let data = pattern(5, 4 << 20);
        {
            let f = UringFile::open(&p, &UringOptions::default()).unwrap();
            f.write(0, data.clone(), WriteFlags::default())
                .await
                .unwrap();
            f.flush().await.unwrap();
        }
        let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated >= 4 << 20, "{allocated}");
        let f = UringFile::open(&p, &UringOptions::default()).unwrap();
        assert_reads(&f, 0, &data, "after reopen").await;
        f.discard(0, 4 << 20).await.unwrap();
        f.flush().await.unwrap();
        let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            allocated < 1 << 20,
            "hole not punched: {allocated} bytes allocated"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_depth_one_still_serves_many() {
        // More requests than the queue depth wait in the queue rather than fail.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qd1");
        create_sparse_file(&p, 1 << 20).unwrap();
        let o = UringOptions {
            queue_depth: 1,
            ..UringOptions::default()
        };
        let f = Arc::new(UringFile::open(&p, &o).unwrap());
        let mut set = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let f = f.clone();
            set.spawn(async move {
                f.write(i * 512, pattern(i, 512), WriteFlags::default())
                    .await
                    .unwrap();
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        for i in 0..64u64 {
            assert_reads(&*f, i * 512, &pattern(i, 512), "qd1").await;
        }
        let s = f.driver_stats();
        assert!(s.requests >= 128, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_futures_and_the_file_is_safe() {
        // Futures dropped while their requests are in the kernel, then the file dropped
        // with requests in flight: buffers stay alive until completion and the driver
        // thread exits; a fresh open sees a consistent file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("drop");
        create_sparse_file(&p, 8 << 20).unwrap();
        for _ in 0..5 {
            let f = Arc::new(UringFile::open(&p, &UringOptions::default()).unwrap());
            let mut set = tokio::task::JoinSet::new();
            for i in 0..32u64 {
                let f = f.clone();
                set.spawn(async move {
                    let _ = f
                        .write(i * 65536, pattern(i, 65536), WriteFlags::default())
                        .await;
                    let _ = f.read(i * 65536, 65536).await;
                });
            }
            tokio::task::yield_now().await;
            set.abort_all();
            drop(set);
            drop(f);
        }
        let f = UringFile::open(&p, &UringOptions::default()).unwrap();
        f.read(0, 8 << 20).await.unwrap();
    }

    async fn burst(f: &Arc<UringFile>, seed: u64) {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let f = f.clone();
            set.spawn(async move {
                let data = pattern(seed + i, 4096);
                f.write(i * 4096, data.clone(), WriteFlags::default())
                    .await
                    .unwrap();
                assert_eq!(f.read(i * 4096, 4096).await.unwrap(), data);
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }

    #[test]
    fn completions_arrive_whatever_runtime_opened_the_file() {
        // Completions normally travel through a relay task on the runtime that opened
        // the file. Pins: a file opened on a runtime that is then shut down, and files
        // opened on a current-thread runtime or outside any runtime, still complete.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rt");
        create_sparse_file(&p, 1 << 20).unwrap();
        let multi = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        };
        let rt1 = multi();
        let f = Arc::new(
            rt1.block_on(async { UringFile::open(&p, &UringOptions::default()) })
                .unwrap(),
        );
        rt1.block_on(burst(&f, 0));
        drop(rt1);
        let rt2 = multi();
        rt2.block_on(burst(&f, 100));

        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let g = Arc::new(
            current
                .block_on(async { UringFile::open(&p, &UringOptions::default()) })
                .unwrap(),
        );
        rt2.block_on(burst(&g, 200));

        let h = Arc::new(UringFile::open(&p, &UringOptions::default()).unwrap());
        rt2.block_on(burst(&h, 300));
        assert!(h.driver_stats().relayed_batches == 0);
    }

    #[tokio::test]
    async fn auto_falls_back_when_o_direct_is_refused() {
        // /dev/shm is tmpfs; tmpfs accepts O_DIRECT only since Linux 6.6. Either way Auto
        // opens, and Require fails exactly when Auto fell back.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            println!("NOTE: no /dev/shm; skipping");
            return;
        };
        let p = dir.path().join("shm");
        create_sparse_file(&p, 1 << 20).unwrap();
        let auto = UringFile::open(&p, &UringOptions::default()).unwrap();
        let req = UringFile::open(&p, &opts(DirectMode::Require, 512));
        assert_eq!(auto.is_direct(), req.is_ok(), "{req:?}");
        if let Err(e) = req {
            assert!(matches!(e, OpenError::DirectUnsupported { .. }), "{e}");
        }
        auto.write(0, pattern(1, 4096), WriteFlags { fua: true })
            .await
            .unwrap();
        assert_reads(&auto, 0, &pattern(1, 4096), "tmpfs").await;
    }

    #[tokio::test]
    async fn serial_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        create_sparse_file(&p, 1 << 20).unwrap();
        let f = UringFile::open(&p, &UringOptions::default()).unwrap();
        assert_eq!(f.path(), p.as_path());
        assert_eq!(f.serial(), None);
        assert!(!f.is_block_device());
        // Whatever the root disk is, reading its serial must not fail or panic.
        for disk in ["/dev/vda", "/dev/sda", "/dev/nvme0n1"] {
            if let Ok(d) = UringFile::open(
                Path::new(disk),
                &UringOptions {
                    read_only: true,
                    ..UringOptions::default()
                },
            ) {
                println!("{disk}: serial {:?}, {:?}", d.serial(), d.geometry());
            }
        }
    }

    fn ext(kinds: &[(ExtentKind, u64)]) -> Vec<Extent> {
        kinds
            .iter()
            .map(|&(kind, len)| Extent { len, kind })
            .collect()
    }

    #[test]
    fn extents_round_partial_holes_to_data() {
        use ExtentKind::{Data, Hole};
        let k = 1024;
        // No data at all; all data; nothing asked.
        assert_eq!(
            extents_from_data_runs(0, 64 * k, 4 * k, &[]),
            ext(&[(Hole, 64 * k)])
        );
        assert_eq!(
            extents_from_data_runs(8 * k, 8 * k, 4 * k, &[(8 * k, 16 * k)]),
            ext(&[(Data, 8 * k)])
        );
        assert!(extents_from_data_runs(0, 0, 512, &[]).is_empty());
        // Aligned runs map one to one.
        assert_eq!(
            extents_from_data_runs(0, 64 * k, 4 * k, &[(4 * k, 8 * k), (32 * k, 40 * k)]),
            ext(&[
                (Hole, 4 * k),
                (Data, 4 * k),
                (Hole, 24 * k),
                (Data, 8 * k),
                (Hole, 24 * k)
            ])
        );
        // Runs ending or starting inside a block: the partial blocks are data.
        assert_eq!(
            extents_from_data_runs(0, 64 * k, 16 * k, &[(4 * k, 8 * k), (36 * k, 40 * k)]),
            ext(&[
                (Data, 16 * k),
                (Hole, 16 * k),
                (Data, 16 * k),
                (Hole, 16 * k)
            ])
        );
        // A hole smaller than a block, between two runs, is data.
        assert_eq!(
            extents_from_data_runs(0, 32 * k, 16 * k, &[(0, 4 * k), (8 * k, 32 * k)]),
            ext(&[(Data, 32 * k)])
        );
        // Runs reaching outside the range are cut to it; disorder cannot go backwards.
        assert_eq!(
            extents_from_data_runs(16 * k, 32 * k, 4 * k, &[(0, 20 * k), (8 * k, 12 * k)]),
            ext(&[(Data, 4 * k), (Hole, 28 * k)])
        );
        // Coverage and alignment hold for arbitrary runs.
        let mut rng = crate::rng::SplitMix64::new(7);
        for _ in 0..500 {
            let bs = 512u64 << (rng.next_u64() % 6);
            let offset = (rng.next_u64() % 64) * bs;
            let len = (rng.next_u64() % 64) * bs;
            let mut cuts: Vec<u64> = (0..(rng.next_u64() % 12))
                .map(|_| offset + rng.next_u64() % (len + 1))
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let runs: Vec<(u64, u64)> = cuts.chunks_exact(2).map(|c| (c[0], c[1])).collect();
            let out = extents_from_data_runs(offset, len, bs, &runs);
            assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), len, "{runs:?}");
            let mut at = offset;
            for (i, e) in out.iter().enumerate() {
                assert!(e.len > 0 && e.len % bs == 0, "{out:?}");
                if i > 0 {
                    assert_ne!(out[i - 1].kind, e.kind, "not merged: {out:?}");
                }
                if e.kind == ExtentKind::Hole {
                    // Nothing reported as a hole holds data.
                    assert!(
                        runs.iter().all(|&(s, t)| t <= at || s >= at + e.len),
                        "{runs:?} -> {out:?}"
                    );
                }
                at += e.len;
            }
        }
    }

    /// Checks `block_status` of the whole device and of pieces of it against `expect`,
    /// and that every hole reads as zeroes.
    async fn assert_status(f: &UringFile, expect: &[(ExtentKind, u64)]) {
        let size = f.geometry().capacity_bytes();
        assert_eq!(f.block_status(0, size).await.unwrap(), ext(expect));
        let mut at = 0;
        for &(kind, len) in expect {
            // Each extent alone, and from one block into it.
            assert_eq!(f.block_status(at, len).await.unwrap(), ext(&[(kind, len)]));
            let bs = u64::from(f.geometry().block_size);
            if len > bs {
                assert_eq!(
                    f.block_status(at + bs, len - bs).await.unwrap(),
                    ext(&[(kind, len - bs)])
                );
            }
            if kind == ExtentKind::Hole {
                assert_reads(f, at, &vec![0; len as usize], "hole").await;
            }
            at += len;
        }
    }

    async fn write_discard_and_check_status(direct: DirectMode, block_size: u32) {
        use ExtentKind::{Data, Hole};
        const K: u64 = 1024;
        const M: u64 = 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        create_sparse_file(&p, 8 * M).unwrap();
        let f = UringFile::open(&p, &opts(direct, block_size)).unwrap();
        assert_status(&f, &[(Hole, 8 * M)]).await;
        let w = |off: u64, len: u64, seed: u64| {
            f.write(off, pattern(seed, len as usize), WriteFlags::default())
        };
        w(0, 64 * K, 1).await.unwrap();
        w(M, 4 * K, 2).await.unwrap();
        w(4 * M, M, 3).await.unwrap();
        assert_status(
            &f,
            &[
                (Data, 64 * K),
                (Hole, M - 64 * K),
                (Data, 4 * K),
                (Hole, 3 * M - 4 * K),
                (Data, M),
                (Hole, 3 * M),
            ],
        )
        .await;
        // Punch through the middle of the last run and all of the second.
        f.discard(4 * M + 64 * K, 128 * K).await.unwrap();
        f.discard(M, 4 * K).await.unwrap();
        assert_status(
            &f,
            &[
                (Data, 64 * K),
                (Hole, 4 * M - 64 * K),
                (Data, 64 * K),
                (Hole, 128 * K),
                (Data, M - 192 * K),
                (Hole, 3 * M),
            ],
        )
        .await;
        // Out of range and misaligned requests fail as everywhere else.
        assert!(matches!(
            f.block_status(8 * M, 4096).await,
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            f.block_status(100, 4096).await,
            Err(BlockError::Misaligned { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_reports_punched_holes_direct() {
        write_discard_and_check_status(DirectMode::Auto, 4096).await;
        write_discard_and_check_status(DirectMode::Auto, 512).await;
    }

    #[tokio::test]
    async fn block_status_reports_punched_holes_buffered_current_thread() {
        // Buffered: dirty pages not yet written back count as data too.
        write_discard_and_check_status(DirectMode::Off, 4096).await;
    }

    #[test]
    fn block_status_outside_a_runtime_and_partial_block_holes() {
        use std::os::fd::AsRawFd;
        use ExtentKind::{Data, Hole};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("partial");
        let bs = 16384u64;
        create_sparse_file(&p, 16 * bs).unwrap();
        let f = UringFile::open(&p, &opts(DirectMode::Auto, bs as u32)).unwrap();
        // Driven by a bare executor: no tokio runtime is current inside the future.
        block_on_bare(Box::pin(async {
            f.write(0, pattern(1, 4 * bs as usize), WriteFlags::default())
                .await
                .unwrap();
        }));
        // 4 KiB punched inside block 1 (smaller than a block), and all of block 3 plus
        // half of block 2, behind the device's back.
        let other = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let punch = |off: u64, len: u64| {
            // SAFETY: plain system call on a descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    other.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
        };
        punch(bs + 4096, 4096);
        punch(2 * bs + bs / 2, bs / 2 + bs);
        let got = block_on_bare(Box::pin(f.block_status(0, 16 * bs))).unwrap();
        assert_eq!(got, ext(&[(Data, 3 * bs), (Hole, 13 * bs)]));
    }

    /// Polls a future to completion on this thread, outside any tokio runtime.
    fn block_on_bare<T>(
        mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = T> + '_>>,
    ) -> T {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[tokio::test]
    async fn a_read_that_comes_up_short_fails_and_shows_nothing() {
        // The read buffer comes from the pool with stale contents; a read that cannot
        // fill it must fail rather than hand out the stale tail.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short");
        create_sparse_file(&p, 1 << 20).unwrap();
        let f = UringFile::open(&p, &opts(DirectMode::Auto, 4096)).unwrap();
        f.write(0, pattern(9, 1 << 20), WriteFlags::default())
            .await
            .unwrap();
        let mut stale = AlignedBuf::for_overwrite(1 << 20);
        stale.as_mut_slice().fill(0xee);
        drop(stale);
        // Shrink the file behind the device's back: the last half reads short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(512 << 10)
            .unwrap();
        let r = f.read(0, 1 << 20).await;
        assert!(
            matches!(&r, Err(BlockError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof),
            "{r:?}"
        );
        assert_reads(&f, 0, &pattern(9, 1 << 20)[..512 << 10], "before the cut").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_io_uses_the_page_cache_inline_and_the_ring_for_the_rest() {
        let (_dir, f) = buffered_file("inline", 4 << 20);
        // Small writes and reads go inline; FUA and large transfers through the ring.
        let small = pattern(1, 8192);
        f.write(4096, small.clone(), WriteFlags::default())
            .await
            .unwrap();
        let fua = pattern(2, 4096);
        f.write(65536, fua.clone(), WriteFlags { fua: true })
            .await
            .unwrap();
        let large = pattern(3, 1 << 20);
        f.write(1 << 20, large.clone(), WriteFlags::default())
            .await
            .unwrap();
        // (A file system with non-blocking buffered writes may refuse to fill a hole
        // without waiting: then the small write goes through the ring too.)
        let s = f.driver_stats();
        assert_eq!(s.inline_writes + s.requests, 3, "{s:?}");
        let ring = s.requests;
        assert_reads(&f, 4096, &small, "inline read").await;
        assert_reads(&f, 65536, &fua, "inline read of the FUA write").await;
        assert_reads(&f, 1 << 20, &large, "ring read").await;
        let s = f.driver_stats();
        assert_eq!((s.inline_reads, s.requests), (2, ring + 1), "{s:?}");

        // Evict half of a cached range: the inline read stops where the cache does and
        // the ring reads the rest into the same buffer.
        let data = pattern(4, 64 << 10);
        f.write(2 << 20, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        f.flush().await.unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        // SAFETY: plain advice on a descriptor we own.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                (2 << 20) + (32 << 10),
                32 << 10,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        assert_reads(&f, 2 << 20, &data, "half cached").await;
        // And through a fresh cache, nothing cached at all.
        // SAFETY: as above.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_reads(&f, 4096, &small, "not cached").await;
        assert_reads(&f, 2 << 20, &data, "not cached").await;
    }

    /// Evicts `[offset, offset + len)` of `f`'s file from the page cache (after a
    /// flush, so the pages are clean and can go).
    async fn evict(f: &UringFile, offset: u64, len: u64) {
        f.flush().await.unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        // SAFETY: plain advice on a descriptor we own.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_ranges_only_of_what_the_page_cache_holds() {
        use std::os::unix::fs::FileExt;
        let (_dir, f) = buffered_file("cached", 4 << 20);
        let data = pattern(5, 1 << 20);
        f.write(1 << 20, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        // Written through the page cache: all of it is there.
        let r = f.cached_range(1 << 20, 1 << 20).await.unwrap().unwrap();
        assert_eq!((r.offset(), r.len()), (1 << 20, 1 << 20));
        let mut back = vec![0u8; 1 << 20];
        r.file().read_exact_at(&mut back, r.offset()).unwrap();
        assert_eq!(back, data);
        assert_eq!(f.driver_stats().cached_ranges, 1);

        // It holds no lock: a compare-and-write of the range goes ahead (and what the
        // range's file shows is then the new data, as a socket sending it later would).
        let f = Arc::new(f);
        let cmp = data.slice(0..4096);
        let out = f
            .compare_and_write(1 << 20, cmp, pattern(6, 4096), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(out, CompareOutcome::Written);
        r.file()
            .read_exact_at(&mut back[..4096], r.offset())
            .unwrap();
        assert_eq!(back[..4096], pattern(6, 4096)[..]);
        drop(r);

        // Evicted, then partly read back: the range is not all there, so none.
        evict(&f, 0, 4 << 20).await;
        assert!(f.cached_range(1 << 20, 1 << 20).await.unwrap().is_none());
        let mut want = data.to_vec();
        want[..4096].copy_from_slice(&pattern(6, 4096));
        // (Readahead may bring in more than was read, but not the whole megabyte.)
        assert_reads(&*f, 1 << 20, &want[..64 << 10], "the start").await;
        assert!(f.cached_range(1 << 20, 1 << 20).await.unwrap().is_none());
        assert!(f.cached_range(1 << 20, 64 << 10).await.unwrap().is_some());
        // Read back in full, it is all there again.
        assert_reads(&*f, 1 << 20, &want, "after eviction").await;
        assert!(f.cached_range(1 << 20, 1 << 20).await.unwrap().is_some());
        // The usual checks, as for a read.
        assert!(matches!(
            f.cached_range(100, 4096).await,
            Err(BlockError::Misaligned { .. })
        ));
        assert!(matches!(
            f.cached_range(4 << 20, 4096).await,
            Err(BlockError::OutOfRange { .. })
        ));
    }

    /// Nor are page-cache ranges handed out (`cached_range`), nor by devices that are
    /// not files.
    #[tokio::test]
    async fn inline_io_can_be_turned_off_and_never_applies_to_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        for (name, o) in [
            (
                "off",
                UringOptions {
                    cached_io_inline: false,
                    ..opts(DirectMode::Off, 512)
                },
            ),
            ("direct", opts(DirectMode::Require, 4096)),
        ] {
            let p = dir.path().join(name);
            create_sparse_file(&p, 1 << 20).unwrap();
            let f = match UringFile::open(&p, &o) {
                Ok(f) => f,
                // A file system without O_DIRECT (tmpfs): nothing to check there.
                Err(OpenError::DirectUnsupported { .. }) => continue,
                Err(e) => panic!("{e}"),
            };
            let data = pattern(5, 4096);
            f.write(0, data.clone(), WriteFlags::default())
                .await
                .unwrap();
            assert_reads(&f, 0, &data, name).await;
            let s = f.driver_stats();
            assert_eq!(
                (s.inline_reads, s.inline_writes, s.requests),
                (0, 0, 2),
                "{name}: {s:?}"
            );
            assert!(f.cached_range(0, 4096).await.unwrap().is_none(), "{name}");
        }
        let m = crate::MemDev::new(128, 512);
        assert!(m.cached_range(0, 4096).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_read_handed_to_the_ring_part_done_keeps_the_part_done() {
        // What the ring reads after a partial inline read: only the rest of the buffer.
        let (_dir, f) = buffered_file("rest", 1 << 20);
        let data = pattern(6, 64 << 10);
        f.write(8192, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        let mut buf = AlignedBuf::for_overwrite(64 << 10);
        buf.as_mut_slice()[..4096].fill(0xab);
        let c = f
            .driver
            .run_rest(Op::Read { buf, offset: 8192 }, 4096, None)
            .await
            .unwrap();
        c.result.unwrap();
        let Op::Read { buf, .. } = c.op else {
            panic!("not a read")
        };
        assert!(buf.as_slice()[..4096].iter().all(|&b| b == 0xab));
        assert_eq!(&buf.as_slice()[4096..], &data[4096..]);
    }

    #[tokio::test]
    async fn no_inline_io_once_the_driver_has_stopped() {
        let (_dir, f) = buffered_file("stopped", 1 << 20);
        let data = pattern(7, 4096);
        f.write(0, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        assert_reads(&f, 0, &data, "before").await;
        let before = f.driver_stats();
        f.driver.pretend_stopped();
        f.write(4096, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        assert_reads(&f, 4096, &data, "after").await;
        let after = f.driver_stats();
        assert_eq!(
            (after.inline_reads, after.inline_writes),
            (before.inline_reads, before.inline_writes),
            "{after:?}"
        );
        assert_eq!(after.requests, before.requests + 2, "{after:?}");
    }
}

//! The raw system interfaces the io_uring backend needs beyond the ring itself.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes. Missing from the libc
/// crate. The generic ioctl encoding (x86_64, aarch64, riscv64): direction `read` (2) in
/// bits 30-31, argument size in bits 16-29, type in bits 8-15, number in bits 0-7.
const BLKGETSIZE64: libc::Ioctl = ((2u64 << 30) | (8 << 16) | (0x12 << 8) | 114) as libc::Ioctl;

/// Logical sector size of a block device.
pub(super) fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live int.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut v) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(|_| io::Error::other("negative sector size"))
}

/// Physical sector size of a block device.
pub(super) fn physical_block_size(file: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKPBSZGET, &mut v) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Size of a block device in bytes.
pub(super) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut v) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Direct I/O alignment (memory, file offset) from statx, when the kernel (6.1+) and the
/// file system report it.
pub(super) fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: the path is a valid C string, stx a live statx buffer; AT_EMPTY_PATH makes
    // the call describe the descriptor itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Reads `buf.len()` bytes at `offset` with pread(2): used once at open to probe O_DIRECT.
pub(super) fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    // SAFETY: buf is valid for writes of buf.len() bytes for the duration of the call.
    let r = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Reads into `buf` at `offset` with `preadv2(RWF_NOWAIT)`: only what the page cache
/// holds, without waiting for the disk. EAGAIN means nothing could be read that way; a
/// short count means the rest is not cached.
pub(super) fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec describes `buf`, valid for writes of buf.len() bytes for the
    // duration of the call.
    let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `cachestat(2)` (Linux 6.5); the generic system call table gives it one number on
/// every architecture, and the `libc` crate does not list it for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether the page cache holds every page of `[offset, offset + len)` of `file`:
/// `Ok(false)` when some page is missing, an error when the kernel has no `cachestat`
/// (ENOSYS) or refuses the file.
pub(super) fn fully_cached(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live, properly laid out structs (`struct
    // cachestat_range` and `struct cachestat` of the kernel's uapi) for the duration of
    // the call; the kernel only writes `stat`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // Pages the range touches, partial ones at either end included.
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => 4096,
    };
    let pages = (offset + len).div_ceil(page) - offset / page;
    Ok(stat.nr_cache >= pages)
}

/// Writes `data` at `offset` with `pwritev2(flags)` until all is written or the kernel
/// fails; EINTR is retried. Returns how much was written and the error that stopped it.
pub(super) fn pwrite(file: &File, data: &[u8], offset: u64, flags: i32) -> (usize, io::Result<()>) {
    let mut done = 0;
    while done < data.len() {
        let Ok(off) = libc::off_t::try_from(offset + done as u64) else {
            return (done, Err(io::Error::other("offset too large")));
        };
        let rest = &data[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: the iovec describes `rest`, valid for reads of rest.len() bytes for the
        // duration of the call; the kernel only reads through it.
        let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (done, Err(e));
        }
        if r == 0 {
            return (
                done,
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write made no progress",
                )),
            );
        }
        done += r as usize;
    }
    (done, Ok(()))
}

/// Whether `file` lives on a local file system whose buffered writes wait only for
/// memory and the local disk: ext2/3/4 or tmpfs (`fstatfs` magic numbers).
pub(super) fn is_local_page_cache_fs(file: &File) -> bool {
    const EXT_SUPER_MAGIC: i64 = 0xEF53;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live statfs buffer the call fills in.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    matches!(magic, EXT_SUPER_MAGIC | TMPFS_MAGIC)
}

/// `lseek(2)` with `whence` (SEEK_DATA or SEEK_HOLE) from `offset`; `None` when the
/// kernel says ENXIO (no data, or no hole, at or after `offset`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    // SAFETY: plain system call on a descriptor we own. Only the descriptor's file
    // position changes, which nothing here uses (every I/O names its offset).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The runs of `[offset, end)` of a regular file that hold data, as `(start, end)` pairs
/// in address order, from SEEK_DATA and SEEK_HOLE; everything between them is a hole.
/// After `max_runs` runs the rest of the range is reported as one run of data (always
/// true), which bounds the work on a badly fragmented file. Metadata only, but it may
/// wait for the inode lock or read extent blocks: call it off the async runtime.
pub(super) fn data_runs(
    file: &File,
    offset: u64,
    end: u64,
    max_runs: usize,
) -> io::Result<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end {
        if runs.len() >= max_runs {
            runs.push((pos, end));
            break;
        }
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break; // only a hole (or the end of the file) after pos
        };
        if data >= end {
            break;
        }
        // A hole always follows data: at worst the virtual one at the end of the file.
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        if hole <= data {
            // Cannot happen on a sane file system; report the rest as data.
            runs.push((data, end));
            break;
        }
        runs.push((data, hole));
        pos = hole;
    }
    Ok(runs)
}

/// Major and minor numbers of a device number (glibc's encoding).
pub(super) fn major_minor(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// The sysfs directory of a block device (of the whole disk, for a partition).
fn sysfs_dir(major: u64, minor: u64) -> PathBuf {
    let dir = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if dir.join("partition").exists() {
        if let Ok(real) = dir.canonicalize() {
            if let Some(parent) = real.parent() {
                return parent.to_path_buf();
            }
        }
    }
    dir
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim().trim_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A queue attribute of a block device (`/sys/dev/block/M:m/queue/NAME`).
pub(super) fn queue_attr(major: u64, minor: u64, name: &str) -> Option<String> {
    read_trimmed(&sysfs_dir(major, minor).join("queue").join(name))
}

/// The serial number of a block device: SCSI/ATA/NVMe `device/serial`, then the
/// `wwid`s, then virtio's `serial`.
pub(super) fn serial(major: u64, minor: u64) -> Option<String> {
    let dir = sysfs_dir(major, minor);
    ["device/serial", "device/wwid", "wwid", "serial"]
        .iter()
        .find_map(|p| read_trimmed(&dir.join(p)))
}

/// A non-blocking, close-on-exec eventfd.
pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter.
pub(super) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. The only possible failure, EAGAIN at a
    // counter of u64::MAX - 1, means the reader is already due to wake.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkgetsize64_matches_the_kernel_header() {
        // linux/fs.h on x86_64: #define BLKGETSIZE64 _IOR(0x12,114,size_t) = 0x80081272.
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }

    #[test]
    fn device_numbers_decode() {
        // makedev(8, 1) and makedev(259, 65536).
        assert_eq!(major_minor(0x801), (8, 1));
        let (maj, min) = (259u64, 65536u64);
        let dev =
            ((maj & 0xfff) << 8) | ((maj & !0xfff) << 32) | (min & 0xff) | ((min & !0xff) << 12);
        assert_eq!(major_minor(dev), (maj, min));
    }
}

//! TAP devices: the switch holds the file descriptor, the device is the VM's NIC.
//!
//! The device is opened with `IFF_VNET_HDR` and told (`TUNSETOFFLOAD`) that its reader
//! handles partial checksums and TSO, so the kernel hands the switch whole 64 KiB TCP
//! segments with a virtio-net header instead of 1500-byte frames, and takes such
//! segments back: one read and one write move 64 KiB. There is no batch call for a TAP
//! descriptor, so each frame costs one `read` and one `writev`; the datapath reads up to
//! a batch of frames before it writes any.

use super::sys::{self, check, check_size, ifreq_ioctl, IfReq};
use crate::frame::{MacAddr, VNET_HDR_LEN};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// A TAP device whose descriptor the switch holds.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP device `name` in the calling thread's network
    /// namespace, non-blocking, with virtio-net headers and checksum/TSO offloads.
    pub fn create(name: &str) -> io::Result<Tap> {
        let path = sys::cstr("/dev/net/tun")?;
        // SAFETY: open(2) on a NUL-terminated path; the result is checked.
        let fd = check(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut r = IfReq::new(name)?;
        r.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ifreq_ioctl(fd.as_raw_fd(), TUNSETIFF, &mut r)
            .map_err(|e| io::Error::new(e.kind(), format!("creating TAP {name}: {e}")))?;
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is live.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) })?;
        let off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, off as libc::c_ulong) })?;
        Ok(Tap { fd, name: r.name() })
    }

    /// The device name it was created with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (for polling).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one frame, virtio-net header first. `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        check_size(unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    /// Writes one frame given as pieces, the virtio-net header first.
    pub fn send(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec`; the slices are live
        // for the call.
        check_size(unsafe {
            libc::writev(self.fd(), iov.as_ptr().cast(), iov.len() as libc::c_int)
        })
    }

    /// Writes one frame whose pieces are raw iovecs (the datapath's queued frames).
    pub(crate) fn send_iov(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the datapath's iovecs point into its receive buffers and queue
        // entries, which outlive the call.
        check_size(unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }

    /// The device's current MAC address, wherever the device is now: a TAP moved into
    /// another network namespace is looked up there (`TUNGETDEVNETNS`).
    pub fn device_mac(&self) -> io::Result<MacAddr> {
        let mut r = IfReq::new(&self.name)?;
        ifreq_ioctl(self.fd(), TUNGETIFF, &mut r)?;
        let name = r.name();
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new descriptor.
        let ns = check(unsafe { libc::ioctl(self.fd(), TUNGETDEVNETNS as _) })?;
        // SAFETY: `ns` is a fresh descriptor owned by nothing else.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        sys::in_netns_fd(ns.as_raw_fd(), move || {
            let s = sys::ctl_socket()?;
            sys::hwaddr(s.as_raw_fd(), &name)
        })
    }
}

//! Thin wrappers over the Linux calls the I/O layer needs: interface ioctls, network
//! namespaces, epoll and eventfd. Every `unsafe` block is here or in the port modules,
//! each with its reason.

use crate::frame::MacAddr;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub(crate) const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
pub(crate) const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
pub(crate) const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
pub(crate) const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
pub(crate) const SIOCGIFINDEX: libc::c_ulong = 0x8933;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct IfReq {
    pub name: [u8; 16],
    pub data: [u8; 24],
}

impl IfReq {
    pub fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > 15 || b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    pub fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_flags(&mut self, f: u16) {
        self.data[0..2].copy_from_slice(&f.to_ne_bytes());
    }

    pub fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    pub fn hwaddr(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.data[2..8]);
        MacAddr(m)
    }

    pub fn set_hwaddr(&mut self, mac: MacAddr) {
        self.data[0..2].copy_from_slice(&(libc::ARPHRD_ETHER).to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac.0);
    }
}

/// Converts a -1 return into the errno error.
pub(crate) fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Converts a -1 return of a size-returning call into the errno error.
pub(crate) fn check_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Issues an interface ioctl on `fd`.
pub(crate) fn ifreq_ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq` for the duration of the call,
    // which is the argument every SIOC*IF* request and TUN ioctl used here takes.
    check(unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) })?;
    Ok(())
}

/// A datagram socket for interface ioctls, in the calling thread's network namespace.
pub(crate) fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before being owned.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Interface flags (`IFF_*`) of `name`.
pub(crate) fn if_flags(sock: RawFd, name: &str) -> io::Result<u16> {
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(sock, SIOCGIFFLAGS, &mut r)?;
    Ok(r.flags())
}

/// Whether `name` is administratively up and has carrier (`IFF_UP` and `IFF_RUNNING`).
pub(crate) fn link_up(sock: RawFd, name: &str) -> io::Result<bool> {
    let f = if_flags(sock, name)?;
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as u16;
    Ok(f & want == want)
}

/// Brings `name` up.
pub(crate) fn set_up(sock: RawFd, name: &str) -> io::Result<()> {
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(sock, SIOCGIFFLAGS, &mut r)?;
    let f = r.flags() | libc::IFF_UP as u16;
    r.set_flags(f);
    ifreq_ioctl(sock, SIOCSIFFLAGS, &mut r)
}

/// The interface index of `name`.
pub(crate) fn ifindex(sock: RawFd, name: &str) -> io::Result<u32> {
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(sock, SIOCGIFINDEX, &mut r)?;
    Ok(r.int() as u32)
}

/// The MAC address of `name`.
pub(crate) fn hwaddr(sock: RawFd, name: &str) -> io::Result<MacAddr> {
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(sock, SIOCGIFHWADDR, &mut r)?;
    Ok(r.hwaddr())
}

/// Sets the MAC address of `name`.
pub(crate) fn set_hwaddr(sock: RawFd, name: &str, mac: MacAddr) -> io::Result<()> {
    let mut r = IfReq::new(name)?;
    r.set_hwaddr(mac);
    ifreq_ioctl(sock, SIOCSIFHWADDR, &mut r)
}

/// Runs `f` with the calling context's network namespace set to the one at `ns` (a
/// file like `/run/netns/NAME`), on a short-lived thread so the caller's own namespace
/// never changes. Sockets and devices made inside stay in that namespace. With `None`,
/// `f` runs here.
pub fn in_netns<T: Send>(
    ns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(ns) = ns else { return f() };
    let file = File::open(ns)?;
    in_netns_fd(file.as_raw_fd(), f)
}

/// Like [`in_netns`], with the namespace given as an open descriptor.
pub(crate) fn in_netns_fd<T: Send>(
    nsfd: RawFd,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a descriptor the caller keeps open; it changes only
            // this short-lived thread's network namespace.
            check(unsafe { libc::setns(nsfd, libc::CLONE_NEWNET) })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace helper thread panicked")))
    })
}

/// An epoll instance.
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2); checked before being owned.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh descriptor owned by nothing else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call.
        check(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn add(&self, fd: RawFd, token: u64, readable: bool) -> io::Result<()> {
        let ev = if readable { libc::EPOLLIN as u32 } else { 0 };
        self.ctl(libc::EPOLL_CTL_ADD, fd, ev, token)
    }

    pub fn modify(&self, fd: RawFd, token: u64, readable: bool) -> io::Result<()> {
        let ev = if readable { libc::EPOLLIN as u32 } else { 0 };
        self.ctl(libc::EPOLL_CTL_MOD, fd, ev, token)
    }

    pub fn delete(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: `events` is a writable array of `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        match check(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// An eventfd used to wake the datapath thread.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain eventfd(2); checked before being owned.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: fresh descriptor owned by nothing else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        let _ = unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Opens a path as a C string (for open(2)).
pub(crate) fn cstr(p: &str) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

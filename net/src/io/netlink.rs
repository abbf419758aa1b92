//! Link-state failure detection through rtnetlink.
//!
//! The datapath subscribes to `RTMGRP_LINK` and polls the netlink socket with its ports,
//! so a carrier loss (`ip link set ... down` on either end of a veth, a cable pull on a
//! NIC) reaches the teaming decision within microseconds of the kernel noticing, not at
//! the next tick of a poller. Sysfs polling (`/sys/class/net/*/carrier`) was the
//! alternative: simpler, but it bounds detection by the poll interval and costs a read
//! per uplink per tick. If the socket overflows (`ENOBUFS`), the datapath re-reads every
//! uplink's flags with `SIOCGIFFLAGS`.
//!
//! [`parse_link_messages`] is the parser for what the kernel sends; it checks every
//! length and is fuzzed with the frame parser.

use super::sys::{check, check_size};
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// A link's new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEvent {
    /// Interface index.
    pub ifindex: u32,
    /// Up and running (`IFF_UP` and `IFF_RUNNING`); false when deleted.
    pub up: bool,
    /// The interface was deleted (or left the namespace).
    pub deleted: bool,
}

/// Parses a buffer of netlink messages and calls `f` for each link message.
pub fn parse_link_messages(mut buf: &[u8], mut f: impl FnMut(LinkEvent)) {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return;
        }
        if (ty == RTM_NEWLINK || ty == RTM_DELLINK) && len >= NLMSG_HDRLEN + IFINFOMSG_LEN {
            let m = &buf[NLMSG_HDRLEN..];
            let ifindex = i32::from_ne_bytes([m[4], m[5], m[6], m[7]]);
            let flags = u32::from_ne_bytes([m[8], m[9], m[10], m[11]]);
            let want = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
            if ifindex > 0 {
                let deleted = ty == RTM_DELLINK;
                f(LinkEvent {
                    ifindex: ifindex as u32,
                    up: !deleted && flags & want == want,
                    deleted,
                });
            }
        }
        let step = (len + 3) & !3;
        if step >= buf.len() {
            return;
        }
        buf = &buf[step..];
    }
}

/// A netlink socket subscribed to link changes.
#[derive(Debug)]
pub struct LinkMonitor {
    fd: OwnedFd,
}

/// What reading the monitor found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRead {
    /// Events were delivered (possibly none).
    Events,
    /// Messages were lost: re-read every link's state.
    Overrun,
}

impl LinkMonitor {
    /// Opens the socket in the calling thread's network namespace, non-blocking.
    pub fn open() -> io::Result<LinkMonitor> {
        // SAFETY: plain socket(2); checked before being owned.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; fields set below.
        let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: binds to a live sockaddr_nl of the size given.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        })?;
        let sz: libc::c_int = 1 << 20;
        // SAFETY: passes a live int of the size given.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&sz as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        Ok(LinkMonitor { fd })
    }

    /// The descriptor (for polling).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads what is queued, calling `f` per link event; `buf` is scratch space.
    pub fn read(&self, buf: &mut [u8], mut f: impl FnMut(LinkEvent)) -> io::Result<LinkRead> {
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let r = check_size(unsafe {
                libc::recv(
                    self.fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            });
            match r {
                Ok(0) => return Ok(LinkRead::Events),
                Ok(n) => parse_link_messages(&buf[..n], &mut f),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(LinkRead::Events),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(LinkRead::Overrun),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, ifindex: i32, flags: u32) -> Vec<u8> {
        let mut m = vec![0u8; 32];
        m[0..4].copy_from_slice(&32u32.to_ne_bytes());
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m[16 + 4..16 + 8].copy_from_slice(&ifindex.to_ne_bytes());
        m[16 + 8..16 + 12].copy_from_slice(&flags.to_ne_bytes());
        m
    }

    #[test]
    fn parses_new_and_del_link() {
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
        let mut buf = msg(RTM_NEWLINK, 7, up);
        buf.extend(msg(RTM_NEWLINK, 8, libc::IFF_UP as u32));
        buf.extend(msg(RTM_DELLINK, 9, up));
        buf.extend(msg(20, 10, up));
        let mut ev = Vec::new();
        parse_link_messages(&buf, |e| ev.push(e));
        assert_eq!(
            ev,
            vec![
                LinkEvent {
                    ifindex: 7,
                    up: true,
                    deleted: false
                },
                LinkEvent {
                    ifindex: 8,
                    up: false,
                    deleted: false
                },
                LinkEvent {
                    ifindex: 9,
                    up: false,
                    deleted: true
                },
            ]
        );
        // Truncated and bogus lengths stop the walk without panicking.
        parse_link_messages(&buf[..40], |_| {});
        let mut bad = msg(RTM_NEWLINK, 1, up);
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        parse_link_messages(&bad, |_| panic!("no event from a bad length"));
    }
}

//! AF_PACKET sockets on host interfaces: uplinks, and attached interfaces.
//!
//! The socket is bound to one interface for every protocol, with `PACKET_VNET_HDR` (a
//! virtio-net header in front of each frame, so 64 KiB offloaded segments are read and
//! written whole), `PACKET_AUXDATA` (the kernel strips received VLAN tags into metadata;
//! the switch needs them back), `PACKET_IGNORE_OUTGOING` (the host's own transmissions
//! on the interface are not input), `PACKET_QDISC_BYPASS` (sends go straight to the
//! driver) and promiscuous membership. Frames move in batches with `recvmmsg` and
//! `sendmmsg`: one system call per batch.
//!
//! Why not a `TPACKET_V3` ring: with offloads on, most bytes travel as 64 KiB segments,
//! where the per-call cost is already amortised, and rings would need 64 KiB frames per
//! slot; `recvmmsg` gives the batching for small frames without that. (See the crate's
//! benchmark in `DESIGN.md`.)

use super::sys::{self, check, check_size};
use std::io::{self, IoSlice};
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_ushort = 1;
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// Options of a packet socket.
#[derive(Debug, Clone, Copy)]
pub struct PacketOptions {
    /// Frames carry a virtio-net header.
    pub vnet_hdr: bool,
    /// Receive frames for every MAC address.
    pub promiscuous: bool,
    /// Send straight to the driver, bypassing the qdisc.
    pub qdisc_bypass: bool,
    /// Socket buffer sizes in bytes.
    pub buffer_bytes: usize,
}

impl Default for PacketOptions {
    fn default() -> Self {
        PacketOptions {
            vnet_hdr: true,
            promiscuous: true,
            qdisc_bypass: true,
            buffer_bytes: 8 << 20,
        }
    }
}

#[repr(C)]
struct PacketMreq {
    mr_ifindex: libc::c_int,
    mr_type: libc::c_ushort,
    mr_alen: libc::c_ushort,
    mr_address: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

/// An AF_PACKET socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    name: String,
    vnet_hdr: bool,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a live int of the size given.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    })?;
    Ok(())
}

impl PacketSocket {
    /// Opens a packet socket on `ifname` (in the calling thread's namespace).
    pub fn open(ifname: &str, opts: PacketOptions) -> io::Result<PacketSocket> {
        let ctl = sys::ctl_socket()?;
        let ifindex = sys::ifindex(ctl.as_raw_fd(), ifname)
            .map_err(|e| io::Error::new(e.kind(), format!("interface {ifname}: {e}")))?;
        // SAFETY: plain socket(2); checked before being owned.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(ETH_P_ALL_BE),
            )
        })?;
        // SAFETY: fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        if opts.vnet_hdr {
            setsockopt_int(raw, libc::SOL_PACKET, PACKET_VNET_HDR, 1)?;
        }
        setsockopt_int(raw, libc::SOL_PACKET, PACKET_AUXDATA, 1)?;
        // Best effort: older kernels lack these.
        let _ = setsockopt_int(raw, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        if opts.qdisc_bypass {
            let _ = setsockopt_int(raw, libc::SOL_PACKET, PACKET_QDISC_BYPASS, 1);
        }
        let bytes = libc::c_int::try_from(opts.buffer_bytes).unwrap_or(libc::c_int::MAX);
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
        }
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes);
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL_BE;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binds to a live sockaddr_ll of the size given.
        check(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        })?;
        if opts.promiscuous {
            let mr = PacketMreq {
                mr_ifindex: ifindex as i32,
                mr_type: PACKET_MR_PROMISC,
                mr_alen: 0,
                mr_address: [0; 8],
            };
            // SAFETY: passes a live packet_mreq of the size given.
            check(unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_PACKET,
                    PACKET_ADD_MEMBERSHIP,
                    (&mr as *const PacketMreq).cast(),
                    size_of::<PacketMreq>() as u32,
                )
            })?;
        }
        Ok(PacketSocket {
            fd,
            ifindex,
            name: ifname.to_string(),
            vnet_hdr: opts.vnet_hdr,
        })
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (for polling).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether frames carry a virtio-net header.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Receives up to `batch.capacity()` frames in one call. Returns how many; each is
    /// `batch.frame(i)` with its VLAN tag (stripped by the kernel) in `batch.tci(i)`.
    pub fn recv_batch(&self, batch: &mut RxBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: `prepare` pointed every mmsghdr at buffers owned by `batch`, which
        // live until the call returns; the kernel writes within the lengths given.
        let n = check(unsafe {
            libc::recvmmsg(
                self.fd(),
                batch.msgs.as_mut_ptr(),
                batch.slots as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })? as usize;
        batch.finish(n);
        Ok(n)
    }

    /// Receives one frame into `buf` (virtio-net header first if enabled) with its VLAN
    /// tag. A convenience for tests and slow paths.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Option<u16>)> {
        let mut b = RxBatch::with_slots(1, buf.len());
        let n = self.recv_batch(&mut b)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let f = b.raw(0);
        buf[..f.len()].copy_from_slice(f);
        Ok((f.len(), b.tci(0)))
    }

    /// Sends one frame given as pieces (virtio-net header first if enabled).
    pub fn send(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; iov fields point at live slices.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: `IoSlice` is ABI-compatible with iovec; everything lives for the call.
        check_size(unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_DONTWAIT) })
    }

    /// Sends prepared messages in one call; returns how many went.
    pub(crate) fn send_batch(&self, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
        // SAFETY: the caller's mmsghdrs point at iovecs and buffers that outlive the call.
        let n = check(unsafe {
            libc::sendmmsg(
                self.fd(),
                msgs.as_mut_ptr(),
                msgs.len() as u32,
                libc::MSG_DONTWAIT,
            )
        })?;
        Ok(n as usize)
    }
}

/// Receive buffers for a batch of frames, reused for every call (no allocation per
/// frame). Each slot holds one frame of up to `slot_size` bytes.
pub struct RxBatch {
    slots: usize,
    slot_size: usize,
    buf: Box<[u8]>,
    cmsg: Box<[u64]>,
    iov: Box<[libc::iovec]>,
    msgs: Box<[libc::mmsghdr]>,
    lens: Box<[usize]>,
    tcis: Box<[Option<u16>]>,
}

// SAFETY: the raw pointers inside `iov` and `msgs` only ever point into the batch's own
// boxed buffers; they are rewritten before each use.
unsafe impl Send for RxBatch {}

const CMSG_WORDS: usize = 8;

impl RxBatch {
    /// Buffers for `slots` frames of up to `slot_size` bytes.
    pub fn with_slots(slots: usize, slot_size: usize) -> RxBatch {
        RxBatch {
            slots,
            slot_size,
            buf: vec![0u8; slots * slot_size].into_boxed_slice(),
            cmsg: vec![0u64; slots * CMSG_WORDS].into_boxed_slice(),
            iov: (0..slots)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
            msgs: (0..slots)
                .map(|_| unsafe { zeroed::<libc::mmsghdr>() })
                .collect(),
            lens: vec![0; slots].into_boxed_slice(),
            tcis: vec![None; slots].into_boxed_slice(),
        }
    }

    /// How many frames one call can take.
    pub fn capacity(&self) -> usize {
        self.slots
    }

    /// The size of one slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    fn prepare(&mut self) {
        let base = self.buf.as_mut_ptr();
        let cbase = self.cmsg.as_mut_ptr();
        for i in 0..self.slots {
            // SAFETY: `i * slot_size` and `i * CMSG_WORDS` stay inside the boxed buffers.
            let (b, c) = unsafe { (base.add(i * self.slot_size), cbase.add(i * CMSG_WORDS)) };
            self.iov[i] = libc::iovec {
                iov_base: b.cast(),
                iov_len: self.slot_size,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = c.cast();
            h.msg_controllen = CMSG_WORDS * 8;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
    }

    fn finish(&mut self, n: usize) {
        for i in 0..n {
            self.lens[i] = (self.msgs[i].msg_len as usize).min(self.slot_size);
            self.tcis[i] = None;
            let h = &self.msgs[i].msg_hdr;
            // SAFETY: walks the control messages the kernel wrote into slot i's control
            // buffer, within `msg_controllen`, using the libc CMSG helpers.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                        let aux: TpacketAuxdata =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                        if aux.tp_status & TP_STATUS_VLAN_VALID != 0 {
                            self.tcis[i] = Some(aux.tp_vlan_tci);
                        }
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
        }
    }

    /// Frame `i` of the last receive as read (virtio-net header first if enabled).
    pub fn raw(&self, i: usize) -> &[u8] {
        &self.buf[i * self.slot_size..i * self.slot_size + self.lens[i]]
    }

    /// Slot `i` for filling by hand (TAP reads); set its length with `set_len`.
    pub(crate) fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot_size..(i + 1) * self.slot_size]
    }

    pub(crate) fn set_len(&mut self, i: usize, len: usize, tci: Option<u16>) {
        self.lens[i] = len.min(self.slot_size);
        self.tcis[i] = tci;
    }

    /// The VLAN tag the kernel stripped from frame `i`, if any.
    pub fn tci(&self, i: usize) -> Option<u16> {
        self.tcis[i]
    }
}

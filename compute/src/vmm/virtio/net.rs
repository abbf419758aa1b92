//! virtio-net on a TAP device.
//!
//! The TAP comes from the daemon (the vSwitch helper creates it in a port group and
//! hands the fd over) or is opened by name ([`Tap::open`]). Frames cross as they are:
//! when the TAP has `IFF_VNET_HDR` with a 12-byte header (what [`Tap::open`] sets up),
//! the virtio-net header passes through untouched, as in Firecracker; otherwise the
//! worker strips it on transmit and writes a zero header on receive. No offloads are
//! offered (no checksum, TSO or mergeable buffers), so every frame fits one receive
//! chain of at least 1526 bytes.

use super::{
    read_config_bytes, wait, ActivateContext, ActivateError, VirtioDevice, Worker, F_VERSION_1,
    INT_VRING, STOP_TOKEN, TYPE_NET,
};
use crate::vmm::memory::GuestMem;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;

/// The virtio-net header length with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
const MAX_FRAME: usize = 65562;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    vnet_hdr: bool,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP `name` with a 12-byte virtio-net header and no
    /// offloads. Creating needs CAP_NET_ADMIN; attaching to a persistent TAP owned by
    /// this user does not.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad TAP name {name:?}"),
            ));
        }
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: plain open(2) of a NUL-terminated path; the fd is owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq matches in size and
        // layout (16-byte name, flags, padding to 40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap {
            file,
            vnet_hdr: true,
            name: name.to_string(),
        };
        tap.setup_vnet_hdr()?;
        Ok(tap)
    }

    /// Takes a TAP fd handed over by the daemon. Whether it carries virtio-net headers
    /// is read back from the device (TUNGETIFF); the fd is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills an ifreq, which IfReq matches.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let tap = Tap {
            file,
            vnet_hdr: req.flags & IFF_VNET_HDR != 0,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        };
        if tap.vnet_hdr {
            tap.setup_vnet_hdr()?;
        }
        Ok(tap)
    }

    fn setup_vnet_hdr(&self) -> io::Result<()> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value; 0 = no offloads.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The fd, for handing the TAP to a VMM process (`--nic ID=fd:N`).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether frames carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Counters of one NIC (monotonic).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Bytes sent by the guest (without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames dropped (too large for the guest's buffer, or TAP write errors).
    pub dropped: AtomicU64,
}

/// A virtio-net device.
pub struct Net {
    id: String,
    tap: Arc<Tap>,
    mac: [u8; 6],
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    /// A NIC with MAC `mac` on `tap`.
    pub fn new(id: &str, tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            id: id.to_string(),
            tap: Arc::new(tap),
            mac,
            counters: Arc::default(),
            worker: None,
        }
    }

    /// The NIC's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6] = 1; // VIRTIO_NET_S_LINK_UP
        read_config_bytes(&c, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 || ctx.queue_evts.len() != 2 {
            return Err(ActivateError::Queues {
                expected: 2,
                got: ctx.queues.len(),
            });
        }
        self.worker = None;
        let tap = self.tap.clone();
        let tx_q = ctx.queues.remove(1);
        let rx_q = ctx.queues.remove(0);
        let tx_evt = ctx.queue_evts.remove(1);
        let rx_evt = ctx.queue_evts.remove(0);
        let fds = vec![
            (rx_evt.as_raw_fd(), RX_TOKEN),
            (tx_evt.as_raw_fd(), TX_TOKEN),
            (tap.raw_fd(), TAP_TOKEN),
        ];
        let mut io = NetIo {
            mem: ctx.mem,
            rx_q,
            tx_q,
            tap,
            counters: self.counters.clone(),
            pending: None,
            tap_armed: true,
        };
        let irq = ctx.irq;
        self.worker = Some(Worker::spawn(
            &format!("net-{}", self.id),
            fds,
            move |epoll| {
                let mut events = vec![EpollEvent::default(); 8];
                loop {
                    let tokens = wait(&epoll, &mut events);
                    let mut notify = false;
                    for t in tokens {
                        match t {
                            STOP_TOKEN => return,
                            RX_TOKEN => {
                                let _ = rx_evt.read();
                                notify |= io.rx(&epoll);
                            }
                            TX_TOKEN => {
                                let _ = tx_evt.read();
                                notify |= io.tx();
                            }
                            TAP_TOKEN => notify |= io.rx(&epoll),
                            _ => {}
                        }
                    }
                    if notify {
                        irq.trigger(INT_VRING);
                    }
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        // The worker goes; the TAP stays, so the driver can activate the NIC again.
        self.worker = None;
    }
}

struct NetIo {
    mem: GuestMem,
    rx_q: Queue,
    tx_q: Queue,
    tap: Arc<Tap>,
    counters: Arc<NetCounters>,
    /// A frame read from the TAP that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    tap_armed: bool,
}

impl NetIo {
    fn arm_tap(&mut self, epoll: &Epoll, on: bool) {
        if self.tap_armed == on {
            return;
        }
        let set = if on { EventSet::IN } else { EventSet::empty() };
        let _ = epoll.ctl(
            ControlOperation::Modify,
            self.tap.raw_fd(),
            EpollEvent::new(set, TAP_TOKEN),
        );
        self.tap_armed = on;
    }

    /// Moves frames from the TAP into receive buffers; true when the guest should be
    /// interrupted.
    fn rx(&mut self, epoll: &Epoll) -> bool {
        let mut used = false;
        let mut buf = vec![0u8; MAX_FRAME + VNET_HDR_LEN];
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let off = if self.tap.vnet_hdr { 0 } else { VNET_HDR_LEN };
                    match (&self.tap.file).read(&mut buf[off..]) {
                        Ok(n) => {
                            if off > 0 {
                                buf[..VNET_HDR_LEN].fill(0);
                            }
                            buf[..off + n].to_vec()
                        }
                        Err(_) => break, // EAGAIN: drained.
                    }
                }
            };
            let Some(chain) = self.rx_q.pop_descriptor_chain(&self.mem) else {
                // No buffer: keep the frame, stop listening to the TAP until the guest
                // posts buffers.
                self.pending = Some(frame);
                self.arm_tap(epoll, false);
                return used;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain {
                if !d.is_write_only() || written >= frame.len() {
                    continue;
                }
                let n = (d.len() as usize).min(frame.len() - written);
                if self
                    .mem
                    .write_slice(&frame[written..written + n], d.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            if written < frame.len() {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let _ = self.rx_q.add_used(&self.mem, head, 0);
            } else {
                // num_buffers = 1 (bytes 10..12 of the header).
                if let Some(first) = self.first_writable(head) {
                    let _ = self.mem.write_obj(1u16, GuestAddress(first.0 + 10));
                }
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .rx_bytes
                    .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                let _ = self.rx_q.add_used(&self.mem, head, written as u32);
            }
            used = true;
        }
        self.arm_tap(epoll, true);
        used && self.rx_q.needs_notification(&self.mem).unwrap_or(true)
    }

    fn first_writable(&self, head: u16) -> Option<GuestAddress> {
        // Descriptor table entry `head`: addr u64 at +0, flags u16 at +12.
        let table = GuestAddress(self.rx_q.desc_table());
        let entry = GuestAddress(table.0 + 16 * u64::from(head));
        let addr: u64 = self.mem.read_obj(entry).ok()?;
        Some(GuestAddress(addr))
    }

    /// Sends every frame the guest queued; true when the guest should be interrupted.
    fn tx(&mut self) -> bool {
        let mut used = false;
        while let Some(chain) = self.tx_q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut frame = Vec::new();
            for d in chain {
                if d.is_write_only() || frame.len() + d.len() as usize > MAX_FRAME + VNET_HDR_LEN {
                    continue;
                }
                let start = frame.len();
                frame.resize(start + d.len() as usize, 0);
                if self.mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                    frame.truncate(start);
                }
            }
            if frame.len() > VNET_HDR_LEN {
                let out = if self.tap.vnet_hdr {
                    &frame[..]
                } else {
                    &frame[VNET_HDR_LEN..]
                };
                // A TAP write takes the whole frame or fails; it is never partial.
                match (&self.tap.file).write(out) {
                    Ok(n) if n == out.len() => {
                        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .tx_bytes
                            .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    _ => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = self.tx_q.add_used(&self.mem, head, 0);
            used = true;
        }
        used && self.tx_q.needs_notification(&self.mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::virtio::test_utils::{Desc, TestDriver};

    /// A TAP (needs root / CAP_NET_ADMIN) and a packet socket bound to it, so the test
    /// plays the switch side.
    struct Peer {
        fd: OwnedFd,
    }

    impl Peer {
        fn bind(ifname: &str) -> Self {
            // Bring the interface up.
            let st = std::process::Command::new("ip")
                .args(["link", "set", ifname, "up"])
                .status()
                .expect("ip");
            assert!(st.success());
            // SAFETY: socket(2) with constant arguments.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = CString::new(ifname).expect("name");
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index > 0);
            // SAFETY: sockaddr_ll is plain data; zero is a valid bit pattern.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sa.sll_ifindex = index as i32;
            // SAFETY: bind with a correctly sized sockaddr_ll.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            Peer { fd }
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: send from a valid buffer on our socket.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                n as usize,
                frame.len(),
                "send: {}",
                io::Error::last_os_error()
            );
        }

        /// Receives frames until one has `ethertype`.
        fn recv_type(&self, ethertype: u16) -> Vec<u8> {
            let mut buf = vec![0u8; 2048];
            loop {
                // SAFETY: recv into a valid buffer on our socket.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                assert!(n > 0, "recv: {}", io::Error::last_os_error());
                let f = &buf[..n as usize];
                if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ethertype {
                    return f.to_vec();
                }
            }
        }
    }

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_cross_between_queue_and_tap() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            panic!("/dev/net/tun is missing: this test needs the tun driver and root");
        }
        let name = format!("bvn{}", std::process::id() % 100_000);
        let tap = Tap::open(&name).expect("open TAP (needs root)");
        assert!(tap.vnet_hdr());
        let mac = [0x02, 0xba, 0, 0, 0, 1];
        let net = Net::new("n0", tap, mac);
        let counters = net.counters();
        let mut drv = TestDriver::new(Box::new(net), &[F_MAC, F_STATUS]);
        assert_eq!(drv.config_u32(0).to_le_bytes()[..4], mac[..4]);
        let peer = Peer::bind(&name);

        // Guest -> TAP: header + frame in two descriptors.
        let payload = b"hello from the guest side";
        let hdr = drv.alloc(VNET_HDR_LEN);
        let f = frame([0xff; 6], mac, payload);
        let data = drv.alloc_bytes(&f);
        drv.submit(
            1,
            &[
                Desc::r(hdr, VNET_HDR_LEN as u32),
                Desc::r(data, f.len() as u32),
            ],
        );
        drv.wait_used(1, 1);
        let got = peer.recv_type(0x88b5);
        assert_eq!(&got[..f.len()], &f[..]);

        // TAP -> guest: post a receive buffer, send from the peer.
        let rx = drv.alloc(2048);
        drv.submit(0, &[Desc::w(rx, 2048)]);
        let back = frame(mac, [0x02, 0, 0, 0, 0, 9], b"and back to the guest");
        peer.send(&back);
        let used = loop {
            let u = drv.wait_used(0, 1);
            let bytes = drv.read_bytes(rx, u[0].1 as usize);
            if bytes.len() > VNET_HDR_LEN
                && bytes[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5]
            {
                break bytes;
            }
            // Something else (IPv6 router solicitation...) came first: repost.
            drv.submit(0, &[Desc::w(rx, 2048)]);
        };
        assert_eq!(&used[VNET_HDR_LEN..], &back[..]);
        // A driver reset keeps the TAP: after renegotiating, frames still go out.
        drv.reinit(&[F_MAC, F_STATUS]);
        let data = drv.alloc_bytes(&f);
        let hdr = drv.alloc(VNET_HDR_LEN);
        drv.submit(
            1,
            &[
                Desc::r(hdr, VNET_HDR_LEN as u32),
                Desc::r(data, f.len() as u32),
            ],
        );
        drv.wait_used(1, 1);
        assert_eq!(&peer.recv_type(0x88b5)[..f.len()], &f[..]);
        assert_eq!(u16::from_le_bytes([used[10], used[11]]), 1, "num_buffers");
        assert!(counters.tx_frames.load(Ordering::Relaxed) >= 1);
        assert!(counters.rx_frames.load(Ordering::Relaxed) >= 1);
    }
}

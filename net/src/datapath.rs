//! The datapath: one dedicated thread per switch that moves frames between the port
//! devices and the switching core.
//!
//! **Why a thread and not tokio tasks.** The work is a tight loop of non-blocking
//! system calls on a set of descriptors that only this loop touches, with batches that
//! must complete (read a batch, decide, write it out) before buffers are reused. A
//! dedicated thread gives that loop one warm core, one set of preallocated buffers and
//! no task wake-ups, no cross-thread wakers and no cooperative budget between
//! frames; it never competes with the daemon's API for a runtime worker. The control
//! plane talks to it through a channel plus an eventfd in the same epoll set, so a
//! configuration change lands between two batches and never drops unrelated traffic.
//!
//! **The loop.** `epoll_wait` over every port descriptor (level-triggered), the
//! rtnetlink socket and the wake-up eventfd. A readable port is serviced with one batch:
//! up to 32 frames (`recvmmsg` on AF_PACKET, `read` per frame on a TAP, which has no
//! batch call), each decided by [`Pipeline::process`] and queued on its output ports as
//! iovecs that point into the receive buffer (a VLAN tag is inserted or removed by
//! splitting the iovec, never by copying the frame); then every output queue is
//! flushed (`sendmmsg` on AF_PACKET, `writev` per frame on a TAP). Nothing is allocated
//! per frame: the receive buffers, queues and the core's output list are made once.
//!
//! **Priority.** Every frame between two ports passes through this one thread, so a
//! thread that waits for a CPU delays every flow. It runs at nice -10 by default
//! ([`crate::SwitchOptions::nice`]), as a storage appliance's network stack should
//! against batch work on the same host; it sleeps in `epoll_wait` whenever no port is
//! readable, so the priority costs nothing when idle.
//!
//! **Shaping** delays instead of dropping: a shaped port whose buckets are empty is
//! taken out of the epoll set until they refill, so its frames wait in the port's own
//! queue and the sender's socket buffer holds its TCP back, without losses.

use crate::counters::{DropReason, PortCounters};
use crate::frame::{self, MacAddr, VnetHdr, RARP_LEN, VNET_HDR_LEN};
use crate::io::packet::{PacketSocket, RxBatch};
use crate::io::sys::{self, Epoll, EventFd};
use crate::io::tap::Tap;
use crate::io::{LinkEvent, LinkMonitor};
use crate::pipeline::{Config, LearnedMac, Pipeline, PortId, PortView};
use crate::vlan::Egress;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Frames per receive batch.
pub const BATCH: usize = 32;
/// Bytes per receive slot: a virtio-net header and a 64 KiB segment, with room to spare.
pub const SLOT: usize = 65_536 + 512;

const TOKEN_WAKE: u64 = u64::MAX;
const TOKEN_LINKS: u64 = u64::MAX - 1;
const TICK_NS: u64 = 1_000_000_000;

/// The device behind a port.
#[derive(Debug)]
pub(crate) enum PortIo {
    /// A TAP the switch holds.
    Tap(Tap),
    /// A packet socket on an interface.
    Packet(PacketSocket),
}

impl PortIo {
    fn fd(&self) -> RawFd {
        match self {
            PortIo::Tap(t) => t.fd(),
            PortIo::Packet(p) => p.fd(),
        }
    }

    fn device(&self) -> &str {
        match self {
            PortIo::Tap(t) => t.name(),
            PortIo::Packet(p) => p.name(),
        }
    }

    fn ifindex(&self) -> u32 {
        match self {
            PortIo::Tap(_) => 0,
            PortIo::Packet(p) => p.ifindex(),
        }
    }
}

/// A port handed to the datapath.
#[derive(Debug)]
pub(crate) struct NewPort {
    pub id: PortId,
    pub io: PortIo,
    pub uplink: bool,
}

/// What the datapath reports about itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct DatapathStatus {
    pub ports: Vec<PortView>,
    pub teams: Vec<Vec<PortId>>,
    pub learned: Vec<LearnedMac>,
}

/// Messages from the control plane.
pub(crate) enum Command {
    Update {
        config: Config,
        add: Vec<NewPort>,
        remove: Vec<PortId>,
        done: SyncSender<()>,
    },
    GuestMac {
        port: PortId,
        mac: MacAddr,
    },
    Status {
        reply: SyncSender<DatapathStatus>,
    },
    Stop,
}

/// The control plane's end: a channel, the wake-up, and the thread.
pub(crate) struct Handle {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Sends a command and wakes the thread.
    pub fn send(&self, cmd: Command) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::other("the datapath thread has stopped"))?;
        self.wake.wake();
        Ok(())
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a datapath thread for switch `name`; its netlink and control sockets are
/// made in `netns` (or here).
pub(crate) fn spawn(name: &str, netns: Option<&Path>, nice: i32) -> io::Result<Handle> {
    let (links, ctl) = sys::in_netns(netns, || Ok((LinkMonitor::open()?, sys::ctl_socket()?)))?;
    let epoll = Epoll::new()?;
    let wake = Arc::new(EventFd::new()?);
    epoll.add(wake.fd(), TOKEN_WAKE, true)?;
    epoll.add(links.fd(), TOKEN_LINKS, true)?;
    let (tx, rx) = mpsc::channel();
    let w = wake.clone();
    let thread = std::thread::Builder::new()
        .name(format!("net-{name}"))
        .spawn(move || {
            if nice != 0 {
                // SAFETY: gettid and setpriority(2) on this thread's own id; no memory
                // is passed.
                let r = unsafe {
                    let tid = libc::gettid();
                    libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
                };
                if r != 0 {
                    tracing::debug!(nice, "cannot raise the datapath thread's priority");
                }
            }
            let mut dp = Datapath::new(epoll, w, rx, links, ctl);
            if let Err(e) = dp.run() {
                tracing::error!(error = %e, "switch datapath stopped");
            }
        })?;
    Ok(Handle {
        tx,
        wake,
        thread: Some(thread),
    })
}

struct TxEntry {
    hdr: [u8; VNET_HDR_LEN],
    tag: [u8; 4],
    iov: [libc::iovec; 4],
    niov: usize,
    bytes: usize,
}

/// Frames queued for one output port; the iovecs point into the receive batch and into
/// the entries themselves, so the queue is flushed before the batch is reused.
struct TxQueue {
    entries: Box<[TxEntry]>,
    msgs: Box<[libc::mmsghdr]>,
    len: usize,
}

impl TxQueue {
    fn new() -> TxQueue {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        TxQueue {
            entries: (0..BATCH)
                .map(|_| TxEntry {
                    hdr: [0; VNET_HDR_LEN],
                    tag: [0; 4],
                    iov: [empty; 4],
                    niov: 0,
                    bytes: 0,
                })
                .collect(),
            // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
            msgs: (0..BATCH)
                .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
                .collect(),
            len: 0,
        }
    }

    /// Queues `frame` (which starts at the Ethernet header) tagged as `egress` asks.
    /// `inline_tag`: the frame carries its tag after the source MAC.
    fn push(&mut self, frame: &[u8], vnet: &VnetHdr, inline_tag: bool, egress: Egress) {
        let e = &mut self.entries[self.len];
        let mut h = *vnet;
        let p = frame.as_ptr() as *mut libc::c_void;
        let iov = |base: *mut libc::c_void, len: usize| libc::iovec {
            iov_base: base,
            iov_len: len,
        };
        // The frame parser guarantees 14 bytes, and 18 when `inline_tag` is set.
        let rest_off = if inline_tag { 16 } else { 12 };
        let rest_slice = frame.get(rest_off..).unwrap_or_default();
        let tail = rest_slice.len();
        let rest = rest_slice.as_ptr() as *mut libc::c_void;
        e.iov[0] = iov(e.hdr.as_mut_ptr().cast(), VNET_HDR_LEN);
        match egress {
            Egress::Untagged if !inline_tag => {
                e.iov[1] = iov(p, frame.len());
                e.niov = 2;
                e.bytes = frame.len();
            }
            Egress::Untagged => {
                e.iov[1] = iov(p, 12);
                e.iov[2] = iov(rest, tail);
                e.niov = 3;
                e.bytes = 12 + tail;
                h.shift(-4);
            }
            Egress::Tagged(t) => {
                e.tag = [0x81, 0x00, (t >> 8) as u8, t as u8];
                e.iov[1] = iov(p, 12);
                e.iov[2] = iov(e.tag.as_mut_ptr().cast(), 4);
                e.iov[3] = iov(rest, tail);
                e.niov = 4;
                e.bytes = 16 + tail;
                if !inline_tag {
                    h.shift(4);
                }
            }
        }
        h.write(&mut e.hdr);
        self.len += 1;
    }

    fn full(&self) -> bool {
        self.len == self.entries.len()
    }

    /// Sends everything queued on `io`, counting on `c`.
    fn flush(&mut self, io: &PortIo, c: &PortCounters) {
        if self.len == 0 {
            return;
        }
        match io {
            PortIo::Tap(t) => {
                for e in &self.entries[..self.len] {
                    match t.send_iov(&e.iov[..e.niov]) {
                        Ok(_) => c.tx(e.bytes),
                        Err(_) => c.dropped(DropReason::TxError),
                    }
                }
            }
            PortIo::Packet(p) => {
                for i in 0..self.len {
                    let e = &mut self.entries[i];
                    let h = &mut self.msgs[i].msg_hdr;
                    h.msg_iov = e.iov.as_mut_ptr();
                    h.msg_iovlen = e.niov;
                }
                let mut off = 0;
                let mut retried = false;
                while off < self.len {
                    match p.send_batch(&mut self.msgs[off..self.len]) {
                        Ok(n) if n > 0 => {
                            for e in &self.entries[off..off + n] {
                                c.tx(e.bytes);
                            }
                            off += n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && !retried => {
                            // The socket's send buffer is full: wait briefly for room
                            // (back-pressure) before giving up on the rest.
                            retried = true;
                            let mut pfd = libc::pollfd {
                                fd: p.fd(),
                                events: libc::POLLOUT,
                                revents: 0,
                            };
                            // SAFETY: polls one live pollfd.
                            unsafe { libc::poll(&mut pfd, 1, 2) };
                        }
                        _ => {
                            // Skip the frame that failed and carry on with the rest.
                            c.dropped(DropReason::TxError);
                            off += 1;
                        }
                    }
                }
            }
        }
        self.len = 0;
    }
}

struct DpPort {
    io: PortIo,
    uplink: bool,
    ifindex: u32,
    armed: bool,
    until: Option<u64>,
    counters: Arc<PortCounters>,
}

struct Datapath {
    epoll: Epoll,
    wake: Arc<EventFd>,
    cmds: Receiver<Command>,
    links: LinkMonitor,
    ctl: OwnedFd,
    pipeline: Pipeline,
    ports: Vec<Option<DpPort>>,
    txq: Vec<Option<TxQueue>>,
    rx: RxBatch,
    dirty: Vec<PortId>,
    link_events: Vec<LinkEvent>,
    nlbuf: Vec<u8>,
    start: Instant,
    next_tick: u64,
}

/// The bytes a frame takes on the wire once segmented.
fn wire_len(h: &VnetHdr, len: usize) -> u64 {
    let hl = usize::from(h.hdr_len);
    let gs = usize::from(h.gso_size);
    if h.gso_type != frame::VNET_GSO_NONE && gs > 0 && hl > 0 && len > hl {
        let payload = len - hl;
        (payload + payload.div_ceil(gs) * hl) as u64
    } else {
        len as u64
    }
}

impl Datapath {
    fn new(
        epoll: Epoll,
        wake: Arc<EventFd>,
        cmds: Receiver<Command>,
        links: LinkMonitor,
        ctl: OwnedFd,
    ) -> Datapath {
        Datapath {
            epoll,
            wake,
            cmds,
            links,
            ctl,
            pipeline: Pipeline::new(),
            ports: Vec::new(),
            txq: Vec::new(),
            rx: RxBatch::with_slots(BATCH, SLOT),
            dirty: Vec::with_capacity(crate::pipeline::MAX_PORTS),
            link_events: Vec::with_capacity(64),
            nlbuf: vec![0; 64 << 10],
            start: Instant::now(),
            next_tick: TICK_NS,
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let now = self.now();
            let mut deadline = self.next_tick;
            for p in self.ports.iter().flatten() {
                if let Some(t) = p.until {
                    deadline = deadline.min(t);
                }
            }
            let timeout = deadline.saturating_sub(now).div_ceil(1_000_000).min(1000) as i32;
            let n = self.epoll.wait(&mut events, timeout)?;
            for ev in events.iter().take(n) {
                let token = ev.u64;
                match token {
                    TOKEN_WAKE => {
                        self.wake.drain();
                        if !self.commands() {
                            return Ok(());
                        }
                    }
                    TOKEN_LINKS => self.read_links(),
                    id => self.service(id as PortId),
                }
            }
            self.housekeeping();
        }
    }

    /// Handles queued commands; false on Stop.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Command::Stop => return false,
                Command::Update {
                    config,
                    add,
                    remove,
                    done,
                } => {
                    self.update(config, add, remove);
                    let _ = done.send(());
                }
                Command::GuestMac { port, mac } => {
                    let now = self.now();
                    self.pipeline.device_mac(port, mac, now);
                }
                Command::Status { reply } => {
                    let now = self.now();
                    let _ = reply.send(DatapathStatus {
                        ports: self.pipeline.ports(),
                        teams: self.pipeline.team_uplinks(),
                        learned: self.pipeline.learned(now, 1024),
                    });
                }
            }
        }
        true
    }

    fn update(&mut self, config: Config, add: Vec<NewPort>, remove: Vec<PortId>) {
        for id in remove {
            if let Some(p) = self.ports.get_mut(usize::from(id)).and_then(Option::take) {
                self.epoll.delete(p.io.fd());
                tracing::debug!(port = id, device = p.io.device(), "port removed");
            }
        }
        let now = self.now();
        let counters: Vec<Option<Arc<PortCounters>>> = config
            .ports
            .iter()
            .map(|p| p.as_ref().map(|p| p.counters.clone()))
            .collect();
        self.pipeline.set_config(config, now);
        let mut new_uplinks = Vec::new();
        for np in add {
            let i = usize::from(np.id);
            if self.ports.len() <= i {
                self.ports.resize_with(i + 1, || None);
                self.txq.resize_with(i + 1, || None);
            }
            if self.txq[i].is_none() {
                self.txq[i] = Some(TxQueue::new());
            }
            if let Err(e) = self.epoll.add(np.io.fd(), u64::from(np.id), true) {
                tracing::error!(error = %e, device = np.io.device(), "cannot poll port");
            }
            if np.uplink {
                new_uplinks.push((np.id, np.io.device().to_string()));
            }
            self.ports[i] = Some(DpPort {
                ifindex: np.io.ifindex(),
                io: np.io,
                uplink: np.uplink,
                armed: true,
                until: None,
                counters: Arc::default(),
            });
        }
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let (Some(p), Some(Some(c))) = (p, counters.get(i)) {
                p.counters = c.clone();
            }
        }
        for (id, dev) in new_uplinks {
            let up = sys::link_up(self.ctl.as_raw_fd(), &dev).unwrap_or(false);
            self.pipeline.set_link(id, up, now);
        }
        self.announce();
    }

    fn read_links(&mut self) {
        let mut evs = std::mem::take(&mut self.link_events);
        evs.clear();
        let r = self.links.read(&mut self.nlbuf, |e| evs.push(e));
        let now = self.now();
        match r {
            Ok(crate::io::netlink::LinkRead::Overrun) => self.resync_links(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading link events"),
        }
        for e in &evs {
            for (id, p) in self.ports.iter().enumerate() {
                let Some(p) = p else { continue };
                if p.uplink
                    && p.ifindex == e.ifindex
                    && self.pipeline.set_link(id as PortId, e.up, now)
                {
                    tracing::info!(uplink = p.io.device(), up = e.up, "uplink link state");
                }
            }
        }
        self.link_events = evs;
        self.announce();
    }

    fn resync_links(&mut self) {
        let now = self.now();
        for (id, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            if p.uplink {
                let up = sys::link_up(self.ctl.as_raw_fd(), p.io.device()).unwrap_or(false);
                self.pipeline.set_link(id as PortId, up, now);
            }
        }
    }

    /// Sends the RARP announcements the core asked for.
    fn announce(&mut self) {
        while let Some(a) = self.pipeline.poll_announce() {
            let Some(Some(p)) = self.ports.get(usize::from(a.uplink)) else {
                continue;
            };
            let mut buf = [0u8; RARP_LEN];
            let n = frame::write_rarp(&mut buf, a.mac, a.vid);
            let hdr = [0u8; VNET_HDR_LEN];
            let r = match &p.io {
                PortIo::Packet(s) => s.send(&[IoSlice::new(&hdr), IoSlice::new(&buf[..n])]),
                PortIo::Tap(t) => t.send(&[IoSlice::new(&hdr), IoSlice::new(&buf[..n])]),
            };
            match r {
                Ok(_) => p.counters.tx(n),
                Err(_) => p.counters.dropped(DropReason::TxError),
            }
            tracing::debug!(uplink = p.io.device(), mac = %a.mac, vid = a.vid, "RARP sent");
        }
    }

    fn set_armed(&mut self, id: PortId, armed: bool, until: Option<u64>) {
        if let Some(Some(p)) = self.ports.get_mut(usize::from(id)) {
            p.until = until;
            if p.armed != armed {
                p.armed = armed;
                let _ = self.epoll.modify(p.io.fd(), u64::from(id), armed);
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = self.now();
        // Wake shaped ports whose buckets have refilled.
        for i in 0..self.ports.len() {
            let due = matches!(&self.ports[i], Some(p) if p.until.is_some_and(|t| t <= now));
            if due {
                self.set_armed(i as PortId, true, None);
            }
        }
        while let Some(id) = self.pipeline.poll_mac_check() {
            if let Some(Some(DpPort {
                io: PortIo::Tap(t), ..
            })) = self.ports.get(usize::from(id))
            {
                match t.device_mac() {
                    Ok(mac) => self.pipeline.device_mac(id, mac, now),
                    Err(e) => tracing::debug!(error = %e, port = id, "reading a TAP's MAC"),
                }
            }
        }
        self.announce();
        if now >= self.next_tick {
            self.pipeline.tick(now);
            self.next_tick = now + TICK_NS;
        }
    }

    /// Reads one batch from a port, decides and sends.
    fn service(&mut self, id: PortId) {
        let i = usize::from(id);
        let Some(port) = self.ports.get_mut(i).and_then(Option::take) else {
            return;
        };
        let now = self.now();
        let shaped = self.pipeline.is_shaped(id);
        if shaped {
            if let Some(t) = self.pipeline.ready_at(id, now) {
                self.ports[i] = Some(port);
                self.set_armed(id, false, Some(t));
                return;
            }
        }
        let mut throttle = None;
        match &port.io {
            PortIo::Tap(tap) => {
                for n in 0..BATCH {
                    match tap.recv(self.rx.slot_mut(n)) {
                        Ok(len) => {
                            self.rx.set_len(n, len, None);
                            self.handle(id, n, &port.counters, now);
                            if shaped {
                                throttle = self.pipeline.ready_at(id, now);
                                if throttle.is_some() {
                                    break;
                                }
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            PortIo::Packet(sock) => {
                if let Ok(n) = sock.recv_batch(&mut self.rx) {
                    for k in 0..n {
                        self.handle(id, k, &port.counters, now);
                    }
                    if shaped {
                        throttle = self.pipeline.ready_at(id, now);
                    }
                }
            }
        }
        self.ports[i] = Some(port);
        self.flush();
        if throttle.is_some() {
            self.set_armed(id, false, throttle);
        }
    }

    fn handle(&mut self, id: PortId, slot: usize, counters: &PortCounters, now: u64) {
        let raw = self.rx.raw(slot);
        if raw.len() < VNET_HDR_LEN {
            counters.dropped(DropReason::Malformed);
            return;
        }
        let mut hb = [0u8; VNET_HDR_LEN];
        hb.copy_from_slice(&raw[..VNET_HDR_LEN]);
        let vnet = VnetHdr::read(&hb);
        let frame = &raw[VNET_HDR_LEN..];
        let wire = wire_len(&vnet, frame.len());
        counters.rx(frame.len());
        let tci = self.rx.tci(slot);
        let fwd = match self.pipeline.process(id, frame, tci, wire, now) {
            Ok(f) => (f.inline_tag, f.outputs.len()),
            Err(_) => return,
        };
        for k in 0..fwd.1 {
            let o = self.pipeline.last_outputs()[k];
            let q = usize::from(o.port);
            let (Some(Some(txq)), Some(out)) = (self.txq.get_mut(q), self.ports.get(q)) else {
                continue;
            };
            if txq.len == 0 {
                self.dirty.push(o.port);
            }
            txq.push(frame, &vnet, fwd.0, o.egress);
            if txq.full() {
                match out {
                    Some(p) => txq.flush(&p.io, &p.counters),
                    // The output is the port being read (never chosen by the core).
                    None => txq.len = 0,
                }
            }
        }
    }

    fn flush(&mut self) {
        for k in 0..self.dirty.len() {
            let q = usize::from(self.dirty[k]);
            if let (Some(Some(txq)), Some(Some(p))) = (self.txq.get_mut(q), self.ports.get(q)) {
                txq.flush(&p.io, &p.counters);
            }
        }
        self.dirty.clear();
    }
}

/// How long to wait for the datapath to answer the control plane.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_length_of_offloaded_segments() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        // 10 segments of 1448 bytes, each with its 66 bytes of headers.
        assert_eq!(wire_len(&h, 66 + 14480), 10 * (1448 + 66));
        assert_eq!(wire_len(&VnetHdr::default(), 60), 60);
    }

    #[test]
    fn queue_tags_and_untags_without_copying() {
        let mut q = TxQueue::new();
        let mut f = vec![0u8; 64];
        f[12] = 0x08;
        let v = VnetHdr {
            flags: 1,
            csum_start: 34,
            ..VnetHdr::default()
        };
        q.push(&f, &v, false, Egress::Tagged(10));
        let e = &q.entries[0];
        assert_eq!((e.niov, e.bytes), (4, 68));
        assert_eq!(e.tag, [0x81, 0, 0, 10]);
        assert_eq!(VnetHdr::read(&e.hdr).csum_start, 38);
        assert_eq!(e.iov[1].iov_base as *const u8, f.as_ptr());
        let mut t = vec![0u8; 68];
        t[12] = 0x81;
        q.push(&t, &v, true, Egress::Untagged);
        let e = &q.entries[1];
        assert_eq!((e.niov, e.bytes), (3, 64));
        assert_eq!(VnetHdr::read(&e.hdr).csum_start, 30);
    }
}

//! A simulated initiator for tests of the sans-IO [`Connection`] (quinn's `Pair`
//! idea): PDUs go in through [`Connection::receive`] and come out of
//! [`Connection::transmit`] in memory, commands run on real [`LogicalUnit`]s polled by
//! a tiny executor, and a [`GateDev`] holds reads until a test lets them finish, so a
//! command can be caught while it runs. No sockets, no runtime, no clock but the one
//! the test advances. Behind the `test-utils` feature for other crates.

use crate::catalog::{Catalog, ChapSecrets, LoginDenied, LoginGrant, SessionLuns};
use crate::conn::{ConnConfig, Connection, Event};
use crate::pdu::{self, opcode, Framing, Pdu};
use crate::text;
use basalt_blockdev::{
    BlockDev, CompareOutcome, Geometry, MemDev, Result as BlockResult, SharedBlockDev, WriteFlags,
    ZeroFlags,
};
use basalt_scsi::{LogicalUnit, LunIdentity, LunResolver, Response};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// A LUN map for tests: every initiator sees every unit.
pub struct TestLuns(pub BTreeMap<u64, Arc<LogicalUnit>>);

impl LunResolver for TestLuns {
    fn resolve(&self, designator: &[u8]) -> Option<Arc<LogicalUnit>> {
        self.0
            .values()
            .find(|u| u.has_designator(designator))
            .cloned()
    }
}

impl SessionLuns for TestLuns {
    fn lun(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.0.get(&lun).cloned()
    }

    fn list(&self) -> Vec<u64> {
        self.0.keys().copied().collect()
    }
}

/// A catalog with one target, `iqn.2026-11.test:t`, open to every initiator, with
/// optional CHAP.
pub struct TestCatalog {
    /// The target's units.
    pub luns: Arc<TestLuns>,
    /// CHAP every login must pass.
    pub chap: Option<ChapSecrets>,
}

/// The target name [`TestCatalog`] serves.
pub const TARGET: &str = "iqn.2026-11.test:t";

impl Catalog for TestCatalog {
    fn login(
        &self,
        _initiator: &str,
        target: Option<&str>,
        _portal: &str,
    ) -> Result<LoginGrant, LoginDenied> {
        match target {
            Some(t) if !t.eq_ignore_ascii_case(TARGET) => Err(LoginDenied::NotFound),
            _ => Ok(LoginGrant {
                target: TARGET.into(),
                tpgt: 1,
                chap: self.chap.clone(),
                luns: target.map(|_| self.luns.clone() as Arc<dyn SessionLuns>),
            }),
        }
    }

    fn send_targets(&self, _: &str, _: Option<&str>, _: &str) -> Vec<(String, Vec<String>)> {
        vec![(TARGET.into(), vec!["127.0.0.1:3260,1".into()])]
    }
}

/// A unit over a [`MemDev`] of `mib` MiB, 512-byte blocks.
pub fn mem_unit(id: u128, mib: u64) -> Arc<LogicalUnit> {
    let dev: SharedBlockDev = Arc::new(MemDev::new(mib * 2048, 512));
    Arc::new(LogicalUnit::new(dev, LunIdentity::new(id), None))
}

/// A device whose reads wait while its gate is closed (writes and everything else go
/// straight to the memory device below).
pub struct GateDev {
    inner: MemDev,
    open: AtomicBool,
}

impl GateDev {
    /// A gated memory device of `mib` MiB, gate open.
    pub fn new(mib: u64) -> Arc<Self> {
        Arc::new(GateDev {
            inner: MemDev::new(mib * 2048, 512),
            open: AtomicBool::new(true),
        })
    }

    /// Opens or closes the gate (reads in progress finish on the next poll).
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

/// Resolves when the gate is open (polled again by [`Pair::run`]).
struct Gate<'a>(&'a AtomicBool);

impl Future for Gate<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[async_trait::async_trait]
impl BlockDev for GateDev {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        Gate(&self.open).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> BlockResult<CompareOutcome> {
        self.inner
            .compare_and_write(offset, compare, data, flags)
            .await
    }
}

type Running = Pin<Box<dyn Future<Output = (u32, Response)> + Send>>;

/// One simulated initiator connected to one [`Connection`].
pub struct Pair {
    /// The target side.
    pub conn: Connection,
    /// The clock handed to the connection.
    pub now: Instant,
    /// The initiator's framing (digests once negotiated).
    pub framing: Framing,
    /// Next CmdSN.
    pub cmd_sn: u32,
    /// Next initiator task tag.
    pub next_itt: u32,
    /// Bytes from the target not parsed yet.
    rx: BytesMut,
    /// Commands the target started, not finished yet.
    running: Vec<Running>,
    /// Events other than command execution, in order.
    pub events: Vec<Event>,
    /// The initiator name [`Pair::login`] presents.
    pub initiator: String,
}

/// The ISID every [`Pair`] uses.
pub const ISID: [u8; 6] = [0x80, 0, 0, 0, 0, 1];

impl Pair {
    /// A fresh connection with `cfg` on `catalog`.
    pub fn new(cfg: ConnConfig, catalog: Arc<dyn Catalog>) -> Self {
        let now = Instant::now();
        Pair {
            conn: Connection::new(cfg, catalog, "127.0.0.1:3260".into(), now),
            now,
            framing: Framing {
                header_digest: false,
                data_digest: false,
                max_data: 16 << 20,
            },
            cmd_sn: 1,
            next_itt: 1,
            rx: BytesMut::new(),
            running: Vec::new(),
            events: Vec::new(),
            initiator: "iqn.2026-11.test:init".into(),
        }
    }

    /// A connection to a [`TestCatalog`] with these units and no CHAP.
    pub fn with_units(cfg: ConnConfig, units: &[(u64, Arc<LogicalUnit>)]) -> Self {
        let luns = Arc::new(TestLuns(units.iter().cloned().collect()));
        Pair::new(cfg, Arc::new(TestCatalog { luns, chap: None }))
    }

    /// Sends a PDU to the target (framed with the initiator's framing) and runs
    /// whatever it started.
    pub fn send(&mut self, p: &Pdu) {
        let mut b = BytesMut::new();
        p.encode(&self.framing, &mut b);
        self.send_bytes(b);
    }

    /// Feeds raw bytes.
    pub fn send_bytes(&mut self, mut b: BytesMut) {
        self.conn.receive(&mut b, self.now);
        self.run();
    }

    /// Starts new commands and polls the running ones until nothing changes.
    pub fn run(&mut self) {
        loop {
            let mut progress = false;
            while let Some(ev) = self.conn.poll_event() {
                match ev {
                    Event::Execute(cmd) => self.running.push(Box::pin(cmd.run())),
                    other => self.events.push(other),
                }
                progress = true;
            }
            let mut cx = Context::from_waker(Waker::noop());
            let mut i = 0;
            while i < self.running.len() {
                if let Poll::Ready((itt, r)) = self.running[i].as_mut().poll(&mut cx) {
                    drop(self.running.swap_remove(i));
                    self.conn.complete(itt, r);
                    progress = true;
                } else {
                    i += 1;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Commands started and not finished.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Every whole PDU the target has sent since the last call.
    pub fn recv(&mut self) -> Vec<Pdu> {
        let out = self.conn.transmit();
        self.rx.extend_from_slice(&out);
        let mut v = Vec::new();
        while let Ok(p) = pdu::parse(&mut self.rx, &self.framing) {
            v.push(p);
        }
        v
    }

    /// A Login Request PDU.
    pub fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(opcode::LOGIN | 0x40);
        p.bhs[1] = (csg << 2) | if transit { 0x80 | nsg } else { 0 };
        p.bhs[8..14].copy_from_slice(&ISID);
        p.set_u32(16, self.next_itt);
        p.set_u32(24, self.cmd_sn);
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.data = Bytes::from(text::encode(&pairs));
        p
    }

    /// One login step: sends the keys, returns the response PDU and its keys.
    pub fn login_step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(&str, &str)],
    ) -> (Pdu, Vec<(String, String)>) {
        let p = self.login_pdu(csg, nsg, transit, keys);
        self.send(&p);
        let r = self
            .recv()
            .pop()
            .unwrap_or_else(|| Pdu::new(opcode::REJECT));
        let keys = text::parse(&r.data);
        (r, keys)
    }

    /// A normal session login without authentication, straight to full feature
    /// phase, with these operational keys (after InitiatorName and TargetName).
    /// Returns the target's keys.
    pub fn login(&mut self, op_keys: &[(&str, &str)]) -> Vec<(String, String)> {
        let name = self.initiator.clone();
        let mut keys = vec![
            ("InitiatorName", name.as_str()),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ];
        keys.extend_from_slice(op_keys);
        let (r, reply) = self.login_step(1, 3, true, &keys);
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0), "login failed: {reply:?}");
        assert_eq!(r.bhs[1] & 0x83, 0x83, "not in full feature phase");
        self.framing.header_digest = reply
            .iter()
            .any(|(k, v)| k == "HeaderDigest" && v == "CRC32C");
        self.framing.data_digest = reply
            .iter()
            .any(|(k, v)| k == "DataDigest" && v == "CRC32C");
        self.next_itt += 1;
        reply
    }

    /// A SCSI Command PDU (CmdSN advanced) with a fresh task tag, returned with it.
    pub fn command(
        &mut self,
        lun: u8,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
    ) -> (u32, Pdu) {
        let itt = self.next_itt;
        self.next_itt += 1;
        let mut p = Pdu::new(opcode::SCSI_CMD);
        p.bhs[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
        p.bhs[9] = lun;
        p.set_u32(16, itt);
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmd_sn);
        self.cmd_sn += 1;
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        (itt, p)
    }

    /// A Data-Out PDU.
    pub fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, data: Bytes, fin: bool) -> Pdu {
        let mut p = Pdu::new(opcode::DATA_OUT);
        p.bhs[1] = if fin { 0x80 } else { 0 };
        p.set_u32(16, itt);
        p.set_u32(20, ttt);
        p.set_u32(36, data_sn);
        p.set_u32(40, offset);
        p.data = data;
        p
    }

    /// An immediate Task Management Function Request.
    pub fn tmf(&mut self, func: u8, lun: u8, rtt: u32) -> (u32, Pdu) {
        let itt = self.next_itt;
        self.next_itt += 1;
        let mut p = Pdu::new(opcode::TASK_MGMT | 0x40);
        p.bhs[1] = 0x80 | func;
        p.bhs[9] = lun;
        p.set_u32(16, itt);
        p.set_u32(20, rtt);
        p.set_u32(24, self.cmd_sn);
        (itt, p)
    }
}

/// READ(16) of `blocks` 512-byte blocks at `lba`.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// WRITE(16) of `blocks` 512-byte blocks at `lba`.
pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = read16(lba, blocks);
    c[0] = 0x8a;
    c
}

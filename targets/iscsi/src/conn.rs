//! The sans-IO iSCSI connection (one connection per session: MaxConnections=1, ERL 0).
//!
//! Feed it bytes with [`Connection::receive`], hand it SCSI results with
//! [`Connection::complete`], call [`Connection::handle_timeout`] when
//! [`Connection::poll_timeout`] says; after each call, drain
//! [`Connection::poll_event`] (commands to run, session events) and
//! [`Connection::transmit`] (bytes to write). It never blocks, reads no clock and owns
//! no socket, so tests drive it in memory.
//!
//! Memory per connection is bounded: at most [`ConnConfig::cmd_window`] tasks (the
//! command window closes as tasks pile up: MaxCmdSN = ExpCmdSN - 1 + free slots), data
//! segments of at most our MaxRecvDataSegmentLength, Data-Out solicited by R2T only
//! while less than [`ConnConfig::write_budget`] bytes are buffered, and commands
//! started only while their transfers fit [`ConnConfig::exec_budget`].

use crate::catalog::{Catalog, ChapSecrets, LoginDenied, LoginGrant, SessionLuns};
use crate::pdu::{self, decode_lun, opcode, Framing, Pdu, PduError};
use crate::text;
use crate::txq::TxQueue;
use basalt_scsi::cdb::{byte, transfer};
use basalt_scsi::{no_such_lun, report_luns, LogicalUnit, NexusId, ResetKind, Response, Sense};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits and preferences of a connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Our MaxRecvDataSegmentLength (what the initiator may send in one PDU).
    pub max_recv_data: u32,
    /// Largest MaxBurstLength we accept.
    pub max_burst: u32,
    /// Largest FirstBurstLength we accept.
    pub first_burst: u32,
    /// Most tasks outstanding at once.
    pub cmd_window: u32,
    /// Most Data-Out bytes buffered before R2Ts wait.
    pub write_budget: usize,
    /// Most transfer bytes of commands running at once.
    pub exec_budget: u64,
    /// Idle time before a NOP-In ping; the connection closes if the ping is not answered
    /// within the same time.
    pub nop_interval: Duration,
    /// Time allowed for login.
    pub login_timeout: Duration,
    /// Offer ImmediateData=Yes (the result is the AND with the initiator's).
    pub immediate_data: bool,
    /// Offer InitialR2T=No (the result is the OR with the initiator's).
    pub allow_unsolicited: bool,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_recv_data: 256 * 1024,
            max_burst: 1024 * 1024,
            first_burst: 256 * 1024,
            cmd_window: 128,
            write_budget: 64 << 20,
            exec_budget: 128 << 20,
            nop_interval: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            immediate_data: true,
            allow_unsolicited: true,
        }
    }
}

/// What the connection asks its driver to do.
pub enum Event {
    /// Run a SCSI command and call [`Connection::complete`] with the response.
    Execute(Command),
    /// Login finished; a normal session (with its nexus) or discovery.
    LoggedIn {
        /// The I_T nexus (`None` for discovery).
        nexus: Option<Arc<NexusId>>,
        /// The target (empty for discovery).
        target: String,
    },
    /// The task with this tag was aborted: its result, if any, will be dropped.
    Aborted(u32),
    /// A task management function aborted every task on these units: the driver
    /// calls [`Connection::abort_for_others`] on every other connection, and
    /// [`Connection::abort_elsewhere_done`] with the ticket once they have all ended
    /// those tasks. The function's response waits for it.
    AbortElsewhere {
        /// Pass back to [`Connection::abort_elsewhere_done`].
        ticket: u64,
        /// The units.
        units: Vec<Arc<LogicalUnit>>,
    },
    /// The tasks aborted by [`Connection::abort_for_others`] that returned this
    /// ticket have all ended.
    AbortDone(u64),
    /// A TARGET WARM/COLD RESET was requested for the session's target.
    TargetReset {
        /// Cold reset: the driver must drop every connection to the target.
        cold: bool,
    },
    /// The connection is finished: write out what [`Connection::transmit`] holds, then
    /// close the socket.
    Close,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Execute(c) => write!(f, "Execute(itt {:#x}, lun {})", c.itt, c.lun),
            Event::LoggedIn { target, .. } => write!(f, "LoggedIn({target})"),
            Event::Aborted(t) => write!(f, "Aborted({t:#x})"),
            Event::AbortElsewhere { ticket, units } => {
                write!(f, "AbortElsewhere({ticket}, {} units)", units.len())
            }
            Event::AbortDone(t) => write!(f, "AbortDone({t})"),
            Event::TargetReset { cold } => write!(f, "TargetReset(cold: {cold})"),
            Event::Close => write!(f, "Close"),
        }
    }
}

/// A SCSI command to run.
pub struct Command {
    /// Initiator task tag (pass back to [`Connection::complete`]).
    pub itt: u32,
    /// LUN number.
    pub lun: u64,
    /// The unit.
    pub lu: Arc<LogicalUnit>,
    /// The CDB (the 16 bytes of the SCSI Command PDU).
    pub cdb: [u8; 16],
    /// All Data-Out.
    pub data_out: Bytes,
    /// The issuing nexus.
    pub nexus: Arc<NexusId>,
    /// The session's LUN map (the XCOPY resolver).
    pub luns: Arc<dyn SessionLuns>,
}

impl Command {
    /// Runs the command on its unit.
    pub async fn run(self) -> (u32, Response) {
        let r = self
            .lu
            .execute(&self.nexus, &*self.luns, &self.cdb, self.data_out)
            .await;
        (self.itt, r)
    }
}

/// Negotiated operational parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// The initiator's MaxRecvDataSegmentLength (our Data-In PDU size).
    pub peer_mrdsl: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            peer_mrdsl: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            header_digest: false,
            data_digest: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    Full,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Not yet negotiated.
    Start,
    /// CHAP chosen; waiting for CHAP_A.
    ChapAlgo,
    /// Challenge sent: (identifier, challenge).
    ChapChallenged(u8, Vec<u8>),
    /// Authenticated (or none needed).
    Done,
}

#[derive(Default)]
struct LoginCtx {
    started: bool,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cid: u16,
    initiator: Option<String>,
    target: Option<String>,
    discovery: bool,
    grant: Option<LoginGrant>,
    auth: Option<Auth>,
    text: Vec<u8>,
    declared_mrdsl: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    /// Receiving Data-Out.
    Collecting,
    /// Ready, waiting for execution budget.
    Queued,
    /// Running in the driver.
    Running,
}

struct Task {
    lun: u64,
    lu: Option<Arc<LogicalUnit>>,
    cdb: [u8; 16],
    edtl: u32,
    read: bool,
    write: bool,
    /// Data-Out expected per the CDB.
    spdtl_out: u64,
    /// Store Data-Out (false: absorb and discard, the command fails anyway).
    keep: bool,
    data: BytesMut,
    received: u32,
    /// Unsolicited bytes still allowed.
    unsolicited_left: u32,
    /// Outstanding R2T: (ttt, offset, length, next DataSN).
    r2t: Option<(u32, u32, u32, u32)>,
    r2t_sn: u32,
    next_data_sn: u32,
    state: TaskState,
    /// Response already decided (no execution).
    preset: Option<Response>,
    /// Aborted by this session's task management: ends without status.
    aborted: bool,
    /// Aborted by another session's reset: ends with TASK ABORTED.
    third_party_abort: bool,
}

/// A task management function whose response waits for aborted tasks to end.
struct PendingTmf {
    itt: u32,
    response: u8,
    /// This session's aborted tasks still running.
    waiting: Vec<u32>,
    /// Units to reset once every task is gone.
    reset: Option<(ResetKind, Vec<Arc<LogicalUnit>>)>,
    /// Other sessions still ending their tasks ([`Event::AbortElsewhere`]).
    external: Option<u64>,
    /// TARGET COLD RESET: close the connection after the response.
    cold: bool,
}

/// Most immediate (I-bit) tasks beyond the window.
const EXTRA_IMMEDIATE: usize = 16;

/// A sans-IO iSCSI target connection. See the [module docs](self).
pub struct Connection {
    cfg: ConnConfig,
    catalog: Arc<dyn Catalog>,
    portal: String,
    phase: Phase,
    rx: Framing,
    tx: Framing,
    login: LoginCtx,
    params: Params,
    nexus: Option<Arc<NexusId>>,
    luns: Option<Arc<dyn SessionLuns>>,
    /// LUN lookups of this session, valid while the map's version stays the same.
    lun_cache: Vec<(u64, Option<Arc<LogicalUnit>>)>,
    lun_cache_version: Option<u64>,
    target: String,
    stat_sn: u32,
    exp_cmd_sn: u32,
    tasks: HashMap<u32, Task, BuildHasherDefault<TagHasher>>,
    ready: VecDeque<u32>,
    r2t_wait: VecDeque<u32>,
    buffered: usize,
    executing: u64,
    out: TxQueue,
    events: VecDeque<Event>,
    created: Instant,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    next_ttt: u32,
    text_pending: Option<(u32, Vec<u8>)>,
    logout_pending: bool,
    /// Task management functions waiting to be answered, in arrival order.
    tmfs: Vec<PendingTmf>,
    /// Tasks aborted for other sessions, still running: (ticket, tags).
    foreign_aborts: Vec<(u64, Vec<u32>)>,
    next_ticket: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

impl Connection {
    /// A connection accepted on `portal` ("address:port" of the local end) at `now`.
    pub fn new(cfg: ConnConfig, catalog: Arc<dyn Catalog>, portal: String, now: Instant) -> Self {
        Connection {
            cfg,
            catalog,
            portal,
            phase: Phase::Login,
            rx: Framing::default(),
            tx: Framing::default(),
            login: LoginCtx::default(),
            params: Params::default(),
            nexus: None,
            luns: None,
            lun_cache: Vec::new(),
            lun_cache_version: None,
            target: String::new(),
            stat_sn: 0,
            exp_cmd_sn: 0,
            tasks: HashMap::default(),
            ready: VecDeque::new(),
            r2t_wait: VecDeque::new(),
            buffered: 0,
            executing: 0,
            out: TxQueue::new(),
            events: VecDeque::new(),
            created: now,
            last_rx: now,
            ping: None,
            next_ttt: 1,
            text_pending: None,
            logout_pending: false,
            tmfs: Vec::new(),
            foreign_aborts: Vec::new(),
            next_ticket: 0,
        }
    }

    /// Negotiated parameters (meaningful after login).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The session's nexus, after a normal login.
    pub fn nexus(&self) -> Option<&Arc<NexusId>> {
        self.nexus.as_ref()
    }

    /// Whether the connection has finished.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Bytes buffered for Data-Out (for tests of the memory bound).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes the bytes to write as one buffer (empty when there are none). Copies;
    /// drivers use [`Connection::outgoing`] instead.
    pub fn transmit(&mut self) -> BytesMut {
        self.out.take_all()
    }

    /// The bytes to write, as a [`Buf`] of header and data pieces: write
    /// [`Buf::chunks_vectored`] with one vectored write, then [`Buf::advance`] by what
    /// was written.
    pub fn outgoing(&mut self) -> &mut TxQueue {
        &mut self.out
    }

    /// Whether bytes wait in [`Connection::outgoing`].
    pub fn has_output(&self) -> bool {
        self.out.has_remaining()
    }

    /// When to call [`Connection::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Login => Some(self.created + self.cfg.login_timeout),
            Phase::Full => Some(match self.ping {
                Some((_, at)) => at + self.cfg.nop_interval,
                None => self.last_rx + self.cfg.nop_interval,
            }),
            Phase::Closed => None,
        }
    }

    /// Timers: login timeout, NOP-In keepalive.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Login if now >= self.created + self.cfg.login_timeout => self.close(),
            Phase::Full => match self.ping {
                Some((_, at)) if now >= at + self.cfg.nop_interval => self.close(),
                None if now >= self.last_rx + self.cfg.nop_interval => {
                    let ttt = self.new_ttt();
                    let mut p = Pdu::new(opcode::NOP_IN);
                    p.bhs[1] = 0x80;
                    p.set_u32(16, 0xffff_ffff);
                    p.set_u32(20, ttt);
                    self.seal(&mut p, false);
                    self.send(&p);
                    self.ping = Some((ttt, now));
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn close(&mut self) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Close);
        }
    }

    /// The connection is going away (socket closed): drops per-nexus state on every
    /// unit the session saw.
    pub fn shutdown(&mut self) {
        if let (Some(n), Some(l)) = (&self.nexus, &self.luns) {
            for lun in l.list() {
                if let Some(lu) = l.lun(lun) {
                    lu.nexus_lost(n);
                }
            }
        }
        self.tasks.clear();
        self.phase = Phase::Closed;
    }

    fn new_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == 0xffff_ffff {
            self.next_ttt = 1;
        }
        t
    }

    fn send(&mut self, p: &Pdu) {
        p.encode_to(&self.tx, &mut self.out);
    }

    fn max_cmd_sn(&self) -> u32 {
        let used = self.tasks.len().min(self.cfg.cmd_window as usize) as u32;
        let free = self.cfg.cmd_window - used;
        self.exp_cmd_sn.wrapping_sub(1).wrapping_add(free)
    }

    /// Fills StatSN (advancing it when `status`), ExpCmdSN, MaxCmdSN.
    fn seal(&mut self, p: &mut Pdu, status: bool) {
        p.set_u32(24, self.stat_sn);
        if status {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        p.set_u32(28, self.exp_cmd_sn);
        let m = self.max_cmd_sn();
        p.set_u32(32, m);
    }

    fn reject(&mut self, reason: u8, bad: &Pdu) {
        let mut p = Pdu::new(opcode::REJECT);
        p.bhs[1] = 0x80;
        p.bhs[2] = reason;
        p.set_u32(16, 0xffff_ffff);
        self.seal(&mut p, true);
        p.data = Bytes::copy_from_slice(&bad.bhs);
        self.send(&p);
    }

    /// Consumes every whole PDU at the front of `buf`. Protocol violations that leave
    /// the stream unusable close the connection (an [`Event::Close`]).
    pub fn receive(&mut self, buf: &mut BytesMut, now: Instant) {
        while self.phase != Phase::Closed {
            match pdu::parse(buf, &self.rx) {
                Ok(p) => {
                    self.last_rx = now;
                    self.handle(p);
                }
                Err(PduError::Incomplete(_)) => break,
                Err(PduError::DataDigest) => {
                    // The stream is intact; ERL 0 recovers by dropping the connection.
                    self.close();
                }
                Err(_) => self.close(),
            }
        }
    }

    fn handle(&mut self, p: Pdu) {
        if self.phase == Phase::Login {
            if p.opcode() == opcode::LOGIN {
                self.handle_login(p);
            } else {
                // Anything but a login before full feature phase is a protocol error.
                self.close();
            }
            return;
        }
        if self.logout_pending {
            return;
        }
        match p.opcode() {
            opcode::SCSI_CMD if !self.login.discovery => self.scsi_command(p),
            opcode::DATA_OUT if !self.login.discovery => self.data_out(p),
            opcode::NOP_OUT => self.nop_out(p),
            opcode::TASK_MGMT if !self.login.discovery => self.task_mgmt(p),
            opcode::TEXT => self.text(p),
            opcode::LOGOUT => self.logout(p),
            opcode::LOGIN => {
                // A login in full feature phase: protocol error.
                self.reject(0x04, &p);
                self.close();
            }
            opcode::SNACK => self.reject(0x04, &p),
            _ => self.reject(0x05, &p),
        }
    }

    // ----- CmdSN -----

    /// Checks and advances CmdSN for a non-immediate command; false drops the PDU.
    fn accept_cmd_sn(&mut self, p: &Pdu) -> bool {
        let sn = p.u32(24);
        if p.immediate() {
            return true;
        }
        if sn != self.exp_cmd_sn {
            // Outside the window or out of order (one connection: no gaps to fill):
            // silently ignored (RFC 7143 4.2.2.1).
            return false;
        }
        if self.tasks.len() >= self.cfg.cmd_window as usize && p.opcode() == opcode::SCSI_CMD {
            return false;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        true
    }

    // ----- SCSI commands -----

    fn scsi_command(&mut self, p: Pdu) {
        if !self.accept_cmd_sn(&p) {
            return;
        }
        let itt = p.itt();
        if self.tasks.contains_key(&itt) || itt == 0xffff_ffff {
            self.reject(0x09, &p);
            return;
        }
        if p.immediate() && self.tasks.len() >= self.cfg.cmd_window as usize + EXTRA_IMMEDIATE {
            let mut t = self.bare_task(&p);
            t.preset = Some(Response::status(basalt_scsi::Status::TaskSetFull));
            self.tasks.insert(itt, t);
            self.finish_collecting(itt);
            return;
        }
        let mut task = self.bare_task(&p);
        let lu = self.lookup_lun(task.lun);
        let opc = byte(&task.cdb, 0);
        if opc == basalt_scsi::cdb::op::REPORT_LUNS {
            let list = self.luns.as_ref().map(|l| l.list()).unwrap_or_default();
            task.preset = Some(report_luns(&list, &task.cdb));
        } else if let Some(lu) = &lu {
            let t = transfer(&task.cdb, lu.block_size());
            task.spdtl_out = t.data_out;
            task.lu = Some(lu.clone());
        } else {
            task.preset = Some(no_such_lun(&task.cdb));
        }
        use basalt_scsi::cdb::op;
        if matches!(
            opc,
            op::COMPARE_AND_WRITE | op::WRITE_SAME_10 | op::WRITE_SAME_16
        ) && task.preset.is_none()
            && u64::from(task.edtl) != task.spdtl_out
        {
            // These need their Data-Out exactly (LIO's rule, which VMware and libiscsi
            // expect): any other expected length is an invalid CDB.
            task.keep = false;
            let sense = task
                .lu
                .as_ref()
                .and_then(|l| l.write_protected())
                .unwrap_or(Sense::INVALID_FIELD_IN_CDB);
            task.preset = Some(Response::check(sense));
        }
        if task.write && task.preset.is_none() {
            // Buffer at most what the CDB can use (a larger expected length is
            // absorbed and reported as a residual); refuse absurd lengths outright.
            if u64::from(task.edtl) > basalt_scsi::MAX_TRANSFER_BYTES * 2 + (1 << 20) {
                task.keep = false;
                task.preset = Some(Response::check(Sense::INVALID_FIELD_IN_IU));
            }
        } else if task.write {
            task.keep = false;
        }
        if !task.write && task.edtl > 0 && !task.read {
            // Expected length without direction: treat as read.
            task.read = true;
        }
        // Immediate data.
        let imm = p.data.clone();
        if !imm.is_empty() {
            if !task.write
                || !self.params.immediate_data
                || imm.len() as u32 > task.edtl
                || imm.len() as u32 > self.params.first_burst
            {
                self.reject(0x09, &p);
                return;
            }
            task.received = imm.len() as u32;
            if task.keep {
                let k = keep_len(&task, 0, imm.len());
                self.buffered += k;
                put_data(&mut task, &imm[..k]);
            }
        }
        if task.write {
            let unsolicited = if self.params.initial_r2t {
                0
            } else {
                self.params.first_burst.min(task.edtl)
            };
            task.unsolicited_left = unsolicited.saturating_sub(task.received);
        }
        self.tasks.insert(itt, task);
        self.advance_write(itt);
    }

    /// The unit at `lun` for this session, through the cache while the session's LUN
    /// map reports the same version (a reconfiguration changes it, so masking changes
    /// still apply to the next command).
    fn lookup_lun(&mut self, lun: u64) -> Option<Arc<LogicalUnit>> {
        /// Distinct LUNs remembered per session.
        const MAX_CACHED: usize = 64;
        let luns = self.luns.as_ref()?;
        // Read the version before looking up: a change in between leaves a newer
        // answer under the older version, which the next command replaces.
        let Some(v) = luns.version() else {
            return luns.lun(lun);
        };
        if self.lun_cache_version != Some(v) {
            self.lun_cache.clear();
            self.lun_cache_version = Some(v);
        }
        if let Some((_, u)) = self.lun_cache.iter().find(|(n, _)| *n == lun) {
            return u.clone();
        }
        let u = luns.lun(lun);
        if self.lun_cache.len() < MAX_CACHED {
            self.lun_cache.push((lun, u.clone()));
        }
        u
    }

    fn bare_task(&self, p: &Pdu) -> Task {
        Task {
            lun: decode_lun(p.lun_field()),
            lu: None,
            cdb: cdb16(&p.bhs),
            edtl: p.u32(20),
            read: p.bhs[1] & 0x40 != 0,
            write: p.bhs[1] & 0x20 != 0,
            spdtl_out: 0,
            keep: true,
            data: BytesMut::new(),
            received: 0,
            unsolicited_left: 0,
            r2t: None,
            r2t_sn: 0,
            next_data_sn: 0,
            state: TaskState::Collecting,
            preset: None,
            aborted: false,
            third_party_abort: false,
        }
    }

    /// After data arrived (or at command time): finished, waiting for unsolicited
    /// data, or time for an R2T.
    fn advance_write(&mut self, itt: u32) {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        if t.state != TaskState::Collecting {
            return;
        }
        if !t.write || t.received >= t.edtl {
            self.finish_collecting(itt);
            return;
        }
        if t.unsolicited_left > 0 || t.r2t.is_some() {
            return;
        }
        if t.keep && self.buffered + self.granted() >= self.cfg.write_budget {
            if !self.r2t_wait.contains(&itt) {
                self.r2t_wait.push_back(itt);
            }
            return;
        }
        self.send_r2t(itt);
    }

    /// Bytes solicited by outstanding R2Ts and not yet received.
    fn granted(&self) -> usize {
        self.tasks
            .values()
            .filter_map(|t| {
                t.r2t
                    .map(|(_, off, len, _)| (off + len).saturating_sub(t.received) as usize)
            })
            .sum()
    }

    fn send_r2t(&mut self, itt: u32) {
        let ttt = self.new_ttt();
        let max_burst = self.params.max_burst;
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        let off = t.received;
        let len = (t.edtl - off).min(max_burst);
        t.r2t = Some((ttt, off, len, 0));
        let r2t_sn = t.r2t_sn;
        t.r2t_sn += 1;
        let lun = t.lun;
        let mut p = Pdu::new(opcode::R2T);
        p.bhs[1] = 0x80;
        p.bhs[8..16].copy_from_slice(&basalt_scsi_lun(lun));
        p.set_u32(16, itt);
        p.set_u32(20, ttt);
        self.seal(&mut p, false);
        p.set_u32(36, r2t_sn);
        p.set_u32(40, off);
        p.set_u32(44, len);
        self.send(&p);
    }

    fn data_out(&mut self, p: Pdu) {
        let itt = p.itt();
        let ttt = p.u32(20);
        let data_sn = p.u32(36);
        let offset = p.u32(40);
        let fin = p.final_bit();
        let Some(t) = self.tasks.get_mut(&itt) else {
            // Data for an unknown (perhaps aborted) task: ignore it.
            return;
        };
        if t.state != TaskState::Collecting {
            return;
        }
        let len = p.data.len() as u32;
        let ok_offset =
            offset == t.received && offset.checked_add(len).is_some_and(|e| e <= t.edtl);
        let (expect_sn, solicited) = match t.r2t {
            Some((rttt, _, _, sn)) if rttt == ttt => (sn, true),
            None if ttt == 0xffff_ffff && t.unsolicited_left >= len => (t.next_data_sn, false),
            _ => {
                self.reject(0x09, &p);
                return;
            }
        };
        if !ok_offset || data_sn != expect_sn {
            // ERL 0 cannot recover a lost or misordered Data-Out: fail the task and
            // drop the connection, as the RFC allows.
            self.reject(0x09, &p);
            self.close();
            return;
        }
        let k = if t.keep {
            keep_len(t, offset as usize, p.data.len())
        } else {
            0
        };
        t.received += len;
        if k > 0 {
            put_data(t, &p.data[..k]);
            self.buffered += k;
        }
        if solicited {
            if let Some(r) = t.r2t.as_mut() {
                r.3 += 1;
                let end = r.1 + r.2;
                if fin || t.received >= end {
                    t.r2t = None;
                }
            }
        } else {
            t.next_data_sn += 1;
            t.unsolicited_left -= len;
            if fin {
                t.unsolicited_left = 0;
            }
        }
        self.advance_write(itt);
    }

    fn finish_collecting(&mut self, itt: u32) {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        t.r2t = None;
        if let Some(r) = t.preset.take() {
            self.buffered -= t.data.len();
            t.data = BytesMut::new();
            t.state = TaskState::Running;
            self.finish(itt, r);
            return;
        }
        t.state = TaskState::Queued;
        self.ready.push_back(itt);
        self.pump();
    }

    fn cost(t: &Task) -> u64 {
        u64::from(t.edtl).max(t.data.len() as u64)
    }

    fn pump(&mut self) {
        while let Some(&itt) = self.ready.front() {
            let Some(t) = self.tasks.get(&itt) else {
                self.ready.pop_front();
                continue;
            };
            let c = Self::cost(t);
            if self.executing > 0 && self.executing + c > self.cfg.exec_budget {
                break;
            }
            self.ready.pop_front();
            let (Some(nexus), Some(luns)) = (self.nexus.clone(), self.luns.clone()) else {
                return;
            };
            let Some(t) = self.tasks.get_mut(&itt) else {
                continue;
            };
            let Some(lu) = t.lu.clone() else { continue };
            t.state = TaskState::Running;
            self.executing += c;
            let data = std::mem::take(&mut t.data);
            self.buffered -= data.len();
            self.events.push_back(Event::Execute(Command {
                itt,
                lun: t.lun,
                lu,
                cdb: t.cdb,
                data_out: data.freeze(),
                nexus,
                luns,
            }));
        }
        while !self.r2t_wait.is_empty() && self.buffered + self.granted() < self.cfg.write_budget {
            let Some(itt) = self.r2t_wait.pop_front() else {
                break;
            };
            if self.tasks.get(&itt).is_some_and(|t| t.r2t.is_none()) {
                self.send_r2t(itt);
            }
        }
    }

    /// The driver's result for an [`Event::Execute`].
    pub fn complete(&mut self, itt: u32, r: Response) {
        let Some(t) = self.tasks.get(&itt) else {
            return;
        };
        if t.state != TaskState::Running {
            return;
        }
        self.executing = self.executing.saturating_sub(Self::cost(t));
        if self.phase == Phase::Closed {
            self.tasks.remove(&itt);
            return;
        }
        if t.third_party_abort && !t.aborted {
            self.tasks.remove(&itt);
            self.send_task_aborted(itt);
        } else {
            self.finish(itt, r);
        }
        self.task_ended(itt);
        self.pump();
    }

    /// Sends Data-In and the status for a finished task and forgets it.
    fn finish(&mut self, itt: u32, r: Response) {
        let Some(t) = self.tasks.remove(&itt) else {
            return;
        };
        if t.aborted {
            return;
        }
        let edtl = t.edtl as usize;
        let mut flags_res = 0u8;
        let mut residual = 0u32;
        let mut data = r.data.clone();
        if !t.read {
            data = Bytes::new();
        }
        if t.write && !t.read {
            let sp = t.spdtl_out;
            if sp > u64::from(t.edtl) {
                flags_res = 0x04;
                residual = (sp - u64::from(t.edtl)).min(u64::from(u32::MAX)) as u32;
            } else if sp < u64::from(t.edtl) {
                flags_res = 0x02;
                residual = (u64::from(t.edtl) - sp) as u32;
            }
            data = Bytes::new();
        } else {
            let n = data.len();
            if n > edtl {
                flags_res = 0x04;
                residual = (n - edtl) as u32;
                data.truncate(edtl);
            } else if n < edtl {
                flags_res = 0x02;
                residual = (edtl - n) as u32;
            }
        }
        let good = r.status == basalt_scsi::Status::Good && r.sense.is_none();
        let lun = basalt_scsi_lun(t.lun);
        let mrdsl = self.params.peer_mrdsl.max(512) as usize;
        let burst = self.params.max_burst.max(512) as usize;
        let mut data_sn = 0u32;
        let mut off = 0usize;
        while off < data.len() {
            let burst_end = (off / burst + 1) * burst;
            let n = (data.len() - off).min(mrdsl).min(burst_end - off);
            let last = off + n == data.len();
            let mut p = Pdu::new(opcode::DATA_IN);
            let mut f = 0u8;
            if last || off + n == burst_end {
                f |= 0x80;
            }
            let piggy = last && good;
            if piggy {
                f |= 0x01 | flags_res;
                p.set_u32(44, residual);
            }
            p.bhs[1] = f;
            p.bhs[8..16].copy_from_slice(&lun);
            p.set_u32(16, itt);
            p.set_u32(20, 0xffff_ffff);
            self.seal(&mut p, piggy);
            if !piggy {
                p.set_u32(24, 0);
            }
            p.set_u32(36, data_sn);
            p.set_u32(40, off as u32);
            p.data = data.slice(off..off + n);
            self.send(&p);
            data_sn += 1;
            off += n;
            if piggy {
                return;
            }
        }
        let mut p = Pdu::new(opcode::SCSI_RSP);
        p.bhs[1] = 0x80 | flags_res;
        p.bhs[2] = 0;
        p.bhs[3] = r.status as u8;
        p.set_u32(16, itt);
        self.seal(&mut p, true);
        p.set_u32(36, data_sn);
        p.set_u32(44, residual);
        let sense = r.sense_bytes();
        if !sense.is_empty() {
            let mut d = BytesMut::with_capacity(2 + sense.len());
            d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            d.extend_from_slice(&sense);
            p.data = d.freeze();
        }
        self.send(&p);
    }

    // ----- NOP, TMF, text, logout -----

    fn nop_out(&mut self, p: Pdu) {
        if !self.accept_cmd_sn(&p) {
            return;
        }
        let ttt = p.u32(20);
        if ttt != 0xffff_ffff {
            if self.ping.is_some_and(|(t, _)| t == ttt) {
                self.ping = None;
            }
            return;
        }
        if p.itt() == 0xffff_ffff {
            return;
        }
        let mut r = Pdu::new(opcode::NOP_IN);
        r.bhs[1] = 0x80;
        r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
        r.set_u32(16, p.itt());
        r.set_u32(20, 0xffff_ffff);
        self.seal(&mut r, true);
        let n = p.data.len().min(self.params.peer_mrdsl as usize);
        r.data = p.data.slice(..n);
        self.send(&r);
    }

    fn task_mgmt(&mut self, p: Pdu) {
        if !self.accept_cmd_sn(&p) {
            return;
        }
        let func = p.bhs[1] & 0x7f;
        let rtt = p.u32(20);
        let lun = decode_lun(p.lun_field());
        let mut tmf = PendingTmf {
            itt: p.itt(),
            response: 0,
            waiting: Vec::new(),
            reset: None,
            external: None,
            cold: false,
        };
        match func {
            1 => {
                // ABORT TASK. A task that is no longer here has completed (or never
                // existed within the window): Function complete either way.
                if let Some(t) = self.tasks.get_mut(&rtt) {
                    t.aborted = true;
                    // A command whose execution the driver has not picked up yet
                    // (its Data-Out came in the same read as the abort) is still
                    // abortable.
                    let pending = self
                        .events
                        .iter()
                        .position(|e| matches!(e, Event::Execute(c) if c.itt == rtt));
                    if let Some(i) = pending {
                        self.events.remove(i);
                        self.executing = self.executing.saturating_sub(Self::cost(t));
                        t.state = TaskState::Queued;
                    }
                    if t.state != TaskState::Running {
                        // Not started (waiting for Data-Out or budget): end it with
                        // TASK ABORTED so the initiator can free it (libiscsi 1.19
                        // double-frees the task without this status).
                        self.drop_task(rtt);
                        let mut r = Pdu::new(opcode::SCSI_RSP);
                        r.bhs[1] = 0x80;
                        r.bhs[3] = basalt_scsi::Status::TaskAborted as u8;
                        r.set_u32(16, rtt);
                        self.seal(&mut r, true);
                        self.send(&r);
                    } else {
                        // Running: the response waits until the command has ended,
                        // so that nothing it does lands after it (SAM-5 7.2).
                        self.events.push_back(Event::Aborted(rtt));
                        tmf.waiting.push(rtt);
                    }
                }
            }
            2 | 4 | 5 => {
                // ABORT TASK SET (this nexus's tasks), CLEAR TASK SET (the task set is
                // shared by all initiators: TST 0) and LOGICAL UNIT RESET (every
                // task of the unit, from every session).
                let lu = self.lookup_lun(lun);
                let itts: Vec<u32> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.lun == lun)
                    .map(|(i, _)| *i)
                    .collect();
                for i in itts {
                    if self.abort_silently(i) {
                        tmf.waiting.push(i);
                    }
                }
                match lu {
                    Some(lu) if func != 2 => {
                        let ticket = self.new_ticket();
                        tmf.external = Some(ticket);
                        self.events.push_back(Event::AbortElsewhere {
                            ticket,
                            units: vec![lu.clone()],
                        });
                        if func == 5 {
                            tmf.reset = Some((ResetKind::Lun, vec![lu]));
                        }
                    }
                    Some(_) => {}
                    None if func == 5 => tmf.response = 2,
                    None => {}
                }
            }
            6 | 7 => {
                // TARGET WARM/COLD RESET: every task of every unit of the target.
                let itts: Vec<u32> = self.tasks.keys().copied().collect();
                for i in itts {
                    if self.abort_silently(i) {
                        tmf.waiting.push(i);
                    }
                }
                let units: Vec<Arc<LogicalUnit>> = match &self.luns {
                    Some(l) => l.list().into_iter().filter_map(|n| l.lun(n)).collect(),
                    None => Vec::new(),
                };
                let ticket = self.new_ticket();
                tmf.external = Some(ticket);
                self.events.push_back(Event::AbortElsewhere {
                    ticket,
                    units: units.clone(),
                });
                let kind = if func == 6 {
                    ResetKind::TargetWarm
                } else {
                    ResetKind::TargetCold
                };
                tmf.reset = Some((kind, units));
                tmf.cold = func == 7;
            }
            3 => tmf.response = 5,
            8 => tmf.response = 4,
            _ => tmf.response = 255,
        }
        self.ready.retain(|i| self.tasks.contains_key(i));
        self.tmfs.push(tmf);
        self.settle_tmfs();
    }

    /// Aborts a task of this session for one of its own task management functions:
    /// no status for it. Returns true if it is running (the function's response
    /// waits for it).
    fn abort_silently(&mut self, itt: u32) -> bool {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return false;
        };
        t.aborted = true;
        if t.state == TaskState::Running {
            self.events.push_back(Event::Aborted(itt));
            true
        } else {
            self.drop_task(itt);
            false
        }
    }

    /// Forgets a task that is not running, with its buffered Data-Out.
    fn drop_task(&mut self, itt: u32) {
        if let Some(t) = self.tasks.remove(&itt) {
            self.buffered -= t.data.len();
        }
    }

    fn new_ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// Another session reset (or cleared the task set of) some of these units: every
    /// task of this session on them is aborted and ends with TASK ABORTED status (TAS
    /// 1, as LIO does, so initiators retry at once instead of timing out). Returns a
    /// ticket when some of them are running: [`Event::AbortDone`] with it follows once
    /// they have all ended; `None` when nothing is left running.
    pub fn abort_for_others(&mut self, units: &[Arc<LogicalUnit>]) -> Option<u64> {
        let hit: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.lu.as_ref()
                    .is_some_and(|lu| units.iter().any(|u| Arc::ptr_eq(u, lu)))
            })
            .map(|(i, _)| *i)
            .collect();
        let mut running = Vec::new();
        for itt in hit {
            let Some(t) = self.tasks.get_mut(&itt) else {
                continue;
            };
            if t.state == TaskState::Running {
                t.third_party_abort = true;
                self.events.push_back(Event::Aborted(itt));
                running.push(itt);
            } else if !t.aborted {
                self.drop_task(itt);
                self.send_task_aborted(itt);
            }
        }
        self.ready.retain(|i| self.tasks.contains_key(i));
        if running.is_empty() {
            return None;
        }
        let ticket = self.new_ticket();
        self.foreign_aborts.push((ticket, running));
        Some(ticket)
    }

    /// The driver's answer to [`Event::AbortElsewhere`]: every other session has
    /// ended its tasks on the units.
    pub fn abort_elsewhere_done(&mut self, ticket: u64) {
        for t in &mut self.tmfs {
            if t.external == Some(ticket) {
                t.external = None;
            }
        }
        self.settle_tmfs();
    }

    fn send_task_aborted(&mut self, itt: u32) {
        let mut r = Pdu::new(opcode::SCSI_RSP);
        r.bhs[1] = 0x80;
        r.bhs[3] = basalt_scsi::Status::TaskAborted as u8;
        r.set_u32(16, itt);
        self.seal(&mut r, true);
        self.send(&r);
    }

    /// A running task has ended (completed, or its result dropped): releases the
    /// task management functions and foreign aborts that waited for it.
    fn task_ended(&mut self, itt: u32) {
        let mut changed = false;
        for t in &mut self.tmfs {
            if let Some(i) = t.waiting.iter().position(|x| *x == itt) {
                t.waiting.swap_remove(i);
                changed = true;
            }
        }
        if changed {
            self.settle_tmfs();
        }
        let mut done = Vec::new();
        self.foreign_aborts.retain_mut(|(ticket, itts)| {
            itts.retain(|x| *x != itt);
            if itts.is_empty() {
                done.push(*ticket);
                false
            } else {
                true
            }
        });
        for ticket in done {
            self.events.push_back(Event::AbortDone(ticket));
        }
    }

    /// Sends the responses of task management functions whose aborted tasks have all
    /// ended, in the order the functions came; resets the units first.
    fn settle_tmfs(&mut self) {
        while let Some(t) = self.tmfs.first() {
            if !t.waiting.is_empty() || t.external.is_some() {
                return;
            }
            let t = self.tmfs.remove(0);
            if let Some((kind, units)) = &t.reset {
                for lu in units {
                    lu.reset(*kind, self.nexus.as_deref());
                }
            }
            let mut r = Pdu::new(opcode::TASK_MGMT_RSP);
            r.bhs[1] = 0x80;
            r.bhs[2] = t.response;
            r.set_u32(16, t.itt);
            self.seal(&mut r, true);
            self.send(&r);
            if t.cold {
                self.events.push_back(Event::TargetReset { cold: true });
                self.close();
            } else if matches!(t.reset, Some((ResetKind::TargetWarm, _))) {
                self.events.push_back(Event::TargetReset { cold: false });
            }
        }
    }

    fn text(&mut self, p: Pdu) {
        if !self.accept_cmd_sn(&p) {
            return;
        }
        let ttt = p.u32(20);
        let body: Vec<u8> = if ttt != 0xffff_ffff {
            match self.text_pending.take() {
                Some((t, rest)) if t == ttt => rest,
                _ => {
                    self.reject(0x09, &p);
                    return;
                }
            }
        } else {
            let keys = text::parse(&p.data);
            let mut out = Vec::new();
            for (k, v) in keys {
                if k == "SendTargets" {
                    let initiator = self.login.initiator.clone().unwrap_or_default();
                    let only = if self.login.discovery {
                        if v == "All" {
                            None
                        } else {
                            Some(v.clone())
                        }
                    } else {
                        Some(self.target.clone())
                    };
                    for (name, addrs) in
                        self.catalog
                            .send_targets(&initiator, only.as_deref(), &self.portal)
                    {
                        out.push(("TargetName".to_string(), name));
                        for a in addrs {
                            out.push(("TargetAddress".to_string(), a));
                        }
                    }
                } else if !k.is_empty() {
                    out.push((k, "NotUnderstood".into()));
                }
            }
            text::encode(&out)
        };
        let max = self.params.peer_mrdsl as usize;
        let mut r = Pdu::new(opcode::TEXT_RSP);
        r.set_u32(16, p.itt());
        if body.len() > max {
            let t = self.new_ttt();
            let (now, rest) = body.split_at(max);
            r.bhs[1] = 0x40;
            r.set_u32(20, t);
            r.data = Bytes::copy_from_slice(now);
            self.text_pending = Some((t, rest.to_vec()));
        } else {
            r.bhs[1] = 0x80;
            r.set_u32(20, 0xffff_ffff);
            r.data = Bytes::from(body);
        }
        self.seal(&mut r, true);
        self.send(&r);
    }

    fn logout(&mut self, p: Pdu) {
        if !self.accept_cmd_sn(&p) {
            return;
        }
        let mut r = Pdu::new(opcode::LOGOUT_RSP);
        r.bhs[1] = 0x80;
        r.bhs[2] = 0;
        r.set_u32(16, p.itt());
        self.seal(&mut r, true);
        self.send(&r);
        self.logout_pending = true;
        self.close();
    }

    // ----- Login -----

    fn login_reply(&mut self, req: &Pdu, transit: bool, nsg: u8, keys: &[(String, String)]) {
        let csg = (req.bhs[1] >> 2) & 3;
        let mut r = Pdu::new(opcode::LOGIN_RSP);
        r.bhs[1] = (csg << 2) | if transit { 0x80 | nsg } else { 0 };
        r.bhs[2] = 0;
        r.bhs[3] = 0;
        r.bhs[8..14].copy_from_slice(&self.login.isid);
        r.bhs[14..16].copy_from_slice(&self.login.tsih.to_be_bytes());
        r.set_u32(16, req.itt());
        self.seal(&mut r, true);
        r.data = Bytes::from(text::encode(keys));
        self.send(&r);
    }

    fn login_fail(&mut self, req: &Pdu, class: u8, detail: u8) {
        let mut r = Pdu::new(opcode::LOGIN_RSP);
        r.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        r.set_u32(16, req.itt());
        self.seal(&mut r, true);
        r.bhs[36] = class;
        r.bhs[37] = detail;
        self.send(&r);
        self.close();
    }

    fn handle_login(&mut self, p: Pdu) {
        let transit = p.bhs[1] & 0x80 != 0;
        let cont = p.bhs[1] & 0x40 != 0;
        let csg = (p.bhs[1] >> 2) & 3;
        let nsg = p.bhs[1] & 3;
        if transit && cont {
            return self.login_fail(&p, 2, 0x0b);
        }
        if !self.login.started {
            self.login.started = true;
            self.login.isid.copy_from_slice(&p.bhs[8..14]);
            self.login.tsih = be16(&p.bhs[14..16]);
            self.login.itt = p.itt();
            self.login.cid = be16(&p.bhs[20..22]);
            self.exp_cmd_sn = p.u32(24);
            self.stat_sn = p.u32(28);
            if p.bhs[3] > 0 {
                // Version-min above 0.
                return self.login_fail(&p, 2, 0x05);
            }
            if self.login.tsih != 0 {
                // Adding a connection to, or reinstating one of, an existing session
                // needs MC/S or ERL 2.
                return self.login_fail(&p, 2, 0x0a);
            }
        } else if p.bhs[8..14] != self.login.isid {
            return self.login_fail(&p, 2, 0x0b);
        }
        if self.login.text.len() + p.data.len() > text::MAX_TEXT {
            return self.login_fail(&p, 2, 0x0b);
        }
        self.login.text.extend_from_slice(&p.data);
        if cont {
            self.login_reply(&p, false, 0, &[]);
            return;
        }
        let keys = text::parse(&std::mem::take(&mut self.login.text));
        let mut reply: Vec<(String, String)> = Vec::new();
        let mut first_names = false;
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" => {
                    self.login.initiator = Some(v.to_ascii_lowercase());
                    first_names = true;
                }
                "TargetName" => self.login.target = Some(v.clone()),
                "SessionType" => self.login.discovery = v == "Discovery",
                _ => {}
            }
        }
        if self.login.grant.is_none() {
            let Some(initiator) = self.login.initiator.clone() else {
                return self.login_fail(&p, 2, 0x07);
            };
            let target = if self.login.discovery {
                None
            } else {
                match &self.login.target {
                    Some(t) => Some(t.clone()),
                    None => return self.login_fail(&p, 2, 0x07),
                }
            };
            match self
                .catalog
                .login(&initiator, target.as_deref(), &self.portal)
            {
                Ok(g) => {
                    if !self.login.discovery {
                        reply.push(("TargetPortalGroupTag".into(), g.tpgt.to_string()));
                    }
                    self.login.auth = Some(if g.chap.is_some() {
                        Auth::Start
                    } else {
                        Auth::Done
                    });
                    self.login.grant = Some(g);
                }
                Err(LoginDenied::NotFound) => return self.login_fail(&p, 2, 0x03),
                Err(LoginDenied::NotAuthorized) => return self.login_fail(&p, 2, 0x02),
            }
        }
        let _ = first_names;
        let chap = self.login.grant.as_ref().and_then(|g| g.chap.clone());
        // Security stage.
        if csg == 0 {
            if let Err((c, d)) = self.security(&keys, chap.as_ref(), &mut reply) {
                return self.login_fail(&p, c, d);
            }
        } else if self.login.auth != Some(Auth::Done) {
            // Skipping the security stage when authentication is required.
            return self.login_fail(&p, 2, 0x01);
        }
        if csg == 1 || csg == 0 {
            self.operational(&keys, &mut reply);
        }
        if csg == 3 || (csg == 1 && nsg == 1 && transit) {
            return self.login_fail(&p, 2, 0x0b);
        }
        let mut go = transit;
        if go && self.login.auth != Some(Auth::Done) {
            go = false;
        }
        if go && nsg == 3 {
            if !self.login.declared_mrdsl {
                reply.push((
                    "MaxRecvDataSegmentLength".into(),
                    self.cfg.max_recv_data.to_string(),
                ));
            }
            let mut tsih = [0u8; 2];
            let _ = getrandom::fill(&mut tsih);
            self.login.tsih = u16::from_be_bytes(tsih).max(1);
            self.login_reply(&p, true, 3, &reply);
            self.enter_full_feature();
            return;
        }
        self.login_reply(&p, go, nsg, &reply);
    }

    fn security(
        &mut self,
        keys: &[(String, String)],
        chap: Option<&ChapSecrets>,
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), (u8, u8)> {
        let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Some(methods) = get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            match chap {
                Some(_) if offered.contains(&"CHAP") => {
                    reply.push(("AuthMethod".into(), "CHAP".into()));
                    self.login.auth = Some(Auth::ChapAlgo);
                }
                Some(_) => return Err((2, 0x01)),
                None if offered.contains(&"None") => {
                    reply.push(("AuthMethod".into(), "None".into()));
                    self.login.auth = Some(Auth::Done);
                }
                None => return Err((2, 0x01)),
            }
        }
        match (self.login.auth.clone(), chap) {
            (Some(Auth::ChapAlgo), Some(_)) => {
                if let Some(a) = get("CHAP_A") {
                    if !a.split(',').any(|x| x == "5") {
                        return Err((2, 0x01));
                    }
                    let mut c = vec![0u8; 16];
                    let mut id = [0u8; 1];
                    if getrandom::fill(&mut c).is_err() || getrandom::fill(&mut id).is_err() {
                        return Err((3, 0x00));
                    }
                    reply.push(("CHAP_A".into(), "5".into()));
                    reply.push(("CHAP_I".into(), id[0].to_string()));
                    reply.push(("CHAP_C".into(), format!("0x{}", hex(&c))));
                    self.login.auth = Some(Auth::ChapChallenged(id[0], c));
                }
            }
            (Some(Auth::ChapChallenged(id, challenge)), Some(secrets)) => {
                let (Some(n), Some(r)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err((2, 0x01));
                };
                let Some(r) = unhex(&r) else {
                    return Err((2, 0x01));
                };
                if n != secrets.user
                    || r != chap_response(id, secrets.secret.as_bytes(), &challenge)
                {
                    return Err((2, 0x01));
                }
                match (get("CHAP_I"), get("CHAP_C")) {
                    (Some(ii), Some(ic)) => {
                        let Some((muser, msecret)) = &secrets.mutual else {
                            return Err((2, 0x01));
                        };
                        let (Ok(ii), Some(ic)) = (ii.parse::<u8>(), unhex(&ic)) else {
                            return Err((2, 0x01));
                        };
                        if ic == challenge || ic.is_empty() || ic.len() > 1024 {
                            // A reflected challenge would let a peer use us as an oracle.
                            return Err((2, 0x01));
                        }
                        reply.push(("CHAP_N".into(), muser.clone()));
                        reply.push((
                            "CHAP_R".into(),
                            format!("0x{}", hex(&chap_response(ii, msecret.as_bytes(), &ic))),
                        ));
                    }
                    (None, None) if secrets.mutual.is_some() => return Err((2, 0x01)),
                    (None, None) => {}
                    _ => return Err((2, 0x01)),
                }
                self.login.auth = Some(Auth::Done);
            }
            // The initiator must offer AuthMethod first.
            (Some(Auth::Start), Some(_)) if get("AuthMethod").is_none() => {
                return Err((2, 0x01));
            }
            _ => {}
        }
        Ok(())
    }

    fn operational(&mut self, keys: &[(String, String)], reply: &mut Vec<(String, String)>) {
        let num = |v: &str| v.parse::<u64>().ok();
        for (k, v) in keys {
            let (key, val): (&str, String) = match k.as_str() {
                "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType"
                | "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => continue,
                "HeaderDigest" | "DataDigest" => {
                    let pick = v
                        .split(',')
                        .find(|x| *x == "CRC32C" || *x == "None")
                        .unwrap_or("Reject");
                    let on = pick == "CRC32C";
                    if k == "HeaderDigest" {
                        self.params.header_digest = on;
                    } else {
                        self.params.data_digest = on;
                    }
                    (k, pick.to_string())
                }
                "MaxConnections" => (k, "1".into()),
                "InitialR2T" => {
                    self.params.initial_r2t = v == "Yes" || !self.cfg.allow_unsolicited;
                    (k, yes_no(self.params.initial_r2t))
                }
                "ImmediateData" => {
                    self.params.immediate_data = v == "Yes" && self.cfg.immediate_data;
                    (k, yes_no(self.params.immediate_data))
                }
                "MaxRecvDataSegmentLength" => {
                    if let Some(n) = num(v) {
                        self.params.peer_mrdsl = n.clamp(512, 16_777_215) as u32;
                    }
                    self.login.declared_mrdsl = true;
                    (
                        "MaxRecvDataSegmentLength",
                        self.cfg.max_recv_data.to_string(),
                    )
                }
                "MaxBurstLength" => {
                    let n = num(v)
                        .unwrap_or(262_144)
                        .clamp(512, u64::from(self.cfg.max_burst));
                    self.params.max_burst = n as u32;
                    (k, n.to_string())
                }
                "FirstBurstLength" => {
                    let n = num(v)
                        .unwrap_or(65_536)
                        .clamp(512, u64::from(self.cfg.first_burst));
                    self.params.first_burst = n as u32;
                    (k, n.to_string())
                }
                "DefaultTime2Wait" => (k, num(v).unwrap_or(2).clamp(2, 3600).to_string()),
                "DefaultTime2Retain" => (k, "0".into()),
                "MaxOutstandingR2T" => (k, "1".into()),
                "DataPDUInOrder" | "DataSequenceInOrder" => (k, "Yes".into()),
                "ErrorRecoveryLevel" => (k, "0".into()),
                "IFMarker" | "OFMarker" => (k, "No".into()),
                "OFMarkInt" | "IFMarkInt" => (k, "Irrelevant".into()),
                "" => continue,
                _ => (k, "NotUnderstood".into()),
            };
            if !reply.iter().any(|(rk, _)| rk == key) {
                reply.push((key.to_string(), val));
            }
        }
        if !self.cfg.immediate_data
            && self.params.immediate_data
            && !reply.iter().any(|(k, _)| k == "ImmediateData")
        {
            self.params.immediate_data = false;
            reply.push(("ImmediateData".into(), "No".into()));
        }
        if self.params.first_burst > self.params.max_burst {
            self.params.first_burst = self.params.max_burst;
        }
    }

    fn enter_full_feature(&mut self) {
        self.phase = Phase::Full;
        self.tx.header_digest = self.params.header_digest;
        self.tx.data_digest = self.params.data_digest;
        self.rx = Framing {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_data: self.cfg.max_recv_data as usize,
        };
        let grant = self.login.grant.take();
        let initiator = self.login.initiator.clone().unwrap_or_default();
        match grant {
            Some(g) if !self.login.discovery => {
                let nexus = Arc::new(NexusId {
                    initiator,
                    isid: self.login.isid,
                    target: g.target.clone(),
                    rel_port: g.tpgt,
                });
                if let Some(l) = &g.luns {
                    for n in l.list() {
                        if let Some(lu) = l.lun(n) {
                            lu.attach(&nexus);
                        }
                    }
                }
                self.target = g.target.clone();
                self.luns = g.luns;
                self.nexus = Some(nexus.clone());
                self.events.push_back(Event::LoggedIn {
                    nexus: Some(nexus),
                    target: g.target,
                });
            }
            _ => {
                self.events.push_back(Event::LoggedIn {
                    nexus: None,
                    target: String::new(),
                });
            }
        }
    }
}

/// The CDB bytes of a SCSI Command BHS.
fn cdb16(bhs: &[u8; pdu::BHS_LEN]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c.copy_from_slice(&bhs[32..48]);
    c
}

/// Alignment of Data-Out buffers: what O_DIRECT needs, so that a block device can
/// write them as they are, without a bounce copy.
const DATA_ALIGN: usize = 4096;
/// Largest Data-Out buffer allocated up front; longer transfers grow it.
const DATA_PREALLOC: usize = 16 << 20;

/// Appends Data-Out bytes to the task's buffer. The first call allocates the whole
/// transfer (up to [`DATA_PREALLOC`]) at a [`DATA_ALIGN`]-aligned start, so there is
/// neither a reallocation nor a bounce copy below.
fn put_data(t: &mut Task, b: &[u8]) {
    if t.data.capacity() == 0 {
        let total = (t.spdtl_out.min(u64::from(t.edtl)) as usize)
            .min(DATA_PREALLOC)
            .max(b.len());
        let mut buf = BytesMut::with_capacity(total + DATA_ALIGN - 1);
        let skip = buf.as_ptr().align_offset(DATA_ALIGN).min(DATA_ALIGN - 1);
        buf.put_bytes(0, skip);
        buf.advance(skip);
        t.data = buf;
    }
    t.data.extend_from_slice(b);
}

/// Hashes initiator task tags (and other small integers) with one multiplication: a
/// connection has at most a few hundred tasks, so collisions cost little, and SipHash
/// cost more than the rest of a lookup.
#[derive(Default)]
pub(crate) struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// How many of `len` Data-Out bytes at `offset` to keep: nothing past what the CDB
/// can use.
fn keep_len(t: &Task, offset: usize, len: usize) -> usize {
    let cap = t.spdtl_out as usize;
    cap.saturating_sub(offset).min(len)
}

/// The 8-byte LUN field for a LUN number.
fn basalt_scsi_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
        b[1] = lun as u8;
    }
    b
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// MD5(id || secret || challenge) (RFC 1994).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().to_vec()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes `0x...` hex (RFC 7143 binary value).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if s.len() % 2 != 0 || s.len() > 2048 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{
        mem_unit, read16, write16, GateDev, Pair, TestCatalog, TestLuns, TARGET,
    };
    use basalt_scsi::LunIdentity;
    use std::collections::BTreeMap;

    fn key<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
        keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    fn gated_unit(id: u128) -> (Arc<GateDev>, Arc<LogicalUnit>) {
        let dev = GateDev::new(16);
        let lu = Arc::new(LogicalUnit::new(dev.clone(), LunIdentity::new(id), None));
        (dev, lu)
    }

    /// The (key, ASC, ASCQ) of the fixed-format sense in a SCSI Response.
    fn sense_of(r: &Pdu) -> (u8, u8, u8) {
        let s = &r.data[2..];
        (s[2] & 0x0f, s[12], s[13])
    }

    #[test]
    fn negotiation_clamps_and_declines() {
        let cfg = ConnConfig::default();
        let mut p = Pair::with_units(cfg.clone(), &[(0, mem_unit(1, 16))]);
        let reply = p.login(&[
            ("MaxBurstLength", "16777215"),
            ("FirstBurstLength", "16777215"),
            ("MaxConnections", "8"),
            ("MaxOutstandingR2T", "4"),
            ("ErrorRecoveryLevel", "2"),
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("X-com.example.Vendor", "1"),
        ]);
        let want_burst = cfg.max_burst.to_string();
        let want_first = cfg.first_burst.to_string();
        let want_mrdsl = cfg.max_recv_data.to_string();
        assert_eq!(key(&reply, "MaxBurstLength"), Some(want_burst.as_str()));
        assert_eq!(key(&reply, "FirstBurstLength"), Some(want_first.as_str()));
        // One connection per session, one R2T per task, ERL 0: whatever is offered.
        assert_eq!(key(&reply, "MaxConnections"), Some("1"));
        assert_eq!(key(&reply, "MaxOutstandingR2T"), Some("1"));
        assert_eq!(key(&reply, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(key(&reply, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(key(&reply, "DataDigest"), Some("None"));
        assert_eq!(
            key(&reply, "MaxRecvDataSegmentLength"),
            Some(want_mrdsl.as_str())
        );
        assert_eq!(key(&reply, "X-com.example.Vendor"), Some("NotUnderstood"));
        assert_eq!(p.conn.params().peer_mrdsl, 8192);
        // Header digests are on from the first full-feature PDU, both ways.
        let mut nop = Pdu::new(opcode::NOP_OUT | 0x40);
        nop.bhs[1] = 0x80;
        nop.set_u32(16, 77);
        nop.set_u32(20, 0xffff_ffff);
        nop.set_u32(24, p.cmd_sn);
        nop.data = Bytes::from_static(b"ping");
        p.send(&nop);
        let r = p.recv();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].opcode(), r[0].itt()), (opcode::NOP_IN, 77));
        assert_eq!(&r[0].data[..], b"ping");
    }

    #[test]
    fn login_errors() {
        let unit = mem_unit(1, 16);
        // No InitiatorName: 02/07 (missing parameter).
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, unit.clone())]);
        let (r, _) = p.login_step(1, 3, true, &[("TargetName", TARGET)]);
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x07));
        assert!(p.conn.is_closed());
        // Unknown target: 02/03.
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, unit.clone())]);
        let (r, _) = p.login_step(
            1,
            3,
            true,
            &[
                ("InitiatorName", "iqn.2026-11.test:i"),
                ("TargetName", "iqn.2026-11.test:nope"),
            ],
        );
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x03));
        // A non-zero TSIH (adding a connection to a session): 02/0a, no MC/S.
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, unit.clone())]);
        let mut q = p.login_pdu(
            1,
            3,
            true,
            &[
                ("InitiatorName", "iqn.2026-11.test:i"),
                ("TargetName", TARGET),
            ],
        );
        q.bhs[15] = 7;
        p.send(&q);
        let r = p.recv().pop().unwrap();
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x0a));
        // Transit and Continue together: 02/0b.
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, unit)]);
        let mut q = p.login_pdu(
            1,
            3,
            true,
            &[
                ("InitiatorName", "iqn.2026-11.test:i"),
                ("TargetName", TARGET),
            ],
        );
        q.bhs[1] |= 0x40;
        p.send(&q);
        let r = p.recv().pop().unwrap();
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x0b));
    }

    fn chap_pair(mutual: bool) -> Pair {
        let luns = Arc::new(TestLuns(BTreeMap::from([(0, mem_unit(1, 16))])));
        let chap = ChapSecrets {
            user: "alice".into(),
            secret: "alice-secret-12".into(),
            mutual: mutual.then(|| ("target".into(), "target-secret-1".into())),
        };
        Pair::new(
            ConnConfig::default(),
            Arc::new(TestCatalog {
                luns,
                chap: Some(chap),
            }),
        )
    }

    /// Runs the CHAP exchange up to the response; returns the final login response.
    fn chap_login(
        p: &mut Pair,
        secret: &str,
        mutual_challenge: Option<&[u8]>,
    ) -> (Pdu, Vec<(String, String)>) {
        let names = [
            ("InitiatorName", "iqn.2026-11.test:i"),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP,None"),
        ];
        let (r, keys) = p.login_step(0, 1, true, &names);
        assert_eq!(key(&keys, "AuthMethod"), Some("CHAP"));
        assert_eq!(r.bhs[1] & 0x80, 0, "no transit before authentication");
        let (_, keys) = p.login_step(0, 1, false, &[("CHAP_A", "7,5")]);
        assert_eq!(key(&keys, "CHAP_A"), Some("5"));
        let id: u8 = key(&keys, "CHAP_I").unwrap().parse().unwrap();
        let challenge = unhex(key(&keys, "CHAP_C").unwrap()).unwrap();
        let resp = format!(
            "0x{}",
            hex(&chap_response(id, secret.as_bytes(), &challenge))
        );
        let mut answer = vec![("CHAP_N", "alice"), ("CHAP_R", resp.as_str())];
        let ic;
        if let Some(c) = mutual_challenge {
            ic = format!("0x{}", hex(c));
            answer.push(("CHAP_I", "9"));
            answer.push(("CHAP_C", ic.as_str()));
        }
        p.login_step(0, 1, true, &answer)
    }

    #[test]
    fn chap_and_mutual_chap() {
        // Right secret: on to the operational stage, then full feature phase.
        let mut p = chap_pair(false);
        let (r, _) = chap_login(&mut p, "alice-secret-12", None);
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0));
        assert_eq!(r.bhs[1] & 0x83, 0x81);
        let (r, _) = p.login_step(1, 3, true, &[]);
        assert_eq!(r.bhs[1] & 0x83, 0x83);
        // Wrong secret: 02/01 and the connection closes.
        let mut p = chap_pair(false);
        let (r, _) = chap_login(&mut p, "not-the-secret", None);
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x01));
        assert!(p.conn.is_closed());
        // Skipping the security stage when CHAP is required: 02/01.
        let mut p = chap_pair(false);
        let (r, _) = p.login_step(
            1,
            3,
            true,
            &[
                ("InitiatorName", "iqn.2026-11.test:i"),
                ("TargetName", TARGET),
            ],
        );
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x01));
        // Mutual: the target proves it knows its secret.
        let mut p = chap_pair(true);
        let challenge = [5u8; 16];
        let (r, keys) = chap_login(&mut p, "alice-secret-12", Some(&challenge));
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0));
        assert_eq!(key(&keys, "CHAP_N"), Some("target"));
        let want = chap_response(9, b"target-secret-1", &challenge);
        assert_eq!(unhex(key(&keys, "CHAP_R").unwrap()), Some(want));
        // Mutual CHAP configured but the initiator does not ask: refused.
        let mut p = chap_pair(true);
        let (r, _) = chap_login(&mut p, "alice-secret-12", None);
        assert_eq!((r.bhs[36], r.bhs[37]), (2, 0x01));
    }

    fn r2t_pair() -> Pair {
        let cfg = ConnConfig {
            immediate_data: false,
            allow_unsolicited: false,
            ..ConnConfig::default()
        };
        let mut p = Pair::with_units(cfg, &[(0, mem_unit(1, 16))]);
        p.login(&[
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "4096"),
        ]);
        p
    }

    #[test]
    fn writes_are_solicited_one_burst_at_a_time() {
        let mut p = r2t_pair();
        let data: Vec<u8> = (0..12288u32).map(|i| (i * 7) as u8).collect();
        let (itt, cmd) = p.command(0, &write16(8, 24), 12288, false, true);
        p.send(&cmd);
        for burst in 0..3u32 {
            let r = p.recv();
            assert_eq!(r.len(), 1, "one R2T at a time (MaxOutstandingR2T=1)");
            let r2t = &r[0];
            assert_eq!(r2t.opcode(), opcode::R2T);
            assert_eq!((r2t.itt(), r2t.u32(36)), (itt, burst));
            assert_eq!((r2t.u32(40), r2t.u32(44)), (burst * 4096, 4096));
            let ttt = r2t.u32(20);
            // The burst in two Data-Out PDUs, DataSN counting from 0 in each burst.
            let off = (burst * 4096) as usize;
            for (sn, half) in [(0u32, 0usize), (1, 2048)] {
                let chunk = Bytes::copy_from_slice(&data[off + half..off + half + 2048]);
                let fin = half == 2048;
                p.send(&Pair::data_out(
                    itt,
                    ttt,
                    sn,
                    (off + half) as u32,
                    chunk,
                    fin,
                ));
            }
        }
        let r = p.recv();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].opcode(), r[0].itt(), r[0].bhs[3]),
            (opcode::SCSI_RSP, itt, 0)
        );
        let (_, cmd) = p.command(0, &read16(8, 24), 12288, true, false);
        p.send(&cmd);
        let r = p.recv();
        let got: Vec<u8> = r.iter().flat_map(|d| d.data.to_vec()).collect();
        assert_eq!(got, data);
    }

    #[test]
    fn out_of_order_data_out_is_rejected() {
        // Wrong offset, then wrong DataSN: ERL 0 cannot recover either; the PDU is
        // rejected and the connection dropped.
        for (bad_sn, bad_off) in [(0u32, 1024u32), (1, 0)] {
            let mut p = r2t_pair();
            let (itt, cmd) = p.command(0, &write16(0, 8), 4096, false, true);
            p.send(&cmd);
            let ttt = p.recv()[0].u32(20);
            let chunk = Bytes::from(vec![1u8; 1024]);
            p.send(&Pair::data_out(itt, ttt, bad_sn, bad_off, chunk, false));
            let r = p.recv();
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].opcode(), r[0].bhs[2]), (opcode::REJECT, 0x09));
            assert!(p.conn.is_closed());
            assert!(p.events.iter().any(|e| matches!(e, Event::Close)));
        }
        // Unsolicited Data-Out when InitialR2T=Yes: rejected, the connection stays.
        let mut p = r2t_pair();
        let (itt, cmd) = p.command(0, &write16(0, 8), 4096, false, true);
        p.send(&cmd);
        let _ = p.recv();
        let chunk = Bytes::from(vec![1u8; 1024]);
        p.send(&Pair::data_out(itt, 0xffff_ffff, 0, 0, chunk, false));
        let r = p.recv();
        assert_eq!((r[0].opcode(), r[0].bhs[2]), (opcode::REJECT, 0x09));
        assert!(!p.conn.is_closed());
    }

    #[test]
    fn abort_of_running_command_answers_after_it_ends() {
        let (gate, lu) = gated_unit(1);
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, lu)]);
        p.login(&[]);
        gate.set_open(false);
        let (itt, cmd) = p.command(0, &read16(0, 8), 4096, true, false);
        p.send(&cmd);
        assert_eq!(p.running(), 1);
        let (tmf_itt, tmf) = p.tmf(1, 0, itt);
        p.send(&tmf);
        assert!(p.recv().is_empty(), "no TMF response while the read runs");
        gate.set_open(true);
        p.run();
        let r = p.recv();
        assert_eq!(
            r.len(),
            1,
            "only the TMF response: {:?}",
            r.iter().map(|x| x.opcode()).collect::<Vec<_>>()
        );
        assert_eq!(
            (r[0].opcode(), r[0].itt(), r[0].bhs[2]),
            (opcode::TASK_MGMT_RSP, tmf_itt, 0)
        );
    }

    #[test]
    fn lun_reset_aborts_other_sessions_tasks() {
        let (gate, lu) = gated_unit(1);
        let mut a = Pair::with_units(ConnConfig::default(), &[(0, lu.clone())]);
        a.initiator = "iqn.2026-11.test:a".into();
        a.login(&[]);
        let mut b = Pair::with_units(ConnConfig::default(), &[(0, lu)]);
        b.initiator = "iqn.2026-11.test:b".into();
        b.login(&[]);
        gate.set_open(false);
        let (a_itt, cmd) = a.command(0, &read16(0, 8), 4096, true, false);
        a.send(&cmd);
        let (tmf_itt, tmf) = b.tmf(5, 0, 0);
        b.send(&tmf);
        // B asks its driver to abort A's tasks on the unit (what server.rs does).
        let (ticket, units) = b
            .events
            .iter()
            .find_map(|e| match e {
                Event::AbortElsewhere { ticket, units } => Some((*ticket, units.clone())),
                _ => None,
            })
            .unwrap();
        let a_ticket = a.conn.abort_for_others(&units).expect("a task is running");
        assert!(b.recv().is_empty(), "the reset waits for A's read");
        gate.set_open(true);
        a.run();
        assert!(a
            .events
            .iter()
            .any(|e| matches!(e, Event::AbortDone(t) if *t == a_ticket)));
        // A's read ends with TASK ABORTED (TAS 1), without data.
        let r = a.recv();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].opcode(), r[0].itt(), r[0].bhs[3]),
            (opcode::SCSI_RSP, a_itt, 0x40)
        );
        b.conn.abort_elsewhere_done(ticket);
        let r = b.recv();
        assert_eq!(
            (r[0].opcode(), r[0].itt(), r[0].bhs[2]),
            (opcode::TASK_MGMT_RSP, tmf_itt, 0)
        );
        // A learns of the reset from a unit attention (29/03), B does not.
        let (_, tur) = a.command(0, &[0u8; 6], 0, false, false);
        a.send(&tur);
        let r = a.recv();
        assert_eq!(r[0].bhs[3], 2);
        assert_eq!(sense_of(&r[0]), (6, 0x29, 0x03));
        let (_, tur) = b.command(0, &[0u8; 6], 0, false, false);
        b.send(&tur);
        assert_eq!(b.recv()[0].bhs[3], 0);
    }

    #[test]
    fn large_read_is_queued_without_copying() {
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, mem_unit(1, 16))]);
        p.login(&[
            ("MaxRecvDataSegmentLength", "262144"),
            ("MaxBurstLength", "262144"),
        ]);
        let (itt, cmd) = p.command(0, &read16(0, 2048), 1 << 20, true, false);
        p.send(&cmd);
        // Four headers and the four 256 KiB slices of the device's buffer.
        assert_eq!(p.conn.outgoing().pieces(), 8);
        let r = p.recv();
        assert_eq!(r.len(), 4);
        for (i, d) in r.iter().enumerate() {
            assert_eq!((d.opcode(), d.itt()), (opcode::DATA_IN, itt));
            assert_eq!((d.u32(36), d.u32(40)), (i as u32, (i << 18) as u32));
            assert_eq!(d.data.len(), 1 << 18);
            assert_eq!(d.bhs[1] & 0x80, 0x80, "each PDU ends a 256 KiB burst");
            assert_eq!(
                d.bhs[1] & 0x01 != 0,
                i == 3,
                "status with the last one only"
            );
        }
    }

    #[test]
    fn responses_to_a_batch_go_out_together() {
        let mut p = Pair::with_units(ConnConfig::default(), &[(0, mem_unit(1, 16))]);
        p.login(&[]);
        let mut wire = BytesMut::new();
        for i in 0..32u64 {
            let (_, cmd) = p.command(0, &read16(i * 8, 8), 4096, true, false);
            cmd.encode(&p.framing, &mut wire);
        }
        p.send_bytes(wire);
        // One header piece and one data piece per command, ready for one writev.
        assert_eq!(p.conn.outgoing().pieces(), 64);
        let r = p.recv();
        assert_eq!(r.len(), 32);
        assert!(r
            .iter()
            .all(|d| d.opcode() == opcode::DATA_IN && d.bhs[1] & 0x81 == 0x81));
    }
}

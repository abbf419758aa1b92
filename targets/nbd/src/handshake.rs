//! The fixed-newstyle handshake as a sans-IO state machine.
//!
//! # Use
//!
//! 1. [`Handshake::new`] queues the server greeting; send what [`Handshake::poll_transmit`]
//!    returns.
//! 2. Append every byte read from the peer to one `BytesMut` and call
//!    [`Handshake::handle_input`] with it. It consumes whole messages only (each option is
//!    checked for completeness before it is parsed; a partial one stays in the buffer),
//!    queues replies, and returns an event when the driver has to act. After every call,
//!    send what `poll_transmit` returns *before* acting on the event.
//! 3. [`HandshakeEvent::StartTls`]: upgrade the connection to TLS (the client waits for
//!    the ACK before it sends anything, so the input buffer is empty; if it is not, the
//!    client broke the protocol), then call [`Handshake::tls_established`] and go on
//!    feeding the decrypted bytes. [`HandshakeEvent::Go`]: enter the transmission phase
//!    with the [`Negotiated`] parameters; bytes left in the buffer belong to it.
//!    [`HandshakeEvent::Abort`] and [`HandshakeEvent::Refuse`]: close the connection.
//!
//! Options are bounded: an option whose data is longer than [`MAX_OPTION_DATA`] is
//! skipped as it arrives (never buffered) and answered with `NBD_REP_ERR_TOO_BIG`, so a
//! peer cannot make the server hold more than one bounded message.
//!
//! Exports are resolved through a [`Catalog`] supplied by the driver on every call, so
//! the answer reflects the configuration of the moment and the access rules for this
//! peer; the core itself knows nothing of devices, addresses or configuration.

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, tx_flags};
use crate::wire::{protocol_string, Output, Reader};
use bytes::{Buf, Bytes, BytesMut};

/// Longest option data accepted; longer options are skipped and refused with
/// `NBD_REP_ERR_TOO_BIG`. Room for an export name and a few queries of maximal length.
pub const MAX_OPTION_DATA: u32 = 16 * 1024;

/// Most queries accepted in one `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub const MAX_META_QUERIES: u32 = 128;

/// The metadata context id given to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Which TLS mode this connection runs in (the protocol document's NOTLS, SELECTIVETLS
/// without TLS-only exports, and FORCEDTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// TLS at the client's choice.
    Allow,
    /// Every option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up; `NBD_OPT_EXPORT_NAME` before that closes the connection.
    Require,
}

/// What the server tells a client about an export, and what it allows on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name (the LUN name).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`), if any.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Minimum block size: the device's logical block size.
    pub min_block_size: u32,
    /// Preferred block size.
    pub preferred_block_size: u32,
    /// Maximum block size (the largest READ/WRITE accepted).
    pub max_block_size: u32,
    /// Writes are refused with `EPERM`.
    pub read_only: bool,
    /// The device can discard (advertise `NBD_CMD_TRIM`).
    pub trim: bool,
    /// FLUSH and FUA on one connection cover every connection (advertise
    /// `NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// The medium is rotational.
    pub rotational: bool,
}

impl ExportInfo {
    /// The transmission flags for this export; `structured` says whether structured
    /// replies are negotiated (which `NBD_FLAG_SEND_DF` requires).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f =
            tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA | tx_flags::SEND_CACHE;
        if self.read_only {
            f |= tx_flags::READ_ONLY;
        } else {
            f |= tx_flags::SEND_WRITE_ZEROES | tx_flags::SEND_FAST_ZERO;
            if self.trim {
                f |= tx_flags::SEND_TRIM;
            }
        }
        if structured {
            f |= tx_flags::SEND_DF;
        }
        if self.multi_conn {
            f |= tx_flags::CAN_MULTI_CONN;
        }
        if self.rotational {
            f |= tx_flags::ROTATIONAL;
        }
        f
    }
}

/// The answer of a [`Catalog`] for one export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The export exists and this peer may use it.
    Found(ExportInfo),
    /// No such export.
    Unknown,
    /// The export exists but this peer may not use it.
    Denied,
}

/// The exports as this peer sees them, supplied by the driver.
pub trait Catalog {
    /// Names of the exports this peer may use (for `NBD_OPT_LIST`).
    fn list(&self) -> Vec<String>;
    /// Resolves a name (the empty name is the default export, if there is one).
    fn lookup(&self, name: &str) -> Lookup;
}

/// What the handshake settled, for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export.
    pub export: ExportInfo,
    /// The transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// The id of `base:allocation` if it was selected for this export.
    pub meta_context: Option<u32>,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`, so it promised to
    /// honour the block sizes; unaligned requests are then refused with `EINVAL`.
    /// Otherwise they are served (read-modify-write where needed).
    pub block_sizes_agreed: bool,
    /// The connection runs over TLS.
    pub tls: bool,
}

/// Why the server closes the connection during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The client flags had unknown bits.
    #[error("client flags {0:#x} have unknown bits")]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#x} is not IHAVEOPT")]
    BadMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be used (no error reply exists).
    #[error("export {0:?} refused at NBD_OPT_EXPORT_NAME")]
    ExportRefused(String),
    /// TLS is required but the client did not (or could not) start it.
    #[error("TLS is required")]
    TlsRequired,
    /// The server is shutting down and the client chose an export.
    #[error("the server is shutting down")]
    Shutdown,
}

/// What the driver must do after [`Handshake::handle_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// Send the queued output, then upgrade to TLS and call
    /// [`Handshake::tls_established`].
    StartTls,
    /// Send the queued output, then enter the transmission phase.
    Go(Box<Negotiated>),
    /// The client aborted (`NBD_OPT_ABORT`); send the queued output and close.
    Abort,
    /// Close the connection (after sending the queued output).
    Refuse(HandshakeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Finished,
}

/// The server side of one connection's handshake. See the [module docs](self).
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    tls: TlsPolicy,
    tls_active: bool,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Canonical name of the export whose `base:allocation` is selected.
    meta: Option<String>,
    shutting_down: bool,
    /// Bytes of an oversized option still to discard, and its option code.
    skip: u64,
    skip_opt: u32,
    out: Output,
}

impl Handshake {
    /// Starts a handshake and queues the greeting.
    pub fn new(tls: TlsPolicy) -> Self {
        let mut out = Output::new();
        out.put_u64(proto::NBDMAGIC);
        out.put_u64(proto::IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        Handshake {
            phase: Phase::ClientFlags,
            tls,
            tls_active: false,
            fixed: false,
            no_zeroes: false,
            structured: false,
            meta: None,
            shutting_down: false,
            skip: 0,
            skip_opt: 0,
            out,
        }
    }

    /// Bytes to send to the client, if any. Call after `new` and after every
    /// [`Handshake::handle_input`].
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        // The handshake queues no file ranges, the only thing `take` can fail on.
        self.out.take().ok().filter(|b| !b.is_empty())
    }

    /// True once TLS is up on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake completed: from now on every byte is encrypted. Forgets the
    /// negotiation state set before (structured replies, metadata contexts), as the
    /// protocol requires.
    pub fn tls_established(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }

    /// The server is shutting down: every further option but `NBD_OPT_ABORT` is
    /// answered with `NBD_REP_ERR_SHUTDOWN`.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Consumes whole messages from `input` and returns the first event that needs the
    /// driver, or `None` when more input is needed. See the [module docs](self).
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn Catalog,
    ) -> Option<HandshakeEvent> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(input.len() as u64);
                input.advance(n as usize);
                self.skip -= n;
                if self.skip > 0 {
                    return None;
                }
                let o = self.skip_opt;
                self.reply_error(o, rep::ERR_TOO_BIG, "option data too long");
                continue;
            }
            match self.phase {
                Phase::Finished => return None,
                Phase::ClientFlags => {
                    if input.len() < 4 {
                        return None;
                    }
                    let flags = input.get_u32();
                    let known = client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES;
                    if flags & !known != 0 {
                        return Some(
                            self.finish(HandshakeEvent::Refuse(HandshakeError::ClientFlags(flags))),
                        );
                    }
                    self.fixed = flags & client_flags::C_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & client_flags::C_NO_ZEROES != 0;
                    // TLS needs fixed newstyle; a server that insists on TLS cannot serve
                    // this client at all.
                    if !self.fixed && self.tls == TlsPolicy::Require {
                        return Some(
                            self.finish(HandshakeEvent::Refuse(HandshakeError::TlsRequired)),
                        );
                    }
                    self.phase = Phase::Options;
                }
                Phase::Options => {
                    if input.len() < 16 {
                        return None;
                    }
                    let magic = u64::from_be_bytes(prefix8(input));
                    if magic != proto::IHAVEOPT {
                        return Some(
                            self.finish(HandshakeEvent::Refuse(HandshakeError::BadMagic(magic))),
                        );
                    }
                    let option = u32::from_be_bytes([input[8], input[9], input[10], input[11]]);
                    let len = u32::from_be_bytes([input[12], input[13], input[14], input[15]]);
                    if len > MAX_OPTION_DATA {
                        if option == opt::EXPORT_NAME {
                            // No error reply exists for EXPORT_NAME, and no name is this
                            // long.
                            return Some(self.finish(HandshakeEvent::Refuse(
                                HandshakeError::ExportRefused("<too long>".into()),
                            )));
                        }
                        input.advance(16);
                        self.skip = u64::from(len);
                        self.skip_opt = option;
                        continue;
                    }
                    let total = 16 + len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return None;
                    }
                    let frame = input.split_to(total).freeze();
                    let data = frame.slice(16..);
                    if let Some(ev) = self.handle_option(option, &data, catalog) {
                        return Some(ev);
                    }
                }
            }
        }
    }

    fn finish(&mut self, ev: HandshakeEvent) -> HandshakeEvent {
        self.phase = Phase::Finished;
        ev
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.put_u64(proto::OPTION_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn Catalog,
    ) -> Option<HandshakeEvent> {
        if self.shutting_down && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Some(self.finish(HandshakeEvent::Refuse(HandshakeError::Shutdown)));
            }
            self.reply_error(option, rep::ERR_SHUTDOWN, "server shutting down");
            return None;
        }
        if self.tls == TlsPolicy::Require && !self.tls_active {
            match option {
                opt::STARTTLS | opt::ABORT => {}
                opt::EXPORT_NAME => {
                    return Some(self.finish(HandshakeEvent::Refuse(HandshakeError::TlsRequired)))
                }
                _ => {
                    self.reply_error(option, rep::ERR_TLS_REQD, "TLS is required");
                    return None;
                }
            }
        }
        match option {
            opt::EXPORT_NAME => return self.export_name(data, catalog),
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                return Some(self.finish(HandshakeEvent::Abort));
            }
            opt::LIST => self.list(data, catalog),
            opt::STARTTLS => return self.starttls(data),
            opt::INFO | opt::GO => return self.info_or_go(option, data, catalog),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(option, rep::ERR_INVALID, "no data expected");
                } else if self.structured {
                    self.reply_error(option, rep::ERR_INVALID, "already negotiated");
                } else {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, catalog)
            }
            _ => self.reply_error(option, rep::ERR_UNSUP, "option not supported"),
        }
        None
    }

    fn export_name(&mut self, data: &[u8], catalog: &dyn Catalog) -> Option<HandshakeEvent> {
        let Some(name) = protocol_string(data) else {
            return Some(
                self.finish(HandshakeEvent::Refuse(HandshakeError::ExportRefused(
                    String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned(),
                ))),
            );
        };
        let export = match catalog.lookup(&name) {
            Lookup::Found(e) => e,
            Lookup::Unknown | Lookup::Denied => {
                return Some(
                    self.finish(HandshakeEvent::Refuse(HandshakeError::ExportRefused(name))),
                )
            }
        };
        let flags = export.transmission_flags(self.structured);
        self.out.put_u64(export.size);
        self.out.put_u16(flags);
        if !self.no_zeroes {
            self.out.put_slice(&[0u8; 124]);
        }
        let neg = self.negotiated(export, flags, false);
        Some(self.finish(HandshakeEvent::Go(Box::new(neg))))
    }

    fn negotiated(&self, export: ExportInfo, flags: u16, block_sizes_agreed: bool) -> Negotiated {
        let meta_context = match &self.meta {
            Some(name) if *name == export.name && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Negotiated {
            export,
            flags,
            structured: self.structured,
            meta_context,
            block_sizes_agreed,
            tls: self.tls_active,
        }
    }

    fn list(&mut self, data: &[u8], catalog: &dyn Catalog) {
        if !data.is_empty() {
            self.reply_error(opt::LIST, rep::ERR_INVALID, "no data expected");
            return;
        }
        for name in catalog.list() {
            let mut body = Vec::with_capacity(4 + name.len());
            body.extend_from_slice(&(name.len() as u32).to_be_bytes());
            body.extend_from_slice(name.as_bytes());
            self.reply(opt::LIST, rep::SERVER, &body);
        }
        self.reply(opt::LIST, rep::ACK, &[]);
    }

    fn starttls(&mut self, data: &[u8]) -> Option<HandshakeEvent> {
        if !data.is_empty() {
            self.reply_error(opt::STARTTLS, rep::ERR_INVALID, "no data expected");
            return None;
        }
        if self.tls_active {
            self.reply_error(opt::STARTTLS, rep::ERR_INVALID, "TLS already active");
            return None;
        }
        if self.tls == TlsPolicy::Off || !self.fixed {
            self.reply_error(opt::STARTTLS, rep::ERR_POLICY, "TLS is not enabled");
            return None;
        }
        self.reply(opt::STARTTLS, rep::ACK, &[]);
        Some(HandshakeEvent::StartTls)
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn Catalog,
    ) -> Option<HandshakeEvent> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.reply_error(option, rep::ERR_INVALID, "malformed request");
            return None;
        };
        let export = match catalog.lookup(&name) {
            Lookup::Found(e) => e,
            Lookup::Unknown => {
                self.reply_error(option, rep::ERR_UNKNOWN, "no such export");
                return None;
            }
            Lookup::Denied => {
                self.reply_error(option, rep::ERR_POLICY, "access to this export denied");
                return None;
            }
        };
        let flags = export.transmission_flags(self.structured);
        let mut body = Vec::with_capacity(14);
        body.extend_from_slice(&info::EXPORT.to_be_bytes());
        body.extend_from_slice(&export.size.to_be_bytes());
        body.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, rep::INFO, &body);
        if requests.contains(&info::NAME) {
            let mut body = info::NAME.to_be_bytes().to_vec();
            body.extend_from_slice(export.name.as_bytes());
            self.reply(option, rep::INFO, &body);
        }
        if requests.contains(&info::DESCRIPTION) {
            if let Some(d) = &export.description {
                let mut body = info::DESCRIPTION.to_be_bytes().to_vec();
                body.extend_from_slice(d.as_bytes());
                self.reply(option, rep::INFO, &body);
            }
        }
        // Sent whether asked for or not: clients that did not ask may ignore it, and
        // those that did are bound by it.
        let mut body = info::BLOCK_SIZE.to_be_bytes().to_vec();
        body.extend_from_slice(&export.min_block_size.to_be_bytes());
        body.extend_from_slice(&export.preferred_block_size.to_be_bytes());
        body.extend_from_slice(&export.max_block_size.to_be_bytes());
        self.reply(option, rep::INFO, &body);
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            let agreed = requests.contains(&info::BLOCK_SIZE);
            let neg = self.negotiated(export, flags, agreed);
            return Some(self.finish(HandshakeEvent::Go(Box::new(neg))));
        }
        None
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // The selection is replaced even when the option fails.
            self.meta = None;
        }
        if !self.structured {
            self.reply_error(
                option,
                rep::ERR_INVALID,
                "structured replies not negotiated",
            );
            return;
        }
        let (name, queries) = match parse_meta_request(data) {
            Ok(v) => v,
            Err(MetaParseError::Invalid) => {
                self.reply_error(option, rep::ERR_INVALID, "malformed request");
                return;
            }
            Err(MetaParseError::TooMany) => {
                self.reply_error(option, rep::ERR_TOO_BIG, "too many queries");
                return;
            }
        };
        let export = match catalog.lookup(&name) {
            Lookup::Found(e) => e,
            Lookup::Unknown => {
                self.reply_error(option, rep::ERR_UNKNOWN, "no such export");
                return;
            }
            Lookup::Denied => {
                self.reply_error(option, rep::ERR_POLICY, "access to this export denied");
                return;
            }
        };
        let mut selected = false;
        if queries.is_empty() {
            // LIST with no query lists everything; SET with no query selects nothing.
            selected = !set;
        }
        for q in &queries {
            let Some((ns, leaf)) = q.split_once(':') else {
                self.reply_error(option, rep::ERR_INVALID, "query lacks a namespace");
                return;
            };
            if ns == "base" && (leaf == "allocation" || (leaf.is_empty() && !set)) {
                selected = true;
            }
            // Unknown namespaces and unknown base: leaves are ignored, as required.
        }
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &body);
            if set {
                self.meta = Some(export.name);
            }
        }
        self.reply(option, rep::ACK, &[]);
    }
}

fn prefix8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: the name and the information
/// requests. `None` when malformed.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    if name_len > data.len().checked_sub(6)? {
        return None;
    }
    let name = protocol_string(r.bytes(name_len)?)?;
    let n = r.u16()? as usize;
    if r.remaining() != 2 * n {
        return None;
    }
    let mut requests = Vec::with_capacity(n);
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    Some((name, requests))
}

enum MetaParseError {
    Invalid,
    TooMany,
}

/// Parses the data of the two meta-context options: the export name and the queries.
fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), MetaParseError> {
    use MetaParseError::Invalid;
    let mut r = Reader::new(data);
    let name_len = r.u32().ok_or(Invalid)? as usize;
    let name = protocol_string(r.bytes(name_len).ok_or(Invalid)?).ok_or(Invalid)?;
    let n = r.u32().ok_or(Invalid)?;
    if n > MAX_META_QUERIES {
        return Err(MetaParseError::TooMany);
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = r.u32().ok_or(Invalid)? as usize;
        let q = protocol_string(r.bytes(len).ok_or(Invalid)?).ok_or(Invalid)?;
        queries.push(q);
    }
    if r.remaining() != 0 {
        return Err(Invalid);
    }
    Ok((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{opt_data_info, opt_data_meta, ClientMsg, OptionReply, TestCatalog};

    fn greeting_ok(hs: &mut Handshake) {
        let g = hs.poll_transmit().unwrap();
        assert_eq!(g.len(), 18);
        assert_eq!(&g[..8], &proto::NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &proto::IHAVEOPT.to_be_bytes());
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    fn start(tls: TlsPolicy, flags: u32) -> (Handshake, BytesMut) {
        let mut hs = Handshake::new(tls);
        greeting_ok(&mut hs);
        let mut input = BytesMut::new();
        input.extend_from_slice(&flags.to_be_bytes());
        (hs, input)
    }

    fn send(
        hs: &mut Handshake,
        input: &mut BytesMut,
        cat: &TestCatalog,
        option: u32,
        data: &[u8],
    ) -> (Option<HandshakeEvent>, Vec<OptionReply>) {
        input.extend_from_slice(&ClientMsg::option(option, data));
        let ev = hs.handle_input(input, cat);
        let out = hs.poll_transmit().unwrap_or_default();
        (ev, OptionReply::parse_all(&out))
    }

    #[test]
    fn go_after_structured_and_meta_context() {
        let cat = TestCatalog::one("lun0", 1 << 20, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::STRUCTURED_REPLY, &[]);
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ACK);
        let (_, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::SET_META_CONTEXT,
            &opt_data_meta("lun0", &["base:allocation", "qemu:dirty-bitmap:x"]),
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, rep::META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].kind, rep::ACK);
        let (ev, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::GO,
            &opt_data_info("lun0", &[info::BLOCK_SIZE, info::NAME]),
        );
        let Some(HandshakeEvent::Go(neg)) = ev else {
            panic!("expected Go, got {ev:?}")
        };
        assert!(neg.structured);
        assert_eq!(neg.meta_context, Some(BASE_ALLOCATION_ID));
        assert!(neg.block_sizes_agreed);
        assert!(neg.flags & tx_flags::SEND_DF != 0);
        assert_eq!(r.last().unwrap().kind, rep::ACK);
        let export = r.iter().find(|r| r.data[..2] == [0, 0]).unwrap();
        assert_eq!(&export.data[2..10], &(1u64 << 20).to_be_bytes());
        assert!(r
            .iter()
            .any(|r| r.data[..2] == [0, 1] && &r.data[2..] == b"lun0"));
        assert!(r.iter().any(|r| r.data[..2] == [0, 3]));
    }

    #[test]
    fn meta_context_for_another_export_does_not_carry_over() {
        let mut cat = TestCatalog::one("a", 1 << 20, false);
        cat.add("b", 1 << 20, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        send(&mut hs, &mut input, &cat, opt::STRUCTURED_REPLY, &[]);
        send(
            &mut hs,
            &mut input,
            &cat,
            opt::SET_META_CONTEXT,
            &opt_data_meta("a", &["base:allocation"]),
        );
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::GO, &opt_data_info("b", &[]));
        let Some(HandshakeEvent::Go(neg)) = ev else {
            panic!()
        };
        assert_eq!(neg.meta_context, None);
        assert!(!neg.block_sizes_agreed);
    }

    #[test]
    fn meta_context_needs_structured_replies() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        let (_, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::SET_META_CONTEXT,
            &opt_data_meta("a", &["base:allocation"]),
        );
        assert_eq!(r[0].kind, rep::ERR_INVALID);
    }

    #[test]
    fn list_meta_context_wildcard_and_empty() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        send(&mut hs, &mut input, &cat, opt::STRUCTURED_REPLY, &[]);
        for queries in [&[][..], &["base:"][..], &["base:allocation", "base:"][..]] {
            let (_, r) = send(
                &mut hs,
                &mut input,
                &cat,
                opt::LIST_META_CONTEXT,
                &opt_data_meta("a", queries),
            );
            assert_eq!(r.len(), 2, "{queries:?}");
            assert_eq!(r[0].kind, rep::META_CONTEXT);
            assert_eq!(&r[0].data[..4], &[0, 0, 0, 0]);
        }
        let (_, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::LIST_META_CONTEXT,
            &opt_data_meta("a", &["x-other:thing"]),
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, rep::ACK);
        let (_, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::LIST_META_CONTEXT,
            &opt_data_meta("a", &["nocolon"]),
        );
        assert_eq!(r[0].kind, rep::ERR_INVALID);
    }

    #[test]
    fn unknown_and_denied_exports() {
        let mut cat = TestCatalog::one("a", 4096, false);
        cat.deny("secret");
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        let (ev, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::GO,
            &opt_data_info("nope", &[]),
        );
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_UNKNOWN);
        let (ev, r) = send(
            &mut hs,
            &mut input,
            &cat,
            opt::GO,
            &opt_data_info("secret", &[]),
        );
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_POLICY);
        let (_, r) = send(&mut hs, &mut input, &cat, opt::LIST, &[]);
        assert_eq!(r.len(), 2);
        assert_eq!(&r[0].data[4..], b"a");
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::EXPORT_NAME, b"secret");
        assert!(matches!(
            ev,
            Some(HandshakeEvent::Refuse(HandshakeError::ExportRefused(_)))
        ));
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let cat = TestCatalog::one("a", 8192, true);
        for (flags, len) in [(1u32, 8 + 2 + 124), (3, 10)] {
            let (mut hs, mut input) = start(TlsPolicy::Off, flags);
            input.extend_from_slice(&ClientMsg::option(opt::EXPORT_NAME, b"a"));
            let ev = hs.handle_input(&mut input, &cat);
            let Some(HandshakeEvent::Go(neg)) = ev else {
                panic!()
            };
            assert!(neg.export.read_only);
            let out = hs.poll_transmit().unwrap();
            assert_eq!(out.len(), len);
            assert_eq!(&out[..8], &8192u64.to_be_bytes());
            let f = u16::from_be_bytes([out[8], out[9]]);
            assert!(f & tx_flags::READ_ONLY != 0);
            assert!(f & tx_flags::SEND_WRITE_ZEROES == 0);
        }
    }

    #[test]
    fn bad_client_flags_and_magic_close() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 4);
        assert!(matches!(
            hs.handle_input(&mut input, &cat),
            Some(HandshakeEvent::Refuse(HandshakeError::ClientFlags(4)))
        ));
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        input.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            hs.handle_input(&mut input, &cat),
            Some(HandshakeEvent::Refuse(HandshakeError::BadMagic(0)))
        ));
    }

    #[test]
    fn tls_required_refuses_options_until_starttls() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Require, 1);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::GO, &opt_data_info("a", &[]));
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_TLS_REQD);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::LIST, &[]);
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_TLS_REQD);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::STARTTLS, &[]);
        assert_eq!(ev, Some(HandshakeEvent::StartTls));
        assert_eq!(r[0].kind, rep::ACK);
        hs.tls_established();
        let (_, r) = send(&mut hs, &mut input, &cat, opt::STARTTLS, &[]);
        assert_eq!(r[0].kind, rep::ERR_INVALID);
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::GO, &opt_data_info("a", &[]));
        let Some(HandshakeEvent::Go(neg)) = ev else {
            panic!()
        };
        assert!(neg.tls);
        // EXPORT_NAME before TLS closes the connection.
        let (mut hs, mut input) = start(TlsPolicy::Require, 1);
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::EXPORT_NAME, b"a");
        assert_eq!(
            ev,
            Some(HandshakeEvent::Refuse(HandshakeError::TlsRequired))
        );
        // A client that cannot do fixed newstyle cannot do TLS.
        let (mut hs, mut input) = start(TlsPolicy::Require, 0);
        assert_eq!(
            hs.handle_input(&mut input, &cat),
            Some(HandshakeEvent::Refuse(HandshakeError::TlsRequired))
        );
    }

    #[test]
    fn starttls_resets_state_and_is_refused_when_off() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::STARTTLS, &[]);
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_POLICY);
        let (mut hs, mut input) = start(TlsPolicy::Allow, 1);
        send(&mut hs, &mut input, &cat, opt::STRUCTURED_REPLY, &[]);
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::STARTTLS, &[]);
        assert_eq!(ev, Some(HandshakeEvent::StartTls));
        hs.tls_established();
        let (ev, _) = send(&mut hs, &mut input, &cat, opt::GO, &opt_data_info("a", &[]));
        let Some(HandshakeEvent::Go(neg)) = ev else {
            panic!()
        };
        assert!(
            !neg.structured,
            "structured replies must be renegotiated after TLS"
        );
    }

    #[test]
    fn oversized_option_is_skipped_not_buffered() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        let len = MAX_OPTION_DATA + 100;
        input.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&opt::LIST.to_be_bytes());
        input.extend_from_slice(&len.to_be_bytes());
        assert!(hs.handle_input(&mut input, &cat).is_none());
        assert!(hs.poll_transmit().is_none());
        // Feed the junk in pieces; the buffer never holds it.
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(1000);
            input.extend_from_slice(&vec![0xAA; n]);
            left -= n;
            assert!(hs.handle_input(&mut input, &cat).is_none());
            assert!(input.is_empty());
        }
        let r = OptionReply::parse_all(&hs.poll_transmit().unwrap());
        assert_eq!(r[0].kind, rep::ERR_TOO_BIG);
    }

    #[test]
    fn abort_acks_and_shutdown_refuses() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        hs.begin_shutdown();
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::GO, &opt_data_info("a", &[]));
        assert!(ev.is_none());
        assert_eq!(r[0].kind, rep::ERR_SHUTDOWN);
        let (ev, r) = send(&mut hs, &mut input, &cat, opt::ABORT, &[]);
        assert_eq!(ev, Some(HandshakeEvent::Abort));
        assert_eq!(r[0].kind, rep::ACK);
    }

    #[test]
    fn malformed_info_and_unknown_options() {
        let cat = TestCatalog::one("a", 4096, false);
        let (mut hs, mut input) = start(TlsPolicy::Off, 1);
        for bad in [
            &[][..],
            &[0, 0, 0, 9, b'a', 0, 0][..],
            &[0, 0, 0, 1, b'a', 0, 1][..],
        ] {
            let (ev, r) = send(&mut hs, &mut input, &cat, opt::INFO, bad);
            assert!(ev.is_none());
            assert_eq!(r[0].kind, rep::ERR_INVALID, "{bad:?}");
        }
        let (_, r) = send(&mut hs, &mut input, &cat, opt::EXTENDED_HEADERS, &[]);
        assert_eq!(r[0].kind, rep::ERR_UNSUP);
        let (_, r) = send(&mut hs, &mut input, &cat, 0xdead, &[1, 2, 3]);
        assert_eq!(r[0].kind, rep::ERR_UNSUP);
        let (_, r) = send(&mut hs, &mut input, &cat, opt::LIST, &[1]);
        assert_eq!(r[0].kind, rep::ERR_INVALID);
    }

    #[test]
    fn byte_at_a_time_input() {
        let cat = TestCatalog::one("a", 4096, false);
        let mut hs = Handshake::new(TlsPolicy::Off);
        hs.poll_transmit();
        let mut all = 1u32.to_be_bytes().to_vec();
        all.extend_from_slice(&ClientMsg::option(opt::STRUCTURED_REPLY, &[]));
        all.extend_from_slice(&ClientMsg::option(opt::GO, &opt_data_info("a", &[])));
        let mut input = BytesMut::new();
        let mut ev = None;
        for b in all {
            assert!(ev.is_none());
            input.extend_from_slice(&[b]);
            ev = hs.handle_input(&mut input, &cat);
        }
        assert!(matches!(ev, Some(HandshakeEvent::Go(n)) if n.structured));
    }
}

//! A simulated NBD client for tests (feature `test-utils`): message builders, reply
//! parsers, an in-memory [`TestCatalog`], and [`BlockingClient`], a small client over any
//! `Read + Write` byte stream (a TCP socket, or one end of an in-memory pipe).
//!
//! It is deliberately strict: it checks magics, handles and chunk flags, so a test that
//! talks to the server through it also checks what the server sends.

use crate::handshake::{Catalog, ExportInfo, Lookup};
use crate::proto::{
    self, cmd, info, opt, rep, reply_flags, reply_type, IHAVEOPT, MAX_PAYLOAD, NBDMAGIC,
    OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use crate::transmission::RequestHeader;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// Builders of client messages.
#[derive(Debug)]
pub struct ClientMsg;

impl ClientMsg {
    /// An option: `IHAVEOPT`, code, length, data.
    pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// A request header (and payload for writes).
    pub fn request(
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let h = RequestHeader {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn opt_data_info(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// The data of the meta-context options.
pub fn opt_data_meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// Reply type.
    pub kind: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Parses a buffer of whole option replies.
    ///
    /// # Panics
    /// On a malformed or truncated reply (it is a test helper).
    pub fn parse_all(mut b: &[u8]) -> Vec<OptionReply> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert!(b.len() >= 20, "truncated option reply");
            assert_eq!(&b[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let option = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
            let kind = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
            let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]) as usize;
            out.push(OptionReply {
                option,
                kind,
                data: b[20..20 + len].to_vec(),
            });
            b = &b[20 + len..];
        }
        out
    }
}

/// One reply message of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply (data only for a successful simple READ).
    Simple {
        /// Handle.
        handle: u64,
        /// Error value.
        error: u32,
        /// Read data.
        data: Vec<u8>,
    },
    /// One structured chunk.
    Chunk {
        /// Handle.
        handle: u64,
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// Parses a buffer of whole replies that carry no simple read data (structured
/// streams, or simple replies to non-reads).
///
/// # Panics
/// On malformed input.
pub fn parse_replies(mut b: &[u8], _structured: bool) -> Vec<Reply> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic == SIMPLE_REPLY_MAGIC {
            let error = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            let handle = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
            let data = b[16..].to_vec();
            b = &[];
            out.push(Reply::Simple {
                handle,
                error,
                data,
            });
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let flags = u16::from_be_bytes([b[4], b[5]]);
            let kind = u16::from_be_bytes([b[6], b[7]]);
            let handle = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
            let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]) as usize;
            out.push(Reply::Chunk {
                handle,
                flags,
                kind,
                payload: b[20..20 + len].to_vec(),
            });
            b = &b[20 + len..];
        }
    }
    out
}

/// An in-memory catalog.
#[derive(Debug, Clone, Default)]
pub struct TestCatalog {
    exports: BTreeMap<String, ExportInfo>,
    denied: Vec<String>,
}

impl TestCatalog {
    /// A catalog with one export of `size` bytes (512-byte blocks).
    pub fn one(name: &str, size: u64, read_only: bool) -> Self {
        let mut c = TestCatalog::default();
        c.add(name, size, read_only);
        c
    }

    /// Adds an export.
    pub fn add(&mut self, name: &str, size: u64, read_only: bool) {
        self.exports.insert(
            name.to_owned(),
            ExportInfo {
                name: name.to_owned(),
                description: Some(format!("test export {name}")),
                size,
                min_block_size: 512,
                preferred_block_size: 4096,
                max_block_size: MAX_PAYLOAD,
                read_only,
                trim: true,
                multi_conn: true,
                rotational: false,
            },
        );
    }

    /// Adds an export this peer may not use.
    pub fn deny(&mut self, name: &str) {
        self.denied.push(name.to_owned());
    }
}

impl Catalog for TestCatalog {
    fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn lookup(&self, name: &str) -> Lookup {
        if self.denied.iter().any(|d| d == name) {
            return Lookup::Denied;
        }
        match self.exports.get(name) {
            Some(e) => Lookup::Found(e.clone()),
            None => Lookup::Unknown,
        }
    }
}

/// What [`BlockingClient::connect`] asks for.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Negotiate structured replies.
    pub structured: bool,
    /// Select `base:allocation`.
    pub block_status: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE` (and so promise to honour it).
    pub block_sizes: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            structured: true,
            block_status: true,
            block_sizes: true,
        }
    }
}

/// The outcome of one command, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success, with read data (reassembled) or block status descriptors.
    Ok {
        /// Read data.
        data: Vec<u8>,
        /// Block status descriptors (length, flags).
        extents: Vec<(u32, u32)>,
    },
    /// An error value (and the message of a structured error).
    Err(u32, String),
}

impl Outcome {
    /// The error value, or 0.
    pub fn errno(&self) -> u32 {
        match self {
            Outcome::Ok { .. } => 0,
            Outcome::Err(e, _) => *e,
        }
    }
}

/// A blocking client over one byte stream. Requests may be pipelined with
/// [`BlockingClient::send`] and collected with [`BlockingClient::recv`].
#[derive(Debug)]
pub struct BlockingClient<S> {
    stream: S,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies in use.
    pub structured: bool,
    /// The block sizes the server sent (min, preferred, max).
    pub block_sizes: Option<(u32, u32, u32)>,
    next_handle: u64,
    pending: BTreeMap<u64, (u16, u64, u32)>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<S: Read + Write> BlockingClient<S> {
    /// Runs the handshake with `NBD_OPT_GO` on `export`.
    pub fn connect(mut stream: S, export: &str, o: &ClientOptions) -> io::Result<Self> {
        let mut greet = [0u8; 18];
        stream.read_exact(&mut greet)?;
        if greet[..8] != NBDMAGIC.to_be_bytes() || greet[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(bad("bad greeting"));
        }
        stream.write_all(&3u32.to_be_bytes())?;
        let mut c = BlockingClient {
            stream,
            size: 0,
            flags: 0,
            structured: false,
            block_sizes: None,
            next_handle: 1,
            pending: BTreeMap::new(),
        };
        if o.structured {
            let r = c.option(opt::STRUCTURED_REPLY, &[])?;
            c.structured = r.last().is_some_and(|r| r.kind == rep::ACK);
        }
        if o.block_status && c.structured {
            let r = c.option(
                opt::SET_META_CONTEXT,
                &opt_data_meta(export, &[proto::BASE_ALLOCATION]),
            )?;
            match r.last() {
                Some(last) if last.kind == rep::ACK => {}
                Some(last) if last.kind == rep::ERR_POLICY => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        String::from_utf8_lossy(&last.data).into_owned(),
                    ))
                }
                _ => return Err(bad(format!("SET_META_CONTEXT failed: {r:?}"))),
            }
        }
        let requests: &[u16] = if o.block_sizes {
            &[info::BLOCK_SIZE]
        } else {
            &[]
        };
        let r = c.option(opt::GO, &opt_data_info(export, requests))?;
        match r.last() {
            Some(last) if last.kind == rep::ACK => {}
            Some(last) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "GO refused: {:#x} {}",
                        last.kind,
                        String::from_utf8_lossy(&last.data)
                    ),
                ))
            }
            None => return Err(bad("no reply to GO")),
        }
        for i in &r {
            if i.kind == rep::INFO && i.data.len() >= 2 {
                let t = u16::from_be_bytes([i.data[0], i.data[1]]);
                if t == info::EXPORT && i.data.len() == 12 {
                    c.size = u64::from_be_bytes(i.data[2..10].try_into().unwrap_or_default());
                    c.flags = u16::from_be_bytes([i.data[10], i.data[11]]);
                }
                if t == info::BLOCK_SIZE && i.data.len() == 14 {
                    let g = |k: usize| {
                        u32::from_be_bytes(i.data[k..k + 4].try_into().unwrap_or_default())
                    };
                    c.block_sizes = Some((g(2), g(6), g(10)));
                }
            }
        }
        Ok(c)
    }

    /// Sends one option and reads its replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        self.stream.write_all(&ClientMsg::option(option, data))?;
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.stream.read_exact(&mut h)?;
            if h[..8] != OPTION_REPLY_MAGIC.to_be_bytes() {
                return Err(bad("bad option reply magic"));
            }
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut data = vec![0u8; len];
            self.stream.read_exact(&mut data)?;
            let done = kind == rep::ACK || kind & (1 << 31) != 0;
            out.push(OptionReply { option, kind, data });
            if done {
                return Ok(out);
            }
        }
    }

    /// Sends a request without waiting; returns its handle.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.stream.write_all(&ClientMsg::request(
            kind, flags, handle, offset, len, payload,
        ))?;
        if kind != cmd::DISC {
            self.pending.insert(handle, (kind, offset, len));
        }
        Ok(handle)
    }

    /// Like [`BlockingClient::send`], but writes the request's bytes in pieces of the
    /// given sizes (cycling through them), pausing `pause` between pieces, so the server
    /// sees headers and payloads arrive in parts.
    pub fn send_in_pieces(
        &mut self,
        (kind, flags, offset, len): (u16, u16, u64, u32),
        payload: &[u8],
        pieces: &[usize],
        pause: std::time::Duration,
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let msg = ClientMsg::request(kind, flags, handle, offset, len, payload);
        let mut at = 0;
        for &n in pieces.iter().filter(|&&n| n > 0).cycle() {
            if at >= msg.len() {
                break;
            }
            let end = (at + n).min(msg.len());
            self.stream.write_all(&msg[at..end])?;
            self.stream.flush()?;
            at = end;
            if at < msg.len() {
                std::thread::sleep(pause);
            }
        }
        if kind != cmd::DISC {
            self.pending.insert(handle, (kind, offset, len));
        }
        Ok(handle)
    }

    /// Receives the whole reply to some pending request: its handle and outcome.
    pub fn recv(&mut self) -> io::Result<(u64, Outcome)> {
        let mut data: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut extents = Vec::new();
        let mut error: Option<(u32, String)> = None;
        let mut current: Option<u64> = None;
        loop {
            let mut m = [0u8; 4];
            self.stream.read_exact(&mut m)?;
            let magic = u32::from_be_bytes(m);
            if magic == SIMPLE_REPLY_MAGIC {
                let mut h = [0u8; 12];
                self.stream.read_exact(&mut h)?;
                let err = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
                let (kind, _, len) = self
                    .pending
                    .remove(&handle)
                    .ok_or_else(|| bad(format!("reply to unknown handle {handle}")))?;
                if err != 0 {
                    return Ok((handle, Outcome::Err(err, String::new())));
                }
                if kind == cmd::READ && self.structured {
                    return Err(bad("simple reply to READ with structured replies"));
                }
                let mut d = vec![0u8; if kind == cmd::READ { len as usize } else { 0 }];
                self.stream.read_exact(&mut d)?;
                return Ok((
                    handle,
                    Outcome::Ok {
                        data: d,
                        extents: Vec::new(),
                    },
                ));
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(bad(format!("bad reply magic {magic:#x}")));
            }
            if !self.structured {
                return Err(bad("structured reply not negotiated"));
            }
            let mut h = [0u8; 16];
            self.stream.read_exact(&mut h)?;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            let handle = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
            if len > MAX_PAYLOAD as usize + 64 {
                return Err(bad("chunk too long"));
            }
            if current.is_some_and(|c| c != handle) {
                // This client reads one reply at a time; the server may interleave, which
                // this helper does not reassemble.
                return Err(bad("interleaved chunks"));
            }
            current = Some(handle);
            let &(_, req_offset, req_len) = self
                .pending
                .get(&handle)
                .ok_or_else(|| bad(format!("chunk for unknown handle {handle}")))?;
            let mut p = vec![0u8; len];
            self.stream.read_exact(&mut p)?;
            let g64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
            let g32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap_or_default());
            match kind {
                reply_type::NONE => {
                    if len != 0 || flags & reply_flags::DONE == 0 {
                        return Err(bad("bad NONE chunk"));
                    }
                }
                reply_type::OFFSET_DATA => {
                    if len < 9 {
                        return Err(bad("short OFFSET_DATA"));
                    }
                    data.insert(g64(&p), p[8..].to_vec());
                }
                reply_type::OFFSET_HOLE => {
                    if len != 12 {
                        return Err(bad("bad OFFSET_HOLE"));
                    }
                    data.insert(g64(&p), vec![0u8; g32(&p[8..]) as usize]);
                }
                reply_type::BLOCK_STATUS => {
                    if len < 12 || !(len - 4).is_multiple_of(8) {
                        return Err(bad("bad BLOCK_STATUS length"));
                    }
                    for d in p[4..].chunks_exact(8) {
                        extents.push((g32(d), g32(&d[4..])));
                    }
                }
                k if k & 0x8000 != 0 => {
                    if len < 6 {
                        return Err(bad("short error chunk"));
                    }
                    let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
                    let msg = String::from_utf8_lossy(&p[6..6 + mlen.min(len - 6)]).into_owned();
                    error = Some((g32(&p), msg));
                }
                k => return Err(bad(format!("unknown chunk type {k}"))),
            }
            if flags & reply_flags::DONE != 0 {
                self.pending.remove(&handle);
                if let Some((e, m)) = error {
                    return Ok((handle, Outcome::Err(e, m)));
                }
                // Reassemble and check the coverage of a read.
                let mut out = Vec::new();
                let mut at = req_offset;
                for (off, d) in data {
                    if off != at {
                        return Err(bad(format!("read chunk at {off}, expected {at}")));
                    }
                    at += d.len() as u64;
                    out.extend_from_slice(&d);
                }
                if !out.is_empty() && out.len() != req_len as usize {
                    return Err(bad("read chunks do not cover the request"));
                }
                return Ok((handle, Outcome::Ok { data: out, extents }));
            }
        }
    }

    /// Sends one request and waits for its reply (no other request may be pending).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Outcome> {
        let h = self.send(kind, flags, offset, len, payload)?;
        let (got, o) = self.recv()?;
        if got != h {
            return Err(bad("reply to another handle"));
        }
        Ok(o)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Outcome> {
        self.call(cmd::READ, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Outcome> {
        self.call(cmd::WRITE, 0, offset, data.len() as u32, data)
    }

    /// Block status of a range.
    pub fn block_status(&mut self, offset: u64, len: u32) -> io::Result<Outcome> {
        self.call(cmd::BLOCK_STATUS, 0, offset, len, &[])
    }

    /// Sends `NBD_CMD_DISC` and returns the stream.
    pub fn disconnect(mut self) -> io::Result<S> {
        self.send(cmd::DISC, 0, 0, 0, &[])?;
        Ok(self.stream)
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

//! The transmission phase as a sans-IO core: request framing (check, then parse),
//! validation against what was negotiated, and reply encoding.
//!
//! # Use
//!
//! The driver appends bytes from the peer to a `BytesMut` and calls
//! [`Session::decode`] until it returns `Ok(None)` (more bytes needed). Each
//! [`Decoded::Request`] is a validated command to execute; each [`Decoded::Reject`] is
//! a request the core already refused, to be answered with [`Session::reply_error`];
//! [`Decoded::Disconnect`] is `NBD_CMD_DISC`. An `Err` is a framing violation (bad
//! magic, an oversized write) after which the byte stream cannot be trusted: the driver
//! closes the connection.
//!
//! Framing is bounded: [`check_request`] says how many bytes a request needs before it
//! is parsed, and refuses a write payload above [`MAX_PAYLOAD`], so the input buffer
//! never has to hold more than one maximal request.
//!
//! Replies are encoded into an [`Output`] queue; read data travels as shared
//! [`Bytes`] (no copy). With structured replies, reads answer with `OFFSET_DATA` chunks
//! and `OFFSET_HOLE` chunks for zeroed runs of at least [`HOLE_GRANULE`] bytes (unless
//! the client set DF), and errors carry a message.

use crate::errno::NbdErrno;
use crate::handshake::Negotiated;
use crate::proto::{
    cmd, cmd_flags, reply_flags, reply_type, tx_flags, MAX_PAYLOAD, REQUEST_HEADER_LEN,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use crate::wire::{FileRange, Output};
use bytes::{Buf, Bytes, BytesMut};

/// Zero runs in read data are sent as holes at this granularity (aligned to the export
/// offset); smaller runs travel as data.
pub const HOLE_GRANULE: usize = 64 * 1024;

/// Most block status descriptors in one reply; the client asks again for the rest.
pub const MAX_DESCRIPTORS: usize = 4096;

/// A request header, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl RequestHeader {
    /// Decodes the 28 bytes of a header (the caller checked the length and the magic).
    fn decode(b: &[u8]) -> Self {
        let mut b = &b[4..REQUEST_HEADER_LEN];
        RequestHeader {
            flags: b.get_u16(),
            kind: b.get_u16(),
            handle: b.get_u64(),
            offset: b.get_u64(),
            len: b.get_u32(),
        }
    }

    /// Parses the header at the start of `buf`: `None` unless `buf` holds a whole header
    /// that starts with the request magic. Lets a driver that has the header of a large
    /// write, but not its payload yet, receive the payload into a buffer of its own and
    /// then hand both to [`Session::validate`].
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if buf.len() < REQUEST_HEADER_LEN || buf[..4] != REQUEST_MAGIC.to_be_bytes() {
            return None;
        }
        Some(Self::decode(buf))
    }

    /// Encodes the header (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The byte stream cannot be followed any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The request did not start with the request magic.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadMagic(u32),
    /// A write payload larger than the server accepts.
    #[error("write payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
}

/// The outcome of [`check_request`] when no whole request is buffered yet, or the bytes
/// are not a request at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// At least this many more bytes are needed.
    Incomplete(usize),
    /// Not a valid request.
    Invalid(FrameError),
}

/// Checks whether `buf` starts with a whole request and returns its length (header
/// plus write payload).
pub fn check_request(buf: &[u8]) -> Result<usize, CheckError> {
    if buf.len() < REQUEST_HEADER_LEN {
        // The magic can be judged from its first four bytes already.
        if buf.len() >= 4 {
            let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if magic != REQUEST_MAGIC {
                return Err(CheckError::Invalid(FrameError::BadMagic(magic)));
            }
        }
        return Err(CheckError::Incomplete(REQUEST_HEADER_LEN - buf.len()));
    }
    let h = RequestHeader::decode(buf);
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(CheckError::Invalid(FrameError::BadMagic(magic)));
    }
    let total = if h.kind == cmd::WRITE {
        if h.len > MAX_PAYLOAD {
            return Err(CheckError::Invalid(FrameError::TooLarge(h.len)));
        }
        REQUEST_HEADER_LEN + h.len as usize
    } else {
        REQUEST_HEADER_LEN
    };
    if buf.len() < total {
        return Err(CheckError::Incomplete(total - buf.len()));
    }
    Ok(total)
}

/// The kind of a command, for replies and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other command type.
    Other,
}

impl CommandKind {
    /// Every kind, in a fixed order (the index order of [`CommandKind::index`]).
    pub const ALL: [CommandKind; 8] = [
        CommandKind::Read,
        CommandKind::Write,
        CommandKind::Flush,
        CommandKind::Trim,
        CommandKind::Cache,
        CommandKind::WriteZeroes,
        CommandKind::BlockStatus,
        CommandKind::Other,
    ];

    fn from_wire(kind: u16) -> Self {
        match kind {
            cmd::READ => CommandKind::Read,
            cmd::WRITE => CommandKind::Write,
            cmd::FLUSH => CommandKind::Flush,
            cmd::TRIM => CommandKind::Trim,
            cmd::CACHE => CommandKind::Cache,
            cmd::WRITE_ZEROES => CommandKind::WriteZeroes,
            cmd::BLOCK_STATUS => CommandKind::BlockStatus,
            _ => CommandKind::Other,
        }
    }

    /// Position in [`CommandKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Read => "read",
            CommandKind::Write => "write",
            CommandKind::Flush => "flush",
            CommandKind::Trim => "trim",
            CommandKind::Cache => "cache",
            CommandKind::WriteZeroes => "write_zeroes",
            CommandKind::BlockStatus => "block_status",
            CommandKind::Other => "other",
        }
    }
}

/// A validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Don't fragment: one content chunk.
        df: bool,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload.
        data: Bytes,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard hint.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// Must stay allocated.
        no_hole: bool,
        /// Fail with `ENOTSUP` unless fast.
        fast: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Allocation status of a range.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// One extent only.
        req_one: bool,
    },
}

impl Command {
    /// The kind of the command.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Read { .. } => CommandKind::Read,
            Command::Write { .. } => CommandKind::Write,
            Command::Flush => CommandKind::Flush,
            Command::Trim { .. } => CommandKind::Trim,
            Command::WriteZeroes { .. } => CommandKind::WriteZeroes,
            Command::Cache { .. } => CommandKind::Cache,
            Command::BlockStatus { .. } => CommandKind::BlockStatus,
        }
    }
}

/// A request: the client's handle and the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub handle: u64,
    /// What to do.
    pub command: Command,
}

/// One decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A valid command to execute.
    Request(Request),
    /// A request refused without executing it; answer with [`Session::reply_error`].
    Reject {
        /// The client's handle.
        handle: u64,
        /// The command's kind.
        kind: CommandKind,
        /// The error.
        errno: NbdErrno,
        /// Why, for the client's user (sent with structured replies).
        message: &'static str,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
}

/// One extent of allocation status, in `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// `NBD_STATE_HOLE` / `NBD_STATE_ZERO` bits.
    pub flags: u32,
}

/// The transmission phase of one connection: what was negotiated, and the codec.
#[derive(Debug, Clone)]
pub struct Session {
    size: u64,
    min_block: u32,
    max_block: u32,
    flags: u16,
    structured: bool,
    meta_context: Option<u32>,
    strict_alignment: bool,
}

impl Session {
    /// The session for what the handshake negotiated.
    pub fn new(neg: &Negotiated) -> Self {
        Session {
            size: neg.export.size,
            min_block: neg.export.min_block_size.max(1),
            max_block: neg.export.max_block_size.clamp(1, MAX_PAYLOAD),
            flags: neg.flags,
            structured: neg.structured,
            meta_context: neg.meta_context,
            strict_alignment: neg.block_sizes_agreed,
        }
    }

    /// Structured replies are in use.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The export size the client was told.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Takes the next whole request from `buf`; `Ok(None)` when more bytes are needed
    /// (with `buf` untouched). See the [module docs](self).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        let total = match check_request(buf) {
            Ok(n) => n,
            Err(CheckError::Incomplete(_)) => return Ok(None),
            Err(CheckError::Invalid(e)) => return Err(e),
        };
        let header = RequestHeader::decode(buf);
        let mut frame = buf.split_to(total);
        let payload = frame.split_off(REQUEST_HEADER_LEN).freeze();
        Ok(Some(self.validate(header, payload)))
    }

    /// Checks a parsed request against the negotiated parameters.
    pub fn validate(&self, h: RequestHeader, payload: Bytes) -> Decoded {
        let kind = CommandKind::from_wire(h.kind);
        let reject = |errno, message| Decoded::Reject {
            handle: h.handle,
            kind,
            errno,
            message,
        };
        if h.kind == cmd::DISC {
            return Decoded::Disconnect;
        }
        let read_only = self.flags & tx_flags::READ_ONLY != 0;
        let mut allowed = cmd_flags::FUA;
        match kind {
            CommandKind::Read if self.flags & tx_flags::SEND_DF != 0 => allowed |= cmd_flags::DF,
            CommandKind::WriteZeroes => allowed |= cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            CommandKind::BlockStatus => allowed |= cmd_flags::REQ_ONE,
            CommandKind::Other => return reject(NbdErrno::Inval, "unknown command"),
            _ => {}
        }
        if h.flags & !allowed != 0 {
            return reject(NbdErrno::Inval, "command flag not valid for this command");
        }
        let writes = matches!(
            kind,
            CommandKind::Write | CommandKind::Trim | CommandKind::WriteZeroes
        );
        if writes && read_only {
            return reject(NbdErrno::Perm, "export is read-only");
        }
        match kind {
            CommandKind::Trim if self.flags & tx_flags::SEND_TRIM == 0 => {
                return reject(NbdErrno::Inval, "trim not supported on this export")
            }
            CommandKind::BlockStatus if self.meta_context.is_none() => {
                return reject(NbdErrno::Inval, "no metadata context negotiated")
            }
            _ => {}
        }
        if kind != CommandKind::Flush {
            let in_range = h
                .offset
                .checked_add(u64::from(h.len))
                .is_some_and(|end| end <= self.size);
            if !in_range {
                // Writes past the end are ENOSPC, everything else EINVAL.
                let errno = match kind {
                    CommandKind::Write | CommandKind::WriteZeroes => NbdErrno::NoSpc,
                    _ => NbdErrno::Inval,
                };
                return reject(errno, "request beyond the end of the export");
            }
            let aligned = h.offset.is_multiple_of(u64::from(self.min_block))
                && h.len.is_multiple_of(self.min_block);
            if self.strict_alignment && !aligned {
                return reject(
                    NbdErrno::Inval,
                    "request not aligned to the minimum block size",
                );
            }
            let payload_like = matches!(
                kind,
                CommandKind::Read | CommandKind::Write | CommandKind::Cache
            );
            if payload_like && h.len > self.max_block {
                return reject(
                    NbdErrno::Inval,
                    "request larger than the maximum block size",
                );
            }
            if kind == CommandKind::BlockStatus && h.len == 0 {
                return reject(NbdErrno::Inval, "zero-length block status");
            }
        }
        let fua = h.flags & cmd_flags::FUA != 0;
        let (offset, len) = (h.offset, h.len);
        let command = match kind {
            CommandKind::Read => Command::Read {
                offset,
                len,
                df: h.flags & cmd_flags::DF != 0,
            },
            CommandKind::Write => Command::Write {
                offset,
                data: payload,
                fua,
            },
            CommandKind::Flush => Command::Flush,
            CommandKind::Trim => Command::Trim { offset, len, fua },
            CommandKind::Cache => Command::Cache { offset, len },
            CommandKind::WriteZeroes => Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                fast: h.flags & cmd_flags::FAST_ZERO != 0,
            },
            CommandKind::BlockStatus => Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & cmd_flags::REQ_ONE != 0,
            },
            CommandKind::Other => return reject(NbdErrno::Inval, "unknown command"),
        };
        Decoded::Request(Request {
            handle: h.handle,
            command,
        })
    }

    fn simple(&self, out: &mut Output, handle: u64, error: u32) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(error);
        out.put_u64(handle);
    }

    fn chunk(&self, out: &mut Output, flags: u16, kind: u16, handle: u64, len: u32) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(kind);
        out.put_u64(handle);
        out.put_u32(len);
    }

    /// Success without data (everything but READ and BLOCK_STATUS).
    pub fn reply_ok(&self, out: &mut Output, handle: u64) {
        self.simple(out, handle, 0);
    }

    /// An error. With structured replies, an `NBD_REPLY_TYPE_ERROR` chunk carrying
    /// `message` (which a READ reply must be); otherwise a simple reply.
    pub fn reply_error(&self, out: &mut Output, handle: u64, errno: NbdErrno, message: &str) {
        if !self.structured {
            self.simple(out, handle, errno.code());
            return;
        }
        let msg = &message.as_bytes()[..message.len().min(crate::proto::MAX_STRING)];
        self.chunk(
            out,
            reply_flags::DONE,
            reply_type::ERROR,
            handle,
            6 + msg.len() as u32,
        );
        out.put_u32(errno.code());
        out.put_u16(msg.len() as u16);
        out.put_slice(msg);
    }

    /// Replies to a read with a file range the page cache holds, as one data chunk
    /// (`OFFSET_DATA`; zeroes in it are not looked for, which only costs bandwidth).
    pub fn reply_read_file(
        &self,
        out: &mut Output,
        handle: u64,
        offset: u64,
        range: Box<dyn FileRange>,
    ) {
        if !self.structured {
            self.simple(out, handle, 0);
            out.put_file(range);
            return;
        }
        if range.is_empty() {
            self.chunk(out, reply_flags::DONE, reply_type::NONE, handle, 0);
            return;
        }
        // A request's length (at most MAX_PAYLOAD) bounds the range's; a range that
        // does not fit a chunk's length field gets an error, never a wrong header.
        let Ok(len) = u32::try_from(8 + range.len()) else {
            self.reply_error(out, handle, NbdErrno::Overflow, "read reply too large");
            return;
        };
        self.chunk(out, reply_flags::DONE, reply_type::OFFSET_DATA, handle, len);
        out.put_u64(offset);
        out.put_file(range);
    }

    /// The data of a successful READ at `offset`: `pieces` are consecutive and cover
    /// the request exactly. `df` is the client's don't-fragment flag.
    pub fn reply_read(
        &self,
        out: &mut Output,
        handle: u64,
        offset: u64,
        pieces: &[Bytes],
        df: bool,
    ) {
        if !self.structured {
            self.simple(out, handle, 0);
            for p in pieces {
                out.put_bytes(p.clone());
            }
            return;
        }
        let total: usize = pieces.iter().map(Bytes::len).sum();
        if total == 0 {
            self.chunk(out, reply_flags::DONE, reply_type::NONE, handle, 0);
            return;
        }
        if df {
            self.chunk(
                out,
                reply_flags::DONE,
                reply_type::OFFSET_DATA,
                handle,
                8 + total as u32,
            );
            out.put_u64(offset);
            for p in pieces {
                out.put_bytes(p.clone());
            }
            return;
        }
        let runs = content_runs(offset, pieces);
        let last = runs.len().saturating_sub(1);
        for (i, run) in runs.into_iter().enumerate() {
            let flags = if i == last { reply_flags::DONE } else { 0 };
            match run {
                Run::Hole { offset, len } => {
                    self.chunk(out, flags, reply_type::OFFSET_HOLE, handle, 12);
                    out.put_u64(offset);
                    out.put_u32(len);
                }
                Run::Data { offset, parts } => {
                    let len: usize = parts.iter().map(Bytes::len).sum();
                    self.chunk(out, flags, reply_type::OFFSET_DATA, handle, 8 + len as u32);
                    out.put_u64(offset);
                    for p in parts {
                        out.put_bytes(p);
                    }
                }
            }
        }
    }

    /// The reply to BLOCK_STATUS: `extents` describe the device from `start` (at or
    /// before the requested `offset`, e.g. rounded down to a block), in address order.
    pub fn reply_block_status(
        &self,
        out: &mut Output,
        handle: u64,
        request: (u64, u32, bool),
        start: u64,
        extents: &[StatusExtent],
    ) {
        let (offset, len, req_one) = request;
        let descriptors =
            block_status_descriptors(offset, len, req_one, start, extents, self.min_block);
        if descriptors.is_empty() {
            // The device described nothing of the range: report it as plain data, which
            // is always true.
            let d = [(len, 0u32)];
            return self.put_block_status(out, handle, &d);
        }
        self.put_block_status(out, handle, &descriptors);
    }

    fn put_block_status(&self, out: &mut Output, handle: u64, d: &[(u32, u32)]) {
        let id = self.meta_context.unwrap_or(0);
        self.chunk(
            out,
            reply_flags::DONE,
            reply_type::BLOCK_STATUS,
            handle,
            4 + 8 * d.len() as u32,
        );
        out.put_u32(id);
        for &(len, flags) in d {
            out.put_u32(len);
            out.put_u32(flags);
        }
    }
}

/// A content chunk of a structured read reply.
#[derive(Debug)]
enum Run {
    Data { offset: u64, parts: Vec<Bytes> },
    Hole { offset: u64, len: u32 },
}

/// Splits read data into data and hole runs: each [`HOLE_GRANULE`]-aligned (by export
/// offset) piece that is all zeroes becomes part of a hole; neighbours of the same kind
/// merge. Data runs are slices of the pieces (no copy).
fn content_runs(offset: u64, pieces: &[Bytes]) -> Vec<Run> {
    // First the shape: (start, len, zero) runs over the export offsets.
    let mut shape: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = offset;
    for piece in pieces {
        let mut pos = 0usize;
        while pos < piece.len() {
            let granule_end = (at / HOLE_GRANULE as u64 + 1) * HOLE_GRANULE as u64;
            let n = ((granule_end - at) as usize).min(piece.len() - pos);
            let zero = is_zero(&piece[pos..pos + n]);
            match shape.last_mut() {
                Some((_, len, z)) if *z == zero => *len += n as u64,
                _ => shape.push((at, n as u64, zero)),
            }
            pos += n;
            at += n as u64;
        }
    }
    // Then the runs, slicing the pieces for the data.
    let mut runs = Vec::with_capacity(shape.len());
    for (start, len, zero) in shape {
        if zero {
            runs.push(Run::Hole {
                offset: start,
                len: len as u32,
            });
            continue;
        }
        let mut parts = Vec::new();
        let end = start + len;
        let mut piece_start = offset;
        for piece in pieces {
            let piece_end = piece_start + piece.len() as u64;
            let lo = start.max(piece_start);
            let hi = end.min(piece_end);
            if lo < hi {
                parts.push(piece.slice((lo - piece_start) as usize..(hi - piece_start) as usize));
            }
            piece_start = piece_end;
        }
        runs.push(Run::Data {
            offset: start,
            parts,
        });
    }
    runs
}

/// True when every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    // Check the first word first: random data exits here.
    let (head, rest) = b.split_at(b.len().min(16));
    if head.iter().any(|&x| x != 0) {
        return false;
    }
    let mut chunks = rest.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Builds the descriptors of a block status reply for the request
/// `[offset, offset + len)` from extents that start at `start <= offset`: skips to
/// `offset`, merges neighbours with equal flags, splits lengths to fit 32 bits (in
/// multiples of `min_block`), stops once the request is covered (the last descriptor
/// may reach past it) or after [`MAX_DESCRIPTORS`], and with `req_one` returns a single
/// descriptor no longer than the request.
pub fn block_status_descriptors(
    offset: u64,
    len: u32,
    req_one: bool,
    start: u64,
    extents: &[StatusExtent],
    min_block: u32,
) -> Vec<(u32, u32)> {
    let max_desc = u64::from(u32::MAX) / u64::from(min_block.max(1)) * u64::from(min_block.max(1));
    let mut skip = offset.saturating_sub(start);
    // Merge first, over the part at or after `offset`.
    let mut merged: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        let mut l = e.len;
        if skip > 0 {
            let s = skip.min(l);
            skip -= s;
            l -= s;
        }
        if l == 0 {
            continue;
        }
        match merged.last_mut() {
            Some((ml, mf)) if *mf == e.flags => *ml += l,
            _ => merged.push((l, e.flags)),
        }
        covered += l;
        if covered >= u64::from(len) {
            break;
        }
    }
    let mut out = Vec::new();
    let mut sum = 0u64;
    'outer: for (mut l, flags) in merged {
        while l > 0 {
            let n = l.min(max_desc);
            if req_one {
                out.push((n.min(u64::from(len)) as u32, flags));
                break 'outer;
            }
            out.push((n as u32, flags));
            sum += n;
            l -= n;
            if sum >= u64::from(len) || out.len() >= MAX_DESCRIPTORS {
                break 'outer;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::ExportInfo;
    use crate::proto::state;
    use crate::test_utils::{parse_replies, Reply};

    fn neg(size: u64, structured: bool, meta: bool, strict: bool, ro: bool) -> Negotiated {
        let export = ExportInfo {
            name: "x".into(),
            description: None,
            size,
            min_block_size: 512,
            preferred_block_size: 4096,
            max_block_size: MAX_PAYLOAD,
            read_only: ro,
            trim: true,
            multi_conn: true,
            rotational: false,
        };
        let flags = export.transmission_flags(structured);
        Negotiated {
            export,
            flags,
            structured,
            meta_context: meta.then_some(1),
            block_sizes_agreed: strict,
            tls: false,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> BytesMut {
        let h = RequestHeader {
            flags,
            kind,
            handle: 7,
            offset,
            len,
        };
        let mut b = BytesMut::from(&h.encode()[..]);
        if kind == cmd::WRITE {
            b.extend_from_slice(&vec![0xAB; len as usize]);
        }
        b
    }

    fn decode_one(s: &Session, mut b: BytesMut) -> Decoded {
        let d = s.decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty());
        d
    }

    fn errno_of(d: &Decoded) -> Option<NbdErrno> {
        match d {
            Decoded::Reject { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    #[test]
    fn check_waits_for_header_and_payload() {
        let full = req(cmd::WRITE, 0, 0, 1024);
        for cut in 0..full.len() {
            match check_request(&full[..cut]) {
                Err(CheckError::Incomplete(n)) => assert!(n > 0),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert_eq!(check_request(&full), Ok(28 + 1024));
        assert_eq!(
            check_request(&[0, 0, 0, 0]),
            Err(CheckError::Invalid(FrameError::BadMagic(0)))
        );
        let big = req(cmd::READ, 0, 0, 0);
        let mut h = big.to_vec();
        h[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        h[24..28].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert_eq!(
            check_request(&h),
            Err(CheckError::Invalid(FrameError::TooLarge(MAX_PAYLOAD + 1)))
        );
    }

    #[test]
    fn validation_errors_follow_the_protocol() {
        let s = Session::new(&neg(1 << 20, true, true, true, false));
        let cases: &[(u16, u16, u64, u32, Option<NbdErrno>)] = &[
            (cmd::READ, 0, 0, 4096, None),
            (cmd::READ, cmd_flags::DF, 0, 4096, None),
            (cmd::READ, cmd_flags::FUA, 0, 4096, None),
            (
                cmd::READ,
                cmd_flags::NO_HOLE,
                0,
                4096,
                Some(NbdErrno::Inval),
            ),
            (cmd::READ, 0, 1 << 20, 512, Some(NbdErrno::Inval)),
            (cmd::READ, 0, u64::MAX, 512, Some(NbdErrno::Inval)),
            (cmd::READ, 0, 100, 512, Some(NbdErrno::Inval)),
            (cmd::WRITE, 0, (1 << 20) - 512, 1024, Some(NbdErrno::NoSpc)),
            (cmd::WRITE, cmd_flags::FUA, 0, 512, None),
            (
                cmd::WRITE_ZEROES,
                cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
                0,
                4096,
                None,
            ),
            (
                cmd::WRITE_ZEROES,
                cmd_flags::DF,
                0,
                4096,
                Some(NbdErrno::Inval),
            ),
            (cmd::WRITE_ZEROES, 0, 1 << 20, 512, Some(NbdErrno::NoSpc)),
            (cmd::TRIM, 0, 0, 4096, None),
            (cmd::TRIM, 0, 1 << 20, 4096, Some(NbdErrno::Inval)),
            (cmd::FLUSH, 0, 0, 0, None),
            (cmd::CACHE, 0, 0, 4096, None),
            (cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, 4096, None),
            (cmd::BLOCK_STATUS, 0, 0, 0, Some(NbdErrno::Inval)),
            (
                cmd::BLOCK_STATUS,
                0,
                0,
                (1 << 20) + 512,
                Some(NbdErrno::Inval),
            ),
            (99, 0, 0, 0, Some(NbdErrno::Inval)),
            (cmd::FLUSH, 1 << 15, 0, 0, Some(NbdErrno::Inval)),
        ];
        for &(kind, flags, offset, len, expect) in cases {
            let d = decode_one(&s, req(kind, flags, offset, len));
            assert_eq!(
                errno_of(&d),
                expect,
                "kind {kind} flags {flags:#x} offset {offset} len {len}: {d:?}"
            );
        }
        assert_eq!(decode_one(&s, req(cmd::DISC, 0, 0, 0)), Decoded::Disconnect);
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let s = Session::new(&neg(1 << 20, false, false, false, true));
        for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            let d = decode_one(&s, req(kind, 0, 0, 512));
            assert_eq!(errno_of(&d), Some(NbdErrno::Perm), "{kind}");
        }
        assert_eq!(errno_of(&decode_one(&s, req(cmd::READ, 0, 0, 512))), None);
    }

    #[test]
    fn features_not_negotiated_are_refused() {
        // No structured replies: DF and BLOCK_STATUS are invalid.
        let s = Session::new(&neg(1 << 20, false, false, false, false));
        let d = decode_one(&s, req(cmd::READ, cmd_flags::DF, 0, 512));
        assert_eq!(errno_of(&d), Some(NbdErrno::Inval));
        let d = decode_one(&s, req(cmd::BLOCK_STATUS, 0, 0, 512));
        assert_eq!(errno_of(&d), Some(NbdErrno::Inval));
        // Unaligned requests pass when the client did not agree to block sizes.
        let d = decode_one(&s, req(cmd::READ, 0, 3, 5));
        assert_eq!(errno_of(&d), None);
    }

    #[test]
    fn a_file_range_too_large_for_a_chunk_gets_an_error_not_a_wrong_header() {
        #[derive(Debug)]
        struct Huge(std::fs::File);
        impl FileRange for Huge {
            fn file(&self) -> &std::fs::File {
                &self.0
            }
            fn offset(&self) -> u64 {
                0
            }
            fn len(&self) -> u64 {
                u64::from(u32::MAX)
            }
        }
        let s = Session::new(&neg(1 << 20, true, false, false, false));
        let mut out = Output::new();
        let file = tempfile::tempfile().unwrap();
        s.reply_read_file(&mut out, 9, 0, Box::new(Huge(file)));
        match &parse_replies(&out.take().unwrap(), true)[..] {
            [Reply::Chunk { kind, payload, .. }] => {
                assert_eq!(*kind, reply_type::ERROR);
                assert_eq!(&payload[..4], &75u32.to_be_bytes());
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn simple_and_structured_read_replies() {
        let data = Bytes::from(vec![1u8; 4096]);
        let s = Session::new(&neg(1 << 20, false, false, false, false));
        let mut out = Output::new();
        s.reply_read(&mut out, 9, 0, std::slice::from_ref(&data), false);
        let bytes = out.take().unwrap();
        assert_eq!(bytes.len(), 16 + 4096);
        assert_eq!(&bytes[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());

        let s = Session::new(&neg(1 << 20, true, false, false, false));
        // 64 KiB of data, then 128 KiB of zeroes, then 4 KiB of data.
        let mut buf = vec![0u8; 196 * 1024];
        buf[..65536].fill(3);
        buf[192 * 1024..].fill(4);
        let pieces = [Bytes::from(buf)];
        let mut out = Output::new();
        s.reply_read(&mut out, 9, 0, &pieces, false);
        let replies = parse_replies(&out.take().unwrap(), true);
        assert_eq!(
            replies
                .iter()
                .map(|r| match r {
                    Reply::Chunk {
                        kind,
                        flags,
                        payload,
                        ..
                    } => (*kind, *flags, payload.len()),
                    _ => panic!(),
                })
                .collect::<Vec<_>>(),
            vec![
                (reply_type::OFFSET_DATA, 0, 8 + 65536),
                (reply_type::OFFSET_HOLE, 0, 12),
                (reply_type::OFFSET_DATA, reply_flags::DONE, 8 + 4096),
            ]
        );
        // DF: one data chunk with the zeroes present.
        let mut out = Output::new();
        s.reply_read(&mut out, 9, 0, &pieces, true);
        let replies = parse_replies(&out.take().unwrap(), true);
        assert_eq!(replies.len(), 1);
        // Errors on READ are structured.
        let mut out = Output::new();
        s.reply_error(&mut out, 9, NbdErrno::Io, "boom");
        match &parse_replies(&out.take().unwrap(), true)[0] {
            Reply::Chunk { kind, payload, .. } => {
                assert_eq!(*kind, reply_type::ERROR);
                assert_eq!(&payload[..4], &5u32.to_be_bytes());
                assert_eq!(&payload[6..], b"boom");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn descriptors_merge_split_and_clip() {
        let hole = state::HOLE | state::ZERO;
        let ext = |len, flags| StatusExtent { len, flags };
        // Start before the offset; merge equal neighbours.
        let d = block_status_descriptors(
            4096,
            16384,
            false,
            0,
            &[ext(8192, 0), ext(4096, 0), ext(65536, hole)],
            512,
        );
        assert_eq!(d, vec![(8192, 0), (65536, hole)]);
        // req_one: one descriptor, no longer than the request.
        let d = block_status_descriptors(0, 1000, true, 0, &[ext(8192, hole)], 512);
        assert_eq!(d, vec![(1000, hole)]);
        // Lengths over 32 bits split in multiples of the block size.
        let d = block_status_descriptors(0, u32::MAX, false, 0, &[ext(1 << 33, hole)], 4096);
        assert_eq!(d[0].0 % 4096, 0);
        assert!(d.len() == 1 || d.len() == 2);
        // Bounded count.
        let many: Vec<_> = (0..10_000).map(|i| ext(512, i % 2)).collect();
        let d = block_status_descriptors(0, u32::MAX, false, 0, &many, 512);
        assert_eq!(d.len(), MAX_DESCRIPTORS);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}

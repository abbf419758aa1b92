//! Wire constants of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`), named as
//! the document names them, minus the `NBD_` prefix.
//!
//! Every integer on the wire is big-endian.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (16 bits, server to client).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The client may ask the server to omit the 124 zero bytes after EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client to server).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// No 124 zero bytes after EXPORT_NAME.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits, per export).
pub mod tx_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES (and NO_HOLE) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF command flag on READ is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// FLUSH and FUA on one connection cover all connections to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE (experimental; never set here).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The FAST_ZERO flag on WRITE_ZEROES is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use extended headers (not supported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success / end of a list.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One item of information (INFO, GO).
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR + 4;
    /// TLS must be initiated first.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// The client must request block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    /// The request or the reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (with payload).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard hint).
    pub const TRIM: u16 = 4;
    /// Cache (prefetch hint).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not leave a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail with ENOTSUP unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is a payload length (not negotiable here).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// The final chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// No payload; only as the final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `base:allocation` status flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string the protocol allows (export names, messages, queries).
pub const MAX_STRING: usize = 4096;

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// The largest READ, WRITE or CACHE request this server accepts, which is also the
/// maximum block size it advertises: 2^25 (32 MiB), the size the protocol document says
/// a portable client stays within and a server should not treat as an attack.
pub const MAX_PAYLOAD: u32 = 1 << 25;

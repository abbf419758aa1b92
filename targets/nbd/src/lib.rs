//! The NBD server: LUNs exported over the Network Block Device protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`), so QEMU, libnbd tools (`nbdinfo`, `nbdcopy`),
//! fio and the Linux client reach a Basalt LUN without iSCSI.
//!
//! # Shape
//!
//! A sans-IO protocol core and a thin tokio driver (quinn's proto/driver split):
//!
//! - [`proto`]: the wire constants.
//! - [`handshake`]: the fixed-newstyle negotiation as a state machine fed with bytes:
//!   `NBD_OPT_GO`, `INFO`, `LIST`, `STRUCTURED_REPLY`, `SET/LIST_META_CONTEXT`
//!   (`base:allocation`), `STARTTLS`, `ABORT`, and the old `EXPORT_NAME`.
//! - [`transmission`]: request framing (`check_request` says whether a whole request is
//!   buffered, then it is parsed), validation into typed [`Command`]s with the NBD error
//!   the protocol document asks for, and reply encoding (simple replies, structured
//!   `OFFSET_DATA`/`OFFSET_HOLE`/`BLOCK_STATUS`/`ERROR` chunks).
//! - [`wire`]: the output queue that keeps read data shared (no copy) for vectored
//!   writes.
//! - `server` (feature `server`, on by default): [`NbdServer`], its typed configuration
//!   ([`NbdConfig`]), per-connection drivers with pipelining, TLS through
//!   `tokio-rustls`, and per-export counters ([`NbdMetrics`]).
//!
//! The core has no tokio, no sockets and no clock, so the fuzz targets and the property
//! tests drive it directly, and the driver's unit tests run whole connections over
//! in-memory pipes.
//!
//! # Multi-conn
//!
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised because every connection to an export uses
//! the same device object, and the server replies to a write only after
//! [`BlockDev::write`](basalt_blockdev::BlockDev::write) completed on it. A FLUSH calls
//! [`BlockDev::flush`](basalt_blockdev::BlockDev::flush) on that same object, whose
//! contract is to make *every completed write* durable, whichever connection issued it.
//! So a FLUSH on any connection covers every write whose reply was sent before the FLUSH
//! was received, on all connections; FUA writes are durable before their reply. When
//! reconfiguration replaces an export's device, the connections that used the old one are
//! drained and closed, so no two device objects ever serve one export at once.
//!
//! # Alignment
//!
//! The server advertises the device's logical block size as the minimum block size. A
//! client that asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO` promised to honour it, so
//! its unaligned requests get `EINVAL`. Other clients are entitled to a minimum of 1
//! byte: their unaligned reads read the enclosing blocks, and unaligned writes and
//! write-zeroes do read-modify-write of the edge blocks with
//! [`BlockDev::compare_and_write`](basalt_blockdev::BlockDev::compare_and_write), retried
//! on a miscompare, so they are atomic against every other I/O on the device.

#![deny(missing_docs)]

pub mod errno;
pub mod handshake;
pub mod proto;
pub mod transmission;
pub mod wire;

#[cfg(feature = "server")]
mod server;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

#[cfg(test)]
mod proptests;

pub use errno::NbdErrno;
pub use handshake::{
    Catalog, ExportInfo, Handshake, HandshakeError, HandshakeEvent, Lookup, Negotiated, TlsPolicy,
};
pub use transmission::{
    check_request, CheckError, Command, CommandKind, Decoded, FrameError, Request, RequestHeader,
    Session, StatusExtent,
};
pub use wire::Output;

#[cfg(feature = "server")]
pub use server::{
    Cidr, CidrParseError, CommandSnapshot, Devices, ExportConfig, ExportMetricsSnapshot, NbdConfig,
    NbdMetrics, NbdServer, NbdServerError, ServerMetricsSnapshot, TlsMode, LATENCY_BUCKETS_SECONDS,
};

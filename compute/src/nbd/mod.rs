//! An NBD client that is a [`BlockDev`]: how a VMM process reaches a disk that lives in
//! the daemon.
//!
//! LUNs live in the daemon (`basalt serve`). A VMM process is separate so that a guest
//! or device bug cannot take storage down, so its virtio-blk backend reaches the LUN
//! over NBD on a unix socket the daemon exports it on: one copy through the socket, no
//! TCP, and the daemon keeps all storage state. vhost-user-blk would save that copy
//! (the daemon would read guest memory directly), but it needs the daemon to map every
//! VM's memory and run a virtqueue per disk, which puts guest-controlled descriptors in
//! the storage process: the opposite of the isolation the process split is for.
//!
//! [`NbdDev`] does the fixed-newstyle handshake with NBD_OPT_GO ([`wire::Handshake`],
//! sans-IO), then pipelines requests: any number in flight, matched to replies by
//! handle by one reader task. Simple replies only; structured replies are not
//! negotiated. Addresses are NBD URIs: `nbd://host[:port]/export` and
//! `nbd+unix:///export?socket=/path`.
//!
//! # Riding out a lost connection
//!
//! The server goes away when the daemon restarts (for a VM, a storage-controller
//! restart), and the VM must notice no more than a pause, as behind an iSCSI
//! initiator's replacement timeout or QEMU's nbd `reconnect-delay`. So when the
//! connection breaks (EOF, an I/O error, a protocol violation), [`NbdDev`]:
//!
//! - keeps every unanswered request, and holds new ones (nothing fails yet);
//! - reconnects in the background: attempts 50 ms apart, doubling up to 2 s, each
//!   bounded to 5 s; an attempt redoes the whole handshake and is refused unless the
//!   export has the block size it had and at least the size
//!   ([`NbdError::ExportChanged`]). A LUN grown online comes back larger, which is
//!   fine: the device keeps the geometry the guest saw at the first connection. It is
//!   refused too ([`NbdError::ExportFeaturesChanged`]) if it turned read-only, lost a
//!   command or flag the device sends (`SEND_FUA`, `SEND_TRIM`, `SEND_WRITE_ZEROES`,
//!   `SEND_FAST_ZERO`), gained or lost `SEND_FLUSH` (whether to flush and keep a
//!   replay log was decided at the first connection), takes a smaller payload than the
//!   device's largest request, or prefers a larger block than the guest was given;
//! - counts a restored connection as ending the outage only once it has *proved
//!   itself*: after the replay log is written again, the server answers a request on
//!   it (or it stays up 5 s, for an idle guest). A connection lost before that
//!   continues the outage: its clock (the reconnect window runs from the first loss)
//!   and its backoff (the next attempt waits the next pause), so a server that
//!   completes the handshake and drops the connection neither holds requests forever
//!   nor makes the client spin;
//! - on success, first writes again the *replay log*: the writes (and trims,
//!   write-zeroes; FUA ones too) the old connection acknowledged but no flush has
//!   covered since, because a server that went down may have lost them with its cache
//!   (and an older overlapping write written again must not land over a FUA one, so
//!   those are replayed too, in their place; writing them again is harmless). Overlapping
//!   entries go one after the other, in acknowledgement order, and all are
//!   acknowledged before anything else is sent. Then it resends every unanswered
//!   request under its handle: reads, and writes too. Resending a write is safe: an
//!   NBD write carries its offset and its whole payload, so writing it twice leaves
//!   what writing it once does, and requests in flight together have no order among
//!   them anyway (a block device's user orders dependent writes by waiting for
//!   completions). This relies on the export having one writer, this client, as a VM
//!   disk does. Flushes go last, once every resent write is acknowledged on the new
//!   connection, so a flush that succeeds covers everything written before it,
//!   whichever connection acknowledged it. A flush's success trims the replay log; the
//!   log holds at most [`NbdOptions::replay_limit`] bytes of payload, each entry
//!   counting at least 4 KiB so that trims and write-zeroes (no payload) are bounded
//!   too (past it the client flushes on its own), and holds nothing when the server
//!   has no volatile cache (no `NBD_FLAG_SEND_FLUSH`). If a replay fails,
//!   acknowledged data may be
//!   gone: the next flush of a user to complete, whether issued before or after the
//!   reconnection, fails with the server's errno (once) and trims nothing, so the log
//!   keeps the failed write; the client's own flush neither reports nor clears that.
//!   A later reconnection whose replay of the whole log succeeds clears it. If the
//!   connection breaks again during the replay, the replays in flight are dropped
//!   (the log still holds them) and the next reconnection starts over;
//! - past [`NbdOptions::reconnect_window`] (default 60 s, [`DEFAULT_RECONNECT_WINDOW`];
//!   checked after each failed attempt and each loss of an unproven connection)
//!   without a connection that proved itself, every waiting request fails with [`BlockError::Offline`] ("NBD export ... unreachable for more than N s
//!   (reconnect window): last attempt: ..."), which a guest sees as an I/O error, and
//!   so does every new request, at once. The device does *not* stay failed: attempts
//!   go on every 2 s, and once the export is back, requests work again (after the
//!   replay above). That is what an admin expects of a storage path after a long
//!   outage: the guest's own error handling decides what to make of the failed
//!   requests, and nobody has to restart the VM to use its disk again.
//!
//! The VMM runs confined ([`crate::sandbox`]): reconnecting needs `socket` (of the
//! families NBD uses) and `connect`, which its seccomp filter allows for this (a TCP
//! export's host name is resolved once, at the first connection, before the filter: a
//! reconnection reuses those addresses, as resolving needs files the filter refuses),
//! and a VMM that dropped privileges (`--user`) must still be allowed by the socket's
//! permissions.

pub mod wire;

use async_trait::async_trait;
use basalt_blockdev::{
    check_compare_and_write, check_range, BlockDev, BlockError, Capabilities, CompareOutcome,
    Geometry, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use wire::{Command, ExportInfo, Handshake};

/// Why an NBD connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The address is not an NBD URI we understand.
    #[error("bad NBD address {uri:?}: {reason}")]
    BadAddress {
        /// The address.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting or talking to the server failed.
    #[error("NBD {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// After a reconnection, the export is not the one this device was opened on.
    #[error("NBD export {export} came back with {} bytes in {}-byte blocks, it had {} bytes in {}-byte blocks: refused", now.0, now.1, was.0, was.1)]
    ExportChanged {
        /// The export's address.
        export: String,
        /// Size and block size at the first connection.
        was: (u64, u32),
        /// Size and block size now.
        now: (u64, u32),
    },
    /// After a reconnection, the export lacks something the device relies on: a
    /// transmission flag gone (or a volatile cache appeared, which the device would not
    /// flush), read-only now, or block sizes that no longer fit the geometry it has.
    #[error("NBD export {export} came back {what}: refused")]
    ExportFeaturesChanged {
        /// The export's address.
        export: String,
        /// What changed, in words.
        what: String,
    },
    /// The server refused the export.
    #[error("NBD server refused export {export:?} (reply {code:#x}): {message}")]
    Refused {
        /// The export asked for.
        export: String,
        /// The NBD_REP_ERR_* code.
        code: u32,
        /// The server's message.
        message: String,
    },
}

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (10809 by default).
        port: u16,
        /// Export name.
        export: String,
    },
    /// A unix socket.
    Unix {
        /// Socket path.
        socket: PathBuf,
        /// Export name.
        export: String,
    },
}

impl NbdAddress {
    /// Parses `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
    pub fn parse(uri: &str) -> Result<Self, NbdError> {
        let bad = |reason: &str| NbdError::BadAddress {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad("nbd+unix takes no host"));
            }
            let export = path.trim_start_matches('/').to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            Ok(NbdAddress::Unix {
                socket: PathBuf::from(socket),
                export,
            })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            if hostport.is_empty() {
                return Err(bad("missing host"));
            }
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                    Ok(p) => (h.to_string(), p),
                    Err(_) => return Err(bad("bad port")),
                },
                _ => (hostport.to_string(), 10809),
            };
            Ok(NbdAddress::Tcp {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port,
                export: export.to_string(),
            })
        } else {
            Err(bad("expected nbd:// or nbd+unix://"))
        }
    }

    /// The address as a URI (what QEMU's `-drive file=` takes too).
    pub fn to_uri(&self) -> String {
        match self {
            NbdAddress::Tcp { host, port, export } => format!("nbd://{host}:{port}/{export}"),
            NbdAddress::Unix { socket, export } => {
                format!("nbd+unix:///{export}?socket={}", socket.display())
            }
        }
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// How long requests wait for a lost connection to come back by default.
pub const DEFAULT_RECONNECT_WINDOW: Duration = Duration::from_secs(60);
/// How many bytes of acknowledged but unflushed writes are kept for replay by default.
pub const DEFAULT_REPLAY_LIMIT: usize = 64 << 20;
/// The least a replay log entry counts toward [`NbdOptions::replay_limit`] (a block's
/// worth: the default limit holds at most 16384 entries).
const LOG_ENTRY_COST: usize = 4096;
/// The first pause between reconnection attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long one connection attempt (connect plus handshake) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a restored connection must stay up after its replay, answering nothing,
/// to count as proven (an idle guest sends nothing to be answered).
const PROVEN_AFTER: Duration = Duration::from_secs(5);

/// What an [`NbdDev`] reports about its connection (for a log).
pub type EventHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How an [`NbdDev`] rides out a lost connection. See the [module docs](self).
#[derive(Clone)]
pub struct NbdOptions {
    /// How long requests wait for a lost connection to be restored before they fail.
    /// Zero fails them as soon as the connection is lost (the device still reconnects
    /// in the background).
    pub reconnect_window: Duration,
    /// Acknowledged writes not yet covered by a flush are kept (up to this many bytes of
    /// payload, each entry counting at least 4 KiB, trims and write-zeroes too) to be
    /// written again after a reconnection; past it, the client flushes on its own.
    pub replay_limit: usize,
    /// Called with a line of text when the connection is lost, restored, or given up.
    pub on_event: Option<EventHook>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            reconnect_window: DEFAULT_RECONNECT_WINDOW,
            replay_limit: DEFAULT_REPLAY_LIMIT,
            on_event: None,
        }
    }
}

impl std::fmt::Debug for NbdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdOptions")
            .field("reconnect_window", &self.reconnect_window)
            .field("replay_limit", &self.replay_limit)
            .finish()
    }
}

/// One transmission request, kept until it is answered so that it can be sent again.
#[derive(Clone)]
struct Req {
    cmd: Command,
    flags: u16,
    offset: u64,
    len: u32,
    data: Option<Bytes>,
}

impl Req {
    fn modifies(&self) -> bool {
        matches!(
            self.cmd,
            Command::Write | Command::Trim | Command::WriteZeroes
        )
    }

    /// What the request counts toward [`NbdOptions::replay_limit`] in the replay log:
    /// its payload, but at least [`LOG_ENTRY_COST`], since a trim or write-zeroes
    /// carries none yet still takes memory and a request to replay.
    fn log_cost(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len).max(LOG_ENTRY_COST)
    }

    fn overlaps(&self, other: &Req) -> bool {
        self.offset < other.offset + u64::from(other.len)
            && other.offset < self.offset + u64::from(self.len)
    }
}

/// Why a request did not succeed.
enum Failure {
    /// The server answered with this errno.
    Errno(u32),
    /// The connection is gone and was not restored in time.
    Offline(String),
}

type Done = oneshot::Sender<Result<Bytes, Failure>>;

struct Pending {
    req: Req,
    done: Done,
    /// Add the request to the replay log once acknowledged (writes, FUA ones too, on a
    /// server with a volatile cache).
    log: bool,
    /// A replay of a log entry by a reconnection (not anyone's request).
    replay: bool,
    /// The client's own flush bounding the replay log: it never reports a failed
    /// replay (nobody would see it), it leaves that to the next flush of a user.
    auto: bool,
    /// For a flush: the replay log sequence number when it was issued; a success
    /// covers every entry below it.
    mark: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Connected; replies are accepted from the reader of this generation.
    Up(u64),
    /// Lost at this moment; `expired` once the reconnect window has passed.
    Down { since: Instant, expired: bool },
}

struct State {
    pending: HashMap<u64, Pending>,
    link: Link,
    generation: u64,
    /// Start of the outage no proven connection has ended yet: a connection lost
    /// before it proved itself continues it (its clock and its backoff) rather than
    /// starting a new one, so a server that accepts and drops cannot hold requests
    /// forever nor make the client spin.
    outage: Option<Instant>,
    /// The pause before the next reconnection attempt.
    backoff: Duration,
    /// When the current connection finished writing the replay log again (at once for
    /// the first connection); `None` while replaying or down.
    settled: Option<Instant>,
    /// The current connection answered a request after `settled`.
    proven: bool,
    /// Why the last connection ended or the last attempt failed.
    last_error: String,
    /// Acknowledged writes no flush has covered yet, in acknowledgement order, by
    /// sequence number; replayed after a reconnection.
    log: BTreeMap<u64, Req>,
    /// What the log counts toward the replay limit ([`Req::log_cost`]).
    log_bytes: usize,
    next_seq: u64,
    /// A replay failed: the next flush of a user to complete fails (and covers
    /// nothing), since acknowledged data may be lost.
    replay_failed: Option<u32>,
    flushing: bool,
}

struct Inner {
    addr: NbdAddress,
    /// A TCP export's addresses, resolved at the first connection ([`resolve`]).
    resolved: Vec<SocketAddr>,
    info: ExportInfo,
    block_size: u32,
    /// What the device presents (a reconnection must still fit it).
    geometry: Geometry,
    opts: NbdOptions,
    state: Mutex<State>,
    /// The current connection's write half, with its generation. Held across a whole
    /// request send, and by a reconnection while it replays and resends.
    writer: tokio::sync::Mutex<Option<(u64, Writer)>>,
    next_handle: AtomicU64,
    reconnects: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// Woken on every reply (a reconnection waits for resent writes).
    replied: Notify,
}

/// A block device on an NBD export. See the [module docs](self).
pub struct NbdDev {
    inner: Arc<Inner>,
    geometry: Geometry,
}

impl std::fmt::Debug for NbdDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDev")
            .field("addr", &self.inner.addr)
            .field("info", &self.inner.info)
            .finish()
    }
}

/// NBD errno values (the protocol fixes them to Linux's numbers).
const ENOSPC: u32 = 28;

/// The addresses of a TCP export's host, resolved once at the first connection:
/// reconnections reuse them, since the sandboxed VMM may not resolve names (that opens
/// files and sockets its filter refuses). Empty for a unix socket.
async fn resolve(addr: &NbdAddress) -> Result<Vec<SocketAddr>, NbdError> {
    let NbdAddress::Tcp { host, port, .. } = addr else {
        return Ok(Vec::new());
    };
    let what = || format!("resolve {host}:{port}");
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
        .await
        .map_err(|source| NbdError::Io {
            what: what(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(NbdError::Io {
            what: what(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(addrs)
}

/// Connects to `addr` (over TCP, to `resolved`, what [`resolve`] returned) and
/// negotiates the export: the two halves of the stream and what the server said about
/// the export.
async fn open(
    addr: &NbdAddress,
    resolved: &[SocketAddr],
) -> Result<(Reader, Writer, ExportInfo), NbdError> {
    let (mut reader, mut writer): (Reader, Writer) = match addr {
        NbdAddress::Tcp { host, port, .. } => {
            let s = tokio::net::TcpStream::connect(resolved)
                .await
                .map_err(|source| NbdError::Io {
                    what: format!("connect to {host}:{port}"),
                    source,
                })?;
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        NbdAddress::Unix { socket, .. } => {
            let s = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|source| NbdError::Io {
                    what: format!("connect to {}", socket.display()),
                    source,
                })?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    let export = match addr {
        NbdAddress::Tcp { export, .. } | NbdAddress::Unix { export, .. } => export,
    };
    let io_err = |what: &str| {
        let what = what.to_string();
        move |source| NbdError::Io { what, source }
    };
    let mut hs = Handshake::new(export);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let info = loop {
        if let Some(info) = hs.handle_input(&mut buf)? {
            break info;
        }
        if let Some(out) = hs.poll_transmit() {
            writer
                .write_all(&out)
                .await
                .map_err(io_err("handshake write"))?;
            writer.flush().await.map_err(io_err("handshake write"))?;
        }
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(io_err("handshake read"))?;
        if n == 0 {
            return Err(NbdError::Protocol(
                "server closed the connection during the handshake".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if let Some(out) = hs.poll_transmit() {
        writer
            .write_all(&out)
            .await
            .map_err(io_err("handshake write"))?;
    }
    Ok((reader, writer, info))
}

async fn send(w: &mut Writer, handle: u64, req: &Req) -> io::Result<()> {
    let header = wire::encode_request(req.cmd, req.flags, handle, req.offset, req.len);
    w.write_all(&header).await?;
    if let Some(d) = &req.data {
        w.write_all(d).await?;
    }
    w.flush().await
}

impl NbdDev {
    /// Connects with the default [`NbdOptions`] (see [`NbdDev::connect_with`]).
    pub async fn connect(addr: &NbdAddress) -> Result<Self, NbdError> {
        Self::connect_with(addr, NbdOptions::default()).await
    }

    /// Connects, negotiates, and starts the reply reader on the current tokio runtime.
    /// The logical block size is the server's minimum block size, at least 512. Only
    /// this first connection's failure is returned; later losses are ridden out as
    /// `opts` says.
    pub async fn connect_with(addr: &NbdAddress, opts: NbdOptions) -> Result<Self, NbdError> {
        let resolved = resolve(addr).await?;
        let (reader, writer, info) = open(addr, &resolved).await?;
        let block_size = info.min_block.max(512);
        let caps = Capabilities {
            discard: info.flags & wire::TF_SEND_TRIM != 0,
            discard_zeroes: false,
            fast_zeroes: info.flags & wire::TF_SEND_WRITE_ZEROES != 0,
            volatile_cache: info.flags & wire::TF_SEND_FLUSH != 0,
            read_only: info.flags & wire::TF_READ_ONLY != 0,
        };
        let max_io = info.max_payload.min(32 << 20) / block_size * block_size;
        let geometry = Geometry {
            block_size,
            physical_block_size: info.preferred_block.max(block_size),
            blocks: info.size / u64::from(block_size),
            optimal_io_size: 0,
            max_io_bytes: max_io,
            capabilities: caps,
        };
        let inner = Arc::new(Inner {
            addr: addr.clone(),
            resolved,
            info,
            block_size,
            geometry,
            opts,
            state: Mutex::new(State {
                pending: HashMap::new(),
                link: Link::Up(1),
                generation: 1,
                outage: None,
                backoff: FIRST_BACKOFF,
                settled: Some(Instant::now()),
                proven: true,
                last_error: String::new(),
                log: BTreeMap::new(),
                log_bytes: 0,
                next_seq: 0,
                replay_failed: None,
                flushing: false,
            }),
            writer: tokio::sync::Mutex::new(Some((1, writer))),
            next_handle: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
            replied: Notify::new(),
        });
        tokio::spawn(read_replies(reader, Arc::downgrade(&inner), 1));
        Ok(NbdDev { inner, geometry })
    }

    /// What the server said about the export (at the first connection).
    pub fn export_info(&self) -> ExportInfo {
        self.inner.info
    }

    /// How many times the connection was restored (counted once its replay log is
    /// written again, before any request is resent).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the device is connected now.
    pub fn is_connected(&self) -> bool {
        matches!(self.inner.state().link, Link::Up(_))
    }

    async fn request(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<Bytes>,
    ) -> Result<Bytes, BlockError> {
        Inner::request(
            &self.inner,
            Req {
                cmd,
                flags,
                offset,
                len,
                data,
            },
            false,
        )
        .await
    }

    fn max_chunk(&self) -> u64 {
        u64::from(self.geometry.max_io_bytes.max(self.geometry.block_size))
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn event(&self, text: &str) {
        if let Some(hook) = &self.opts.on_event {
            hook(text);
        }
    }

    fn expired_error(&self, st: &State) -> String {
        format!(
            "NBD export {} unreachable for more than {} s (reconnect window): {}",
            self.addr.to_uri(),
            self.opts.reconnect_window.as_secs_f64(),
            st.last_error
        )
    }

    /// Sends `req` (or queues it for the reconnection to send) and waits for its reply.
    /// `auto`: the client's own flush (see [`Pending::auto`]).
    async fn request(self: &Arc<Self>, req: Req, auto: bool) -> Result<Bytes, BlockError> {
        let (tx, rx) = oneshot::channel();
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let cmd = req.cmd;
        let (offset, len) = (req.offset, req.len);
        {
            let mut w = self.writer.lock().await;
            let send_on = {
                let mut st = self.state();
                if let Link::Down { expired: true, .. } = st.link {
                    return Err(BlockError::Offline(self.expired_error(&st)));
                }
                // FUA writes are logged too: a replay of an older overlapping write
                // must not land over them (replaying one is harmless).
                let log = req.modifies() && self.info.flags & wire::TF_SEND_FLUSH != 0;
                let mark = st.next_seq;
                let payload = req.clone();
                st.pending.insert(
                    handle,
                    Pending {
                        req: payload,
                        done: tx,
                        log,
                        replay: false,
                        auto,
                        mark,
                    },
                );
                match (st.link, w.as_ref()) {
                    (Link::Up(g), Some((wg, _))) if g == *wg => Some(g),
                    // Down: the reconnection sends it.
                    _ => None,
                }
            };
            if let (Some(g), Some((_, wr))) = (send_on, w.as_mut()) {
                if let Err(e) = send(wr, handle, &req).await {
                    *w = None;
                    self.lost(g, &format!("write failed: {e}"));
                }
            }
        }
        match rx.await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(Failure::Errno(errno))) => Err(errno_error(cmd, offset, len, errno)),
            Ok(Err(Failure::Offline(why))) => Err(BlockError::Offline(why)),
            Err(_) => Err(BlockError::Offline(format!(
                "NBD connection to {} closed",
                self.addr.to_uri()
            ))),
        }
    }

    /// The connection of generation `generation` broke: requests wait, and a
    /// reconnection starts (once per loss).
    fn lost(self: &Arc<Self>, generation: u64, why: &str) {
        let window = self.opts.reconnect_window;
        let (fresh, since, gave_up) = {
            let mut st = self.state();
            if st.link != Link::Up(generation) {
                return;
            }
            // A window shorter than PROVEN_AFTER: a connection that stayed up that long
            // is proven too, or a healthy idle one dropping would fail requests at once.
            let proven_after = PROVEN_AFTER.min(window);
            let fresh = st.proven || st.settled.is_some_and(|t| t.elapsed() >= proven_after);
            let since = match st.outage {
                Some(since) if !fresh => since,
                _ => Instant::now(),
            };
            if fresh {
                st.backoff = FIRST_BACKOFF;
            }
            st.outage = Some(since);
            st.settled = None;
            st.proven = false;
            st.link = Link::Down {
                since,
                expired: false,
            };
            st.last_error = format!("connection lost: {why}");
            // Replays in flight on this connection will never be answered: dropping
            // them ends the reconnection that waits for them (its `drain_replays`),
            // which releases the writer for the next one. The log still holds them.
            st.pending.retain(|_, p| !p.replay);
            // An unproven connection did not end the outage: its window may be over.
            let gave_up = !window.is_zero() && since.elapsed() >= window;
            if window.is_zero() || gave_up {
                expire(self, &mut st);
            }
            (fresh, since, gave_up)
        };
        self.replied.notify_waiters();
        if fresh {
            self.event(&format!(
                "NBD connection to {} lost ({why}); reconnecting, requests wait up to {} s",
                self.addr.to_uri(),
                window.as_secs_f64()
            ));
        } else if gave_up {
            self.event(&format!(
                "NBD connection to {} lost again before it answered anything ({why}); not \
                 back within {} s: requests fail until it is",
                self.addr.to_uri(),
                window.as_secs_f64()
            ));
        } else {
            self.event(&format!(
                "NBD connection to {} lost again before it answered anything ({why}); \
                 still reconnecting, {:.1} s into the outage",
                self.addr.to_uri(),
                since.elapsed().as_secs_f64()
            ));
        }
        self.runtime
            .spawn(reconnect(Arc::downgrade(self), window, !fresh));
    }

    /// Takes the reply for `handle` on the connection of `generation`.
    fn complete(
        self: &Arc<Self>,
        generation: u64,
        handle: u64,
        result: Result<Bytes, u32>,
    ) -> Expect {
        let mut flush = false;
        {
            let mut st = self.state();
            if st.link != Link::Up(generation) {
                // A late reply on a connection given up: its request is resent.
                return Expect::Stale;
            }
            let Some(p) = st.pending.remove(&handle) else {
                return Expect::Unknown;
            };
            if st.settled.is_some() && !st.proven {
                // Answered after the replay: this connection ended the outage.
                st.proven = true;
                st.outage = None;
            }
            match result {
                Ok(data) => {
                    if p.log {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        st.log_bytes += p.req.log_cost();
                        st.log.insert(seq, p.req);
                        if st.log_bytes > self.opts.replay_limit && !st.flushing {
                            st.flushing = true;
                            flush = true;
                        }
                    } else if p.req.cmd == Command::Flush {
                        if let Some(errno) = st.replay_failed {
                            // Acknowledged data the server could not write again: this
                            // flush covers nothing, and the log keeps it all. A user's
                            // flush reports it (once); the client's own does not.
                            if !p.auto {
                                st.replay_failed = None;
                            }
                            let _ = p.done.send(Err(Failure::Errno(errno)));
                            drop(st);
                            self.replied.notify_waiters();
                            return Expect::Reply(0);
                        }
                        let kept = st.log.split_off(&p.mark);
                        st.log = kept;
                        st.log_bytes = st.log.values().map(Req::log_cost).sum();
                    }
                    let _ = p.done.send(Ok(data));
                }
                Err(errno) => {
                    if p.replay {
                        // Checked when a flush completes, whichever connection sent it.
                        st.replay_failed = Some(errno);
                    }
                    let _ = p.done.send(Err(Failure::Errno(errno)));
                }
            }
        }
        self.replied.notify_waiters();
        if flush {
            // Bound the replay log: a flush of our own covers what it holds.
            let me = self.clone();
            self.runtime.spawn(async move {
                let req = Req {
                    cmd: Command::Flush,
                    flags: 0,
                    offset: 0,
                    len: 0,
                    data: None,
                };
                let _ = me.request(req, true).await;
                me.state().flushing = false;
            });
        }
        Expect::Reply(0)
    }

    /// What a reply for `handle` on the connection of `generation` carries.
    fn expect(&self, generation: u64, handle: u64) -> Expect {
        let st = self.state();
        if st.link != Link::Up(generation) {
            return Expect::Stale;
        }
        match st.pending.get(&handle) {
            Some(p) if p.req.cmd == Command::Read => Expect::Reply(p.req.len as usize),
            Some(_) => Expect::Reply(0),
            None => Expect::Unknown,
        }
    }
}

/// What the reader makes of a reply header.
enum Expect {
    /// A pending request; a successful reply carries this many bytes.
    Reply(usize),
    /// This connection was given up: the reader stops.
    Stale,
    /// Nothing we asked: the stream cannot be trusted.
    Unknown,
}

/// Fails every waiting request: the reconnect window has passed.
fn expire(inner: &Inner, st: &mut State) {
    if let Link::Down { since, .. } = st.link {
        st.link = Link::Down {
            since,
            expired: true,
        };
    }
    let why = inner.expired_error(st);
    for (_, p) in st.pending.drain() {
        let _ = p.done.send(Err(Failure::Offline(why.clone())));
    }
}

/// Whether a reconnection's export `now` is still the disk the device presents.
fn same_export(inner: &Inner, now: &ExportInfo) -> Result<(), NbdError> {
    let was = &inner.info;
    // A LUN grown online comes back larger: fine, the guest keeps the size it saw.
    // Smaller, or another block size, is not the disk it had.
    if now.size < was.size || now.min_block.max(512) != inner.block_size {
        return Err(NbdError::ExportChanged {
            export: inner.addr.to_uri(),
            was: (was.size, inner.block_size),
            now: (now.size, now.min_block.max(512)),
        });
    }
    let mut what = Vec::new();
    if now.flags & wire::TF_READ_ONLY != 0 && was.flags & wire::TF_READ_ONLY == 0 {
        what.push("read-only".to_string());
    }
    // The device decided at the first connection whether to flush and keep a replay
    // log: a cache appearing would go unflushed, one vanishing refuses the flushes.
    if (now.flags ^ was.flags) & wire::TF_SEND_FLUSH != 0 {
        what.push(if now.flags & wire::TF_SEND_FLUSH != 0 {
            "with a volatile cache (NBD_FLAG_SEND_FLUSH) it did not have".to_string()
        } else {
            "without NBD_FLAG_SEND_FLUSH".to_string()
        });
    }
    // Commands and request flags the device sends because the server offered them.
    for (flag, name) in [
        (wire::TF_SEND_FUA, "NBD_FLAG_SEND_FUA"),
        (wire::TF_SEND_TRIM, "NBD_FLAG_SEND_TRIM"),
        (wire::TF_SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES"),
        (wire::TF_SEND_FAST_ZERO, "NBD_FLAG_SEND_FAST_ZERO"),
    ] {
        if was.flags & flag != 0 && now.flags & flag == 0 {
            what.push(format!("without {name}"));
        }
    }
    let largest = inner.geometry.max_io_bytes.max(inner.block_size);
    if now.max_payload < largest {
        what.push(format!(
            "with a maximum payload of {} bytes (requests are up to {largest})",
            now.max_payload
        ));
    }
    // The preferred block size is advisory (and a server that omits
    // NBD_INFO_BLOCK_SIZE reports the default): no reason to refuse.
    if what.is_empty() {
        Ok(())
    } else {
        Err(NbdError::ExportFeaturesChanged {
            export: inner.addr.to_uri(),
            what: what.join(", "),
        })
    }
}

/// Restores a lost connection: attempts with backoff; when one succeeds (same block
/// size, same size or larger), replays the unflushed writes, resends the unanswered
/// requests (flushes last, once the writes before them are acknowledged), and lets new
/// requests through. Past `window`, waiting requests fail; the attempts go on.
/// `pause_first`: the outage goes on (a connection was lost before it proved itself),
/// so the first attempt waits its turn in the backoff too.
async fn reconnect(weak: Weak<Inner>, window: Duration, pause_first: bool) {
    let attempt_timeout = ATTEMPT_TIMEOUT.min(window.max(Duration::from_secs(1)));
    let mut pause = pause_first;
    let (reader, writer) = loop {
        if pause {
            // The backoff lives in the state, so that it carries over to the next
            // reconnection when this one's connection is lost unproven.
            let backoff = {
                let Some(inner) = weak.upgrade() else { return };
                let mut st = inner.state();
                let b = st.backoff;
                st.backoff = (b * 2).min(MAX_BACKOFF);
                b
            };
            tokio::time::sleep(backoff).await;
        }
        pause = true;
        let Some(inner) = weak.upgrade() else { return };
        let attempt =
            tokio::time::timeout(attempt_timeout, open(&inner.addr, &inner.resolved)).await;
        let result = match attempt {
            Ok(Ok((r, w, info))) => same_export(&inner, &info).map(|()| (r, w)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NbdError::Protocol(format!(
                "no answer within {} s",
                attempt_timeout.as_secs_f64()
            ))),
        };
        match result {
            Ok(conn) => break conn,
            Err(e) => {
                let gave_up = {
                    let mut st = inner.state();
                    st.last_error = format!("last attempt: {e}");
                    match st.link {
                        Link::Down {
                            since,
                            expired: false,
                        } if since.elapsed() >= window => {
                            expire(&inner, &mut st);
                            true
                        }
                        _ => false,
                    }
                };
                if gave_up {
                    inner.event(&format!(
                        "NBD export {} not back within {} s ({e}): requests fail until it is",
                        inner.addr.to_uri(),
                        window.as_secs_f64()
                    ));
                }
            }
        }
        drop(inner);
    };
    let Some(inner) = weak.upgrade() else { return };
    let mut w = inner.writer.lock().await;
    let (generation, replays, resend, flushes, outage) = {
        let mut st = inner.state();
        let outage = match st.link {
            Link::Down { since, .. } => since.elapsed(),
            Link::Up(_) => Duration::ZERO,
        };
        st.generation += 1;
        let g = st.generation;
        st.link = Link::Up(g);
        // Replays of an attempt that broke off: the log still holds them, and resending
        // them after newer writes could undo those.
        st.pending.retain(|_, p| !p.replay);
        // The log still holds whatever an earlier replay failed to write (no flush
        // trims it while that is unreported) and all of it is written again below,
        // before any flush: a failure of this replay sets it again.
        st.replay_failed = None;
        let replays: Vec<Req> = st.log.values().cloned().collect();
        let mut resend = Vec::new();
        let mut flushes = Vec::new();
        for (&h, p) in &st.pending {
            if p.req.cmd == Command::Flush {
                flushes.push((h, p.req.clone()));
            } else {
                resend.push((h, p.req.clone()));
            }
        }
        (g, replays, resend, flushes, outage)
    };
    *w = Some((generation, writer));
    tokio::spawn(read_replies(reader, weak.clone(), generation));
    let Some((_, wr)) = w.as_mut() else { return };
    let fail = |inner: &Arc<Inner>, e: &str| inner.lost(generation, e);

    // 1. Writes acknowledged on an earlier connection but never flushed: the server may
    //    have lost them with its cache. Written again in their order (overlapping ones
    //    one after the other), all acknowledged before anything else is sent.
    let mut in_flight: Vec<(Req, oneshot::Receiver<Result<Bytes, Failure>>)> = Vec::new();
    let n_replays = replays.len();
    for req in replays {
        if in_flight.iter().any(|(r, _)| r.overlaps(&req)) && !drain_replays(&mut in_flight).await {
            return;
        }
        let handle = inner.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.state();
            // Lost already: `lost` dropped the replays, and one added now would never
            // be answered. The next reconnection replays the log.
            if st.link != Link::Up(generation) {
                return;
            }
            st.pending.insert(
                handle,
                Pending {
                    req: req.clone(),
                    done: tx,
                    log: false,
                    replay: true,
                    auto: false,
                    mark: 0,
                },
            );
        }
        if let Err(e) = send(wr, handle, &req).await {
            // Not a request of anyone's: the log still holds it.
            inner.state().pending.remove(&handle);
            return fail(&inner, &format!("write failed: {e}"));
        }
        in_flight.push((req, rx));
    }
    if !drain_replays(&mut in_flight).await {
        return;
    }
    {
        let mut st = inner.state();
        if st.link != Link::Up(generation) {
            return;
        }
        // From here a reply proves the connection (see `State::outage`).
        st.settled = Some(Instant::now());
    }
    // Counted before anything is resent, so that whoever sees a reply on this
    // connection sees the count too.
    inner.reconnects.fetch_add(1, Ordering::Relaxed);

    // 2. The requests that were unanswered or issued meanwhile, flushes held back.
    let mut writes = Vec::new();
    for (h, req) in &resend {
        if let Err(e) = send(wr, *h, req).await {
            return fail(&inner, &format!("write failed: {e}"));
        }
        if req.modifies() {
            writes.push(*h);
        }
    }
    // 3. A flush succeeds only once every write before it is acknowledged here.
    if !flushes.is_empty() {
        loop {
            let notified = inner.replied.notified();
            {
                let st = inner.state();
                if st.link != Link::Up(generation) {
                    return;
                }
                if !writes.iter().any(|h| st.pending.contains_key(h)) {
                    break;
                }
            }
            notified.await;
        }
        for (h, req) in &flushes {
            if let Err(e) = send(wr, *h, req).await {
                return fail(&inner, &format!("write failed: {e}"));
            }
        }
    }
    drop(w);
    inner.event(&format!(
        "NBD connection to {} restored after {:.1} s: {} unflushed writes replayed, {} requests resent",
        inner.addr.to_uri(),
        outage.as_secs_f64(),
        n_replays,
        resend.len() + flushes.len()
    ));
}

/// Waits for the replays in flight. False when the connection broke meanwhile (`lost`
/// drops the replays, which closes their channels). A failed replay is recorded by
/// `complete` for the next flush to report.
async fn drain_replays(
    in_flight: &mut Vec<(Req, oneshot::Receiver<Result<Bytes, Failure>>)>,
) -> bool {
    for (_, rx) in in_flight.drain(..) {
        match rx.await {
            Ok(Ok(_)) | Ok(Err(Failure::Errno(_))) => {}
            Ok(Err(Failure::Offline(_))) | Err(_) => return false,
        }
    }
    true
}

async fn read_replies(mut reader: Reader, weak: Weak<Inner>, generation: u64) {
    let mut header = [0u8; 16];
    let why = loop {
        if let Err(e) = reader.read_exact(&mut header).await {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                "the server closed the connection".to_string()
            } else {
                format!("read failed: {e}")
            };
        }
        let (errno, handle) = match wire::parse_simple_reply(&header) {
            Ok(r) => r,
            Err(e) => break e.to_string(),
        };
        let Some(inner) = weak.upgrade() else { return };
        let read_len = match inner.expect(generation, handle) {
            Expect::Reply(n) => n,
            Expect::Stale => return,
            Expect::Unknown => break format!("reply to unknown handle {handle}"),
        };
        let result = if errno != 0 {
            Err(errno)
        } else {
            let mut data = BytesMut::zeroed(read_len);
            if read_len > 0 {
                if let Err(e) = reader.read_exact(&mut data).await {
                    break format!("read failed: {e}");
                }
            }
            Ok(data.freeze())
        };
        match inner.complete(generation, handle, result) {
            Expect::Reply(_) => {}
            Expect::Stale => return,
            Expect::Unknown => break format!("reply to unknown handle {handle}"),
        }
    };
    if let Some(inner) = weak.upgrade() {
        inner.lost(generation, &why);
    }
}
fn errno_error(cmd: Command, offset: u64, len: u32, errno: u32) -> BlockError {
    if errno == ENOSPC {
        return BlockError::NoSpace;
    }
    let op = match cmd {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "discard",
        Command::WriteZeroes => "write-zeroes",
        Command::Disconnect => "disconnect",
    };
    BlockError::io(
        op,
        offset,
        u64::from(len),
        io::Error::from_raw_os_error(errno as i32),
    )
}

#[async_trait]
impl BlockDev for NbdDev {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> basalt_blockdev::Result<Bytes> {
        check_range(&self.geometry, offset, len as u64)?;
        let chunk = self.max_chunk();
        if len as u64 <= chunk {
            return self
                .request(Command::Read, 0, offset, len as u32, None)
                .await;
        }
        let mut out = BytesMut::with_capacity(len);
        let mut done = 0u64;
        while done < len as u64 {
            let n = chunk.min(len as u64 - done);
            let part = self
                .request(Command::Read, 0, offset + done, n as u32, None)
                .await?;
            out.extend_from_slice(&part);
            done += n;
        }
        Ok(out.freeze())
    }

    async fn write(
        &self,
        offset: u64,
        data: Bytes,
        flags: WriteFlags,
    ) -> basalt_blockdev::Result<()> {
        check_range(&self.geometry, offset, data.len() as u64)?;
        if self.geometry.capabilities.read_only {
            return Err(BlockError::ReadOnly);
        }
        let fua = flags.fua && self.inner.info.flags & wire::TF_SEND_FUA != 0;
        let chunk = self.max_chunk() as usize;
        let mut done = 0;
        while done < data.len() {
            let n = chunk.min(data.len() - done);
            self.request(
                Command::Write,
                if fua { wire::CMD_FLAG_FUA } else { 0 },
                offset + done as u64,
                n as u32,
                Some(data.slice(done..done + n)),
            )
            .await?;
            done += n;
        }
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> basalt_blockdev::Result<()> {
        if self.inner.info.flags & wire::TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(Command::Flush, 0, 0, 0, None)
            .await
            .map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64) -> basalt_blockdev::Result<()> {
        check_range(&self.geometry, offset, len)?;
        if !self.geometry.capabilities.discard {
            return Err(BlockError::Unsupported("the NBD server does not take TRIM"));
        }
        let chunk = u64::from(u32::MAX) / u64::from(self.geometry.block_size)
            * u64::from(self.geometry.block_size);
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            self.request(Command::Trim, 0, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> basalt_blockdev::Result<()> {
        check_range(&self.geometry, offset, len)?;
        if self.geometry.capabilities.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.inner.info.flags & wire::TF_SEND_WRITE_ZEROES != 0 {
            let mut f = if flags.may_unmap {
                0
            } else {
                wire::CMD_FLAG_NO_HOLE
            };
            if flags.fast_only {
                if self.inner.info.flags & wire::TF_SEND_FAST_ZERO == 0 {
                    return Err(BlockError::Unsupported("the NBD server has no fast zero"));
                }
                f |= wire::CMD_FLAG_FAST_ZERO;
            }
            let chunk = u64::from(u32::MAX) / u64::from(self.geometry.block_size)
                * u64::from(self.geometry.block_size);
            let mut done = 0;
            while done < len {
                let n = chunk.min(len - done);
                self.request(Command::WriteZeroes, f, offset + done, n as u32, None)
                    .await?;
                done += n;
            }
            return Ok(());
        }
        if flags.fast_only {
            return Err(BlockError::Unsupported(
                "the NBD server has no write-zeroes",
            ));
        }
        let chunk = self.max_chunk();
        let zeroes = Bytes::from(vec![0u8; chunk.min(len) as usize]);
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            self.write(
                offset + done,
                zeroes.slice(..n as usize),
                WriteFlags::default(),
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        _flags: WriteFlags,
    ) -> basalt_blockdev::Result<CompareOutcome> {
        check_compare_and_write(&self.geometry, offset, &compare, &data)?;
        Err(BlockError::Unsupported("NBD has no compare-and-write"))
    }
}

impl Drop for NbdDev {
    fn drop(&mut self) {
        // Best effort NBD_CMD_DISC; the server also copes with a plain close.
        if let Ok(mut guard) = self.inner.writer.try_lock() {
            let Some((_, w)) = guard.as_mut() else {
                return;
            };
            let h = wire::encode_request(Command::Disconnect, 0, 0, 0, 0);
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let _ = std::pin::Pin::new(w).poll_write(&mut cx, &h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            NbdAddress::parse("nbd+unix:///lun0?socket=/run/b.sock").expect("unix"),
            NbdAddress::Unix {
                socket: "/run/b.sock".into(),
                export: "lun0".into()
            }
        );
        assert_eq!(
            NbdAddress::parse("nbd://127.0.0.1:10900/x").expect("tcp"),
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10900,
                export: "x".into()
            }
        );
        assert_eq!(
            NbdAddress::parse("nbd://host").expect("tcp"),
            NbdAddress::Tcp {
                host: "host".into(),
                port: 10809,
                export: String::new()
            }
        );
        for bad in ["nbd+unix:///x", "nbd://", "file:///x", "nbd://h:notaport/x"] {
            assert!(NbdAddress::parse(bad).is_err(), "{bad}");
        }
        let a = NbdAddress::parse("nbd+unix:///e?socket=/s").expect("unix");
        assert_eq!(NbdAddress::parse(&a.to_uri()).expect("again"), a);
    }
}

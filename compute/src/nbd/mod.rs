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

pub mod wire;

use async_trait::async_trait;
use basalt_blockdev::{
    check_compare_and_write, check_range, BlockDev, BlockError, Capabilities, CompareOutcome,
    Geometry, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
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

struct Pending {
    read_len: usize,
    done: oneshot::Sender<Result<Bytes, u32>>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
}

impl Shared {
    fn fail_all(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Dropping the senders fails every waiter with "connection lost".
        p.clear();
    }
}

/// A block device on an NBD export. See the [module docs](self).
pub struct NbdDev {
    addr: NbdAddress,
    info: ExportInfo,
    geometry: Geometry,
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    next_handle: AtomicU64,
}

impl std::fmt::Debug for NbdDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDev")
            .field("addr", &self.addr)
            .field("info", &self.info)
            .finish()
    }
}

/// NBD errno values (the protocol fixes them to Linux's numbers).
const ENOSPC: u32 = 28;

impl NbdDev {
    /// Connects, negotiates, and starts the reply reader on the current tokio runtime.
    /// The logical block size is the server's minimum block size, at least 512.
    pub async fn connect(addr: &NbdAddress) -> Result<Self, NbdError> {
        let (mut reader, mut writer): (Reader, Writer) = match addr {
            NbdAddress::Tcp { host, port, .. } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(read_replies(reader, shared.clone()));
        Ok(NbdDev {
            addr: addr.clone(),
            info,
            geometry,
            writer: tokio::sync::Mutex::new(writer),
            shared,
            next_handle: AtomicU64::new(1),
        })
    }

    /// What the server said about the export.
    pub fn export_info(&self) -> ExportInfo {
        self.info
    }

    fn offline(&self) -> BlockError {
        BlockError::Offline(format!("NBD connection to {} lost", self.addr.to_uri()))
    }

    async fn request(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<Bytes, BlockError> {
        if self.shared.dead.load(Ordering::SeqCst) {
            return Err(self.offline());
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == Command::Read {
            len as usize
        } else {
            0
        };
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle, Pending { read_len, done: tx });
        let header = wire::encode_request(cmd, flags, handle, offset, len);
        {
            let mut w = self.writer.lock().await;
            let mut res = w.write_all(&header).await;
            if let (Ok(()), Some(d)) = (&res, data) {
                res = w.write_all(d).await;
            }
            if res.is_ok() {
                res = w.flush().await;
            }
            if res.is_err() {
                self.shared.fail_all();
                return Err(self.offline());
            }
        }
        match rx.await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(errno)) => Err(errno_error(cmd, offset, len, errno)),
            Err(_) => Err(self.offline()),
        }
    }

    fn max_chunk(&self) -> u64 {
        u64::from(self.geometry.max_io_bytes.max(self.geometry.block_size))
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

async fn read_replies(mut reader: Reader, shared: Arc<Shared>) {
    let mut header = [0u8; 16];
    loop {
        if reader.read_exact(&mut header).await.is_err() {
            break;
        }
        let Ok((errno, handle)) = wire::parse_simple_reply(&header) else {
            break;
        };
        let pending = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&handle);
        let Some(p) = pending else {
            // A reply to nothing we asked: the stream cannot be trusted any more.
            break;
        };
        if errno != 0 {
            let _ = p.done.send(Err(errno));
            continue;
        }
        let mut data = BytesMut::zeroed(p.read_len);
        if p.read_len > 0 && reader.read_exact(&mut data).await.is_err() {
            break;
        }
        let _ = p.done.send(Ok(data.freeze()));
    }
    shared.fail_all();
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
        let fua = flags.fua && self.info.flags & wire::TF_SEND_FUA != 0;
        let chunk = self.max_chunk() as usize;
        for (i, part) in data.chunks(chunk).enumerate() {
            let off = offset + (i * chunk) as u64;
            self.request(
                Command::Write,
                if fua { wire::CMD_FLAG_FUA } else { 0 },
                off,
                part.len() as u32,
                Some(part),
            )
            .await?;
        }
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> basalt_blockdev::Result<()> {
        if self.info.flags & wire::TF_SEND_FLUSH == 0 {
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
        if self.info.flags & wire::TF_SEND_WRITE_ZEROES != 0 {
            let mut f = if flags.may_unmap {
                0
            } else {
                wire::CMD_FLAG_NO_HOLE
            };
            if flags.fast_only {
                if self.info.flags & wire::TF_SEND_FAST_ZERO == 0 {
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
        if let Ok(mut w) = self.writer.try_lock() {
            let h = wire::encode_request(Command::Disconnect, 0, 0, 0, 0);
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let _ = std::pin::Pin::new(&mut *w).poll_write(&mut cx, &h);
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

//! A block device reached over iSCSI: an initiator built on Debian's libiscsi, so a host
//! can use a LUN exported by another host (the lock manager's shared LUN, remote RAID
//! members).
//!
//! [`IscsiDev::connect`] opens `iscsi://[user[%password]@]host[:port]/iqn/lun` with an
//! initiator name and optional CHAP, reads READ CAPACITY(16) and the Block Limits (B0)
//! and Logical Block Provisioning (B2) VPD pages, and implements [`BlockDev`]:
//!
//! | BlockDev | SCSI |
//! |---|---|
//! | read / write | READ(16) / WRITE(16) (FUA bit for `WriteFlags::fua`) |
//! | flush | SYNCHRONIZE CACHE(16) |
//! | discard | UNMAP (when B2 says LBPU) |
//! | write_zeroes | WRITE SAME(16), with UNMAP when allowed and B2 says LBPWS + LBPRZ; zero buffers when WRITE SAME is rejected |
//! | compare_and_write | COMPARE AND WRITE; MISCOMPARE sense → `Miscompare` at the INFORMATION offset |
//!
//! # Threading
//! libiscsi is single-threaded and callback-driven. One driver thread per device owns
//! the context and runs its event loop (poll on the session socket plus an eventfd);
//! requests reach it through a channel and complete through oneshot channels, so no
//! tokio worker ever blocks (see the `driver` module). On connection loss the thread fails the
//! outstanding requests with `Offline("connection lost ...")`, reconnects in the
//! background, and fails new requests at once with an `Offline` error naming the
//! reconnect attempt until it is back.
//!
//! The FFI layer (module `ffi`, `src/ffi.rs`) is written by hand, not generated with bindgen.

#![deny(missing_docs)]

mod driver;
mod ffi;
pub mod sense;
pub mod url;

pub use url::{IscsiUrl, UrlError};

use async_trait::async_trait;
use basalt_blockdev::{
    check_range, BlockDev, BlockError, Capabilities, CompareOutcome, Geometry, Result, WriteFlags,
    ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use driver::{Cmd, ConnParams, Failure, Req};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Options of [`IscsiDev::connect`].
#[derive(Debug, Clone)]
pub struct IscsiOptions {
    /// This initiator's IQN.
    pub initiator: String,
    /// CHAP user (overrides the URL's).
    pub chap_user: Option<String>,
    /// CHAP password (overrides the URL's).
    pub chap_password: Option<String>,
    /// A request without an answer for this long resets the session (default 30 s).
    pub io_timeout: Duration,
    /// Pause between reconnect attempts (default 1 s).
    pub reconnect_interval: Duration,
}

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            initiator: "iqn.2026-11.org.basalt:initiator".into(),
            chap_user: None,
            chap_password: None,
            io_timeout: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(1),
        }
    }
}

/// Why [`IscsiDev::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IscsiError {
    /// Bad URL.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A string with a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// Login or connection failed.
    #[error("cannot connect to {url}: {why}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// libiscsi's message.
        why: String,
    },
    /// Probing the LUN failed.
    #[error("probing {url}: {source}")]
    Probe {
        /// The URL.
        url: String,
        /// The error.
        #[source]
        source: BlockError,
    },
    /// The driver thread could not start.
    #[error("starting the iSCSI driver thread: {0}")]
    Thread(std::io::Error),
}

/// What the target said it can do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetLimits {
    /// MAXIMUM COMPARE AND WRITE LENGTH, blocks (0: CAW not supported or not reported).
    pub max_compare_and_write_blocks: u8,
    /// MAXIMUM TRANSFER LENGTH, blocks (0: none reported).
    pub max_transfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH, blocks.
    pub optimal_transfer_blocks: u32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_blocks: u32,
    /// MAXIMUM WRITE SAME LENGTH, blocks.
    pub max_write_same_blocks: u64,
    /// Thin provisioning enabled (READ CAPACITY LBPME).
    pub lbpme: bool,
    /// Unmapped blocks read zero (LBPRZ).
    pub lbprz: bool,
    /// UNMAP supported (B2 LBPU).
    pub lbpu: bool,
    /// WRITE SAME(16) with UNMAP supported (B2 LBPWS).
    pub lbpws: bool,
}

struct Shared {
    tx: Mutex<mpsc::Sender<Req>>,
    wake: OwnedFd,
}

/// A LUN reached over iSCSI. See the [crate docs](crate).
pub struct IscsiDev {
    shared: Arc<Shared>,
    geometry: Geometry,
    limits: TargetLimits,
    lun_bytes_per_block: u32,
    write_same_ok: AtomicBool,
    name: String,
}

/// Largest single transfer issued when the target reports no limit.
const DEFAULT_MAX_XFER: u32 = 4 << 20;

impl IscsiDev {
    /// Connects and logs in to `url` (see [`IscsiUrl`]), then probes the LUN. The login
    /// runs on the driver thread, never on the caller's runtime worker.
    pub async fn connect(
        url: &str,
        opts: &IscsiOptions,
    ) -> std::result::Result<IscsiDev, IscsiError> {
        let u = IscsiUrl::parse(url)?;
        let name = format!("iscsi://{}/{}/{}", u.portal, u.target, u.lun);
        let cs = |s: &str, what| CString::new(s).map_err(|_| IscsiError::Nul(what));
        let user = opts.chap_user.clone().or(u.user.clone());
        let password = opts.chap_password.clone().or(u.password.clone());
        let mut params = ConnParams {
            initiator: cs(&opts.initiator, "initiator name")?,
            target: cs(&u.target, "target name")?,
            portal: cs(&u.portal, "portal")?,
            lun: i32::from(u.lun),
            user: user.as_deref().map(|s| cs(s, "CHAP user")).transpose()?,
            password: password
                .as_deref()
                .map(|s| cs(s, "CHAP password"))
                .transpose()?,
            block_size: 512,
            io_timeout: opts.io_timeout,
            reconnect_interval: opts.reconnect_interval,
            name: name.clone(),
        };
        // First a probe session to learn the block size (libiscsi wants it per command),
        // then the real one with it.
        let probe = Self::start(params.clone())
            .await
            .map_err(|why| IscsiError::Connect {
                url: name.clone(),
                why,
            })?;
        let rc = call(&probe, Cmd::ReadCapacity16)
            .await
            .map_err(|f| IscsiError::Probe {
                url: name.clone(),
                source: failure_to_error(&name, "read_capacity", 0, 0, f),
            })?;
        if rc.len() < 32 {
            return Err(IscsiError::Probe {
                url: name.clone(),
                source: BlockError::InvalidRequest("short READ CAPACITY(16) data".into()),
            });
        }
        let last_lba = u64::from_be_bytes(rc[0..8].try_into().unwrap_or([0; 8]));
        let block_size = u32::from_be_bytes(rc[8..12].try_into().unwrap_or([0; 4]));
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(IscsiError::Probe {
                url: name.clone(),
                source: BlockError::InvalidRequest(format!("block size {block_size}")),
            });
        }
        let phys_exp = u32::from(rc[13] & 0x0f);
        let mut limits = TargetLimits {
            lbpme: rc[14] & 0x80 != 0,
            lbprz: rc[14] & 0x40 != 0,
            ..TargetLimits::default()
        };
        if let Ok(b0) = call(&probe, Cmd::Inquiry { page: 0xb0 }).await {
            if b0.len() >= 16 {
                limits.max_compare_and_write_blocks = b0[5];
                limits.max_transfer_blocks =
                    u32::from_be_bytes(b0[8..12].try_into().unwrap_or([0; 4]));
                limits.optimal_transfer_blocks =
                    u32::from_be_bytes(b0[12..16].try_into().unwrap_or([0; 4]));
            }
            if b0.len() >= 44 {
                limits.max_unmap_blocks =
                    u32::from_be_bytes(b0[20..24].try_into().unwrap_or([0; 4]));
                limits.max_write_same_blocks =
                    u64::from_be_bytes(b0[36..44].try_into().unwrap_or([0; 8]));
            }
        }
        if limits.lbpme {
            if let Ok(b2) = call(&probe, Cmd::Inquiry { page: 0xb2 }).await {
                if b2.len() >= 6 {
                    limits.lbpu = b2[5] & 0x80 != 0;
                    limits.lbpws = b2[5] & 0x40 != 0;
                    limits.lbprz |= b2[5] & 0x04 != 0;
                }
            }
        }
        drop(probe);
        params.block_size = block_size;
        let shared = Self::start(params)
            .await
            .map_err(|why| IscsiError::Connect {
                url: name.clone(),
                why,
            })?;
        let max_xfer_blocks = match limits.max_transfer_blocks {
            0 => DEFAULT_MAX_XFER / block_size,
            n => n.min(DEFAULT_MAX_XFER / block_size).max(1),
        };
        let geometry = Geometry {
            block_size,
            physical_block_size: block_size << phys_exp.min(8),
            blocks: last_lba.saturating_add(1),
            optimal_io_size: limits.optimal_transfer_blocks.saturating_mul(block_size),
            max_io_bytes: max_xfer_blocks * block_size,
            capabilities: Capabilities {
                discard: limits.lbpme && limits.lbpu,
                discard_zeroes: limits.lbpme && limits.lbpu && limits.lbprz,
                fast_zeroes: limits.lbpme && limits.lbpws && limits.lbprz,
                volatile_cache: true,
                read_only: false,
            },
        };
        Ok(IscsiDev {
            shared,
            geometry,
            limits,
            lun_bytes_per_block: block_size,
            write_same_ok: AtomicBool::new(true),
            name,
        })
    }

    async fn start(params: ConnParams) -> std::result::Result<Arc<Shared>, String> {
        let wake = driver::eventfd().map_err(|e| e.to_string())?;
        let thread_wake = wake.try_clone().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("basalt-iscsi".into())
            .spawn(move || driver::run(params, rx, thread_wake, ready_tx))
            .map_err(|e| e.to_string())?;
        ready_rx
            .await
            .map_err(|_| "driver thread died".to_string())??;
        Ok(Arc::new(Shared {
            tx: Mutex::new(tx),
            wake,
        }))
    }

    /// What the target reported.
    pub fn limits(&self) -> TargetLimits {
        self.limits
    }

    /// `iscsi://portal/target/lun`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, f: Failure) -> BlockError {
        failure_to_error(&self.name, op, offset, len, f)
    }

    fn max_blocks(&self) -> u64 {
        u64::from(self.geometry.max_io_bytes / self.lun_bytes_per_block).max(1)
    }
}

async fn call(shared: &Shared, cmd: Cmd) -> std::result::Result<Bytes, Failure> {
    let (tx, rx) = oneshot::channel();
    {
        let s = shared
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.send(Req { cmd, tx }).is_err() {
            return Err(Failure::Offline("driver thread gone".into()));
        }
    }
    driver::wake(&shared.wake);
    rx.await
        .unwrap_or(Err(Failure::Offline("driver thread gone".into())))
}

fn failure_to_error(name: &str, op: &'static str, offset: u64, len: u64, f: Failure) -> BlockError {
    use std::io::{Error, ErrorKind};
    match f {
        Failure::Offline(m) => BlockError::Offline(if m.starts_with(name) {
            m
        } else {
            format!("{name}: {m}")
        }),
        Failure::Timeout => {
            BlockError::io(op, offset, len, Error::from_raw_os_error(libc::ETIMEDOUT))
        }
        Failure::Transport(m) => {
            BlockError::io(op, offset, len, Error::other(format!("{name}: {m}")))
        }
        Failure::Check(s) => match sense::to_result(op, offset, len, s) {
            Err(e) => e,
            Ok(_) => BlockError::io(op, offset, len, Error::other("unexpected MISCOMPARE")),
        },
        Failure::Status(st) => {
            let kind = match st {
                ffi::SCSI_STATUS_RESERVATION_CONFLICT => ErrorKind::PermissionDenied,
                ffi::SCSI_STATUS_BUSY | ffi::SCSI_STATUS_TASK_SET_FULL => ErrorKind::WouldBlock,
                _ => ErrorKind::Other,
            };
            BlockError::io(
                op,
                offset,
                len,
                Error::new(kind, format!("SCSI status {st:#x}")),
            )
        }
    }
}

#[async_trait]
impl BlockDev for IscsiDev {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.geometry, offset, len as u64)?;
        let bs = u64::from(self.lun_bytes_per_block);
        let mut out = BytesMut::with_capacity(len);
        let mut lba = offset / bs;
        let mut left = len as u64 / bs;
        while left > 0 {
            let n = left.min(self.max_blocks());
            let bytes = (n * bs) as u32;
            let d = call(&self.shared, Cmd::Read { lba, len: bytes })
                .await
                .map_err(|f| self.err("read", lba * bs, n * bs, f))?;
            if d.len() != bytes as usize {
                return Err(BlockError::io(
                    "read",
                    lba * bs,
                    n * bs,
                    std::io::Error::other(format!("short read: {} of {bytes} bytes", d.len())),
                ));
            }
            out.extend_from_slice(&d);
            lba += n;
            left -= n;
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_range(&self.geometry, offset, data.len() as u64)?;
        let bs = u64::from(self.lun_bytes_per_block);
        let max = (self.max_blocks() * bs) as usize;
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(max);
            let lba = (offset + at as u64) / bs;
            call(
                &self.shared,
                Cmd::Write {
                    lba,
                    data: data.slice(at..at + n),
                    fua: flags.fua,
                },
            )
            .await
            .map_err(|f| self.err("write", lba * bs, n as u64, f))?;
            at += n;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        call(&self.shared, Cmd::Sync)
            .await
            .map(|_| ())
            .map_err(|f| self.err("flush", 0, 0, f))
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        if !self.geometry.capabilities.discard {
            return Err(BlockError::Unsupported(
                "target does not report UNMAP support",
            ));
        }
        let bs = u64::from(self.lun_bytes_per_block);
        let max = match self.limits.max_unmap_blocks {
            0 | u32::MAX => u64::from(u32::MAX),
            n => u64::from(n),
        };
        let mut lba = offset / bs;
        let mut left = len / bs;
        while left > 0 {
            let n = left.min(max);
            call(
                &self.shared,
                Cmd::Unmap {
                    lba,
                    blocks: n as u32,
                },
            )
            .await
            .map_err(|f| self.err("unmap", lba * bs, n * bs, f))?;
            lba += n;
            left -= n;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        let bs = u64::from(self.lun_bytes_per_block);
        let unmap = flags.may_unmap && self.geometry.capabilities.fast_zeroes;
        if self.write_same_ok.load(Ordering::Relaxed) {
            let max = match self.limits.max_write_same_blocks {
                0 => 1 << 16,
                n => n.min(u64::from(u32::MAX)),
            };
            let block = Bytes::from(vec![0u8; bs as usize]);
            let mut lba = offset / bs;
            let mut left = len / bs;
            let mut failed = None;
            while left > 0 {
                let n = left.min(max);
                let r = call(
                    &self.shared,
                    Cmd::WriteSame {
                        lba,
                        blocks: n as u32,
                        unmap,
                        block: block.clone(),
                    },
                )
                .await
                .map_err(|f| self.err("write_same", lba * bs, n * bs, f));
                match r {
                    Ok(_) => {
                        lba += n;
                        left -= n;
                    }
                    Err(BlockError::Unsupported(_)) => {
                        self.write_same_ok.store(false, Ordering::Relaxed);
                        failed = Some(lba * bs);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match failed {
                None => return Ok(()),
                Some(at) => return self.zero_by_writes(at, offset + len - at, flags).await,
            }
        }
        self.zero_by_writes(offset, len, flags).await
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        if compare.len() != data.len() {
            return Err(BlockError::InvalidRequest(format!(
                "compare ({}) and write ({}) lengths differ",
                compare.len(),
                data.len()
            )));
        }
        check_range(&self.geometry, offset, data.len() as u64)?;
        let bs = u64::from(self.lun_bytes_per_block);
        let blocks = data.len() as u64 / bs;
        let max = u64::from(self.limits.max_compare_and_write_blocks);
        if max > 0 && blocks > max {
            return Err(BlockError::InvalidRequest(format!(
                "compare-and-write of {blocks} blocks exceeds the target's maximum of {max}"
            )));
        }
        let mut buf = BytesMut::with_capacity(data.len() * 2);
        buf.extend_from_slice(&compare);
        buf.extend_from_slice(&data);
        match call(
            &self.shared,
            Cmd::Caw {
                lba: offset / bs,
                data: buf.freeze(),
                fua: flags.fua,
            },
        )
        .await
        {
            Ok(_) => Ok(CompareOutcome::Written),
            Err(Failure::Check(s)) => {
                sense::to_result("compare_and_write", offset, data.len() as u64, s)
            }
            Err(f) => Err(self.err("compare_and_write", offset, data.len() as u64, f)),
        }
    }
}

impl IscsiDev {
    async fn zero_by_writes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast_only {
            return Err(BlockError::Unsupported("target has no WRITE SAME"));
        }
        let chunk = u64::from(self.geometry.max_io_bytes).min(1 << 20);
        let zeroes = Bytes::from(vec![0u8; chunk as usize]);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(chunk);
            self.write(at, zeroes.slice(..n as usize), WriteFlags::default())
                .await?;
            at += n;
        }
        Ok(())
    }
}

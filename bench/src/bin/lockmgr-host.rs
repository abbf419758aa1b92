//! `lockmgr-host`: one host of the multi-process lock manager test
//! (`bench/lockmgr-multihost.sh`) and the killed holder of `lockmgr-bench`'s takeover
//! measurement. It joins the lockspace on a shared LUN (its own iSCSI session), then
//! either holds one lock forever (`--hold NAME`, printing every acknowledged heartbeat)
//! or runs the exclusion oracle: acquire a resource, stamp the lock's value block (a
//! compare-and-write of the lock record, refused at the target once this host's holder
//! entry is gone) and the resource's data sector (a plain write, issued only with more
//! than its timeout left on the lease), hold, re-read both, release. Every line it
//! prints is a JSON event (`joined`, `acquired`, `violation`, `late`, `lost`, `done`,
//! `heartbeat`), `t` being this host's `CLOCK_BOOTTIME` in seconds.
//!
//! A foreign stamp found while the host's fence is still valid is a `violation`. A plain
//! write that completed later than the lease allows (its process was stopped between
//! the lease check and the wire, outside the protocol's timing model: DESIGN.md,
//! "Fencing") or whose completion is unknown is reported as `late` with its stamp, so
//! the driver can tell such a landing from a protocol failure.
//!
//! The device must give every process an atomic COMPARE AND WRITE: an `iscsi://` URL
//! of Basalt's iSCSI target. A file works for a single process only (`--allow-file`),
//! since io_uring CAW is atomic only inside one process.

use basalt_blockdev::{BlockDev, SharedBlockDev, UringFile, UringOptions, WriteFlags};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::{
    BootClock, Clock, FormatOptions, HostState, JoinOptions, LockError, LockMode, Lockspace,
    ResourceId,
};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One lock-manager host process.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// iscsi:// URL (or a file path with --allow-file).
    #[arg(long)]
    device: String,
    /// Host number (1..=255): the host id is derived from it.
    #[arg(long)]
    host: u8,
    /// Format the lockspace first (run once, by one process).
    #[arg(long)]
    format: bool,
    /// Lockspace offset in bytes.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Byte offset of the oracle data sectors (one per resource), past the lockspace.
    #[arg(long, default_value_t = 16 << 20)]
    oracle_offset: u64,
    /// Number of resources to contend on.
    #[arg(long, default_value_t = 2)]
    resources: u32,
    /// Acquisitions before exiting (0: forever).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Hold time per acquisition, milliseconds.
    #[arg(long, default_value_t = 2)]
    hold_ms: u64,
    /// Acquire this resource once and hold it until killed, reporting heartbeats.
    #[arg(long)]
    hold: Option<String>,
    /// Heartbeat period when formatting, ms.
    #[arg(long, default_value_t = 3000)]
    heartbeat_ms: u64,
    /// Dead-host timeout when formatting, ms.
    #[arg(long, default_value_t = 9000)]
    dead_after_ms: u64,
    /// Allow a file device (single process only).
    #[arg(long)]
    allow_file: bool,
}

fn now() -> f64 {
    BootClock.now().as_secs_f64()
}

fn event(mut v: serde_json::Value) {
    v["t"] = json!(now());
    println!("{v}");
}

const STAMP: usize = 24;

fn stamp(host: u8, generation: u32, seq: u64, nonce: u64) -> [u8; STAMP] {
    let mut s = [0u8; STAMP];
    s[0] = host;
    s[1..5].copy_from_slice(&generation.to_le_bytes());
    s[8..16].copy_from_slice(&seq.to_le_bytes());
    s[16..24].copy_from_slice(&nonce.to_le_bytes());
    s
}

fn hexs(b: &[u8]) -> String {
    b.iter().take(STAMP).map(|x| format!("{x:02x}")).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let a = Args::parse();
    let dev: SharedBlockDev = if a.device.starts_with("iscsi://") {
        let o = IscsiOptions {
            initiator: format!("iqn.2026-11.org.basalt:lockmgr-host{}", a.host),
            io_timeout: Duration::from_millis(a.heartbeat_ms.max(1000)),
            reconnect_interval: Duration::from_millis(200),
            ..IscsiOptions::default()
        };
        Arc::new(IscsiDev::connect(&a.device, &o).await?)
    } else if a.allow_file {
        Arc::new(UringFile::open(
            std::path::Path::new(&a.device),
            &UringOptions::default(),
        )?)
    } else {
        return Err("a file gives no cross-process CAW atomicity; use iscsi:// (or --allow-file for one process)".into());
    };
    if a.format {
        let o = FormatOptions {
            heartbeat: Duration::from_millis(a.heartbeat_ms),
            dead_after: Duration::from_millis(a.dead_after_ms),
            max_locks: 256,
            force: true,
            ..FormatOptions::default()
        };
        Lockspace::format(&dev, a.offset, &o).await?;
        event(json!({"event": "formatted", "host": a.host}));
    }
    let ls = Lockspace::join(
        dev.clone(),
        a.offset,
        JoinOptions::new([a.host; 16], format!("host-{}", a.host)),
    )
    .await?;
    event(
        json!({"event": "joined", "host": a.host, "slot": ls.slot(), "generation": ls.generation()}),
    );
    if let Some(name) = &a.hold {
        let res = ResourceId::from_name(name).ok_or("resource name longer than 32 bytes")?;
        let g = ls.lock(res, LockMode::Exclusive).await?;
        event(json!({"event": "acquired", "host": a.host, "res": name, "epoch": g.epoch()}));
        let mut beats = ls.metrics().heartbeats_total;
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let m = ls.metrics().heartbeats_total;
            if m != beats {
                beats = m;
                let left = ls.status().lease_remaining.as_secs_f64();
                event(json!({"event": "heartbeat", "host": a.host, "n": m, "lease_left_s": left}));
            }
            if let HostState::Lost(r) = ls.state() {
                event(json!({"event": "lost", "host": a.host, "reason": format!("{r:?}")}));
                return Ok(());
            }
        }
    }
    let bs = dev.geometry().block_size as usize;
    let io_timeout = ls.timing().heartbeat / 2;
    let margin = ls.timing().heartbeat;
    // Tells this process's stamps from an earlier incarnation's.
    let nonce = (u64::from(std::process::id()) << 32) ^ (BootClock.now().as_nanos() as u64);
    let mut seq = 0u64;
    let mut rng = u64::from(a.host).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        if a.count > 0 && seq >= a.count {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let r = (rng % u64::from(a.resources.max(1))) as u32;
        let res = ResourceId::from_name(&format!("res{r}")).ok_or("name")?;
        let g = match ls.lock(res, LockMode::Exclusive).await {
            Ok(g) => g,
            Err(e) => {
                event(json!({"event": "lost", "host": a.host, "error": e.to_string()}));
                return Ok(());
            }
        };
        seq += 1;
        let st = stamp(a.host, ls.generation(), seq, nonce);
        event(
            json!({"event": "acquired", "host": a.host, "res": r, "seq": seq, "epoch": g.epoch()}),
        );
        // The value block: CAW-guarded by this host's holder entry.
        let wrote_value = match g.write_payload(&st).await {
            Ok(()) => true,
            Err(LockError::Fenced(why)) => {
                event(
                    json!({"event": "refused", "host": a.host, "what": "value", "why": format!("{why:?}")}),
                );
                false
            }
            Err(e) => {
                event(
                    json!({"event": "error", "host": a.host, "what": "value", "error": e.to_string()}),
                );
                false
            }
        };
        // The data sector: a plain write with more than its timeout left on the lease.
        let off = a.oracle_offset + u64::from(r) * bs as u64;
        let mut wrote_data = false;
        if let Ok(left) = g.fence().check_for(io_timeout) {
            let expiry = BootClock.now() + left;
            let mut blk = vec![0u8; bs];
            blk[..STAMP].copy_from_slice(&st);
            let w = dev.write(off, Bytes::from(blk), WriteFlags { fua: true });
            let ok = matches!(tokio::time::timeout(io_timeout, w).await, Ok(Ok(())));
            if !ok || BootClock.now() >= expiry + margin {
                event(json!({"event": "late", "host": a.host, "stamp": hexs(&st), "ok": ok}));
            }
            wrote_data = ok;
        }
        tokio::time::sleep(Duration::from_millis(a.hold_ms)).await;
        let p = g.read_payload().await;
        let d = dev.read(off, bs).await;
        if g.fence().check().is_ok() {
            if let (true, Ok(p)) = (wrote_value, &p) {
                if p[..STAMP] != st {
                    event(
                        json!({"event": "violation", "host": a.host, "kind": "value", "res": r, "seq": seq, "found": hexs(p)}),
                    );
                }
            }
            if let (true, Ok(d)) = (wrote_data, &d) {
                if d[..STAMP] != st {
                    event(
                        json!({"event": "violation", "host": a.host, "kind": "data", "res": r, "seq": seq, "found": hexs(d)}),
                    );
                }
            }
        }
        if let Err(e) = g.unlock().await {
            event(json!({"event": "lost", "host": a.host, "error": e.to_string()}));
            return Ok(());
        }
        if let HostState::Lost(r) = ls.state() {
            event(json!({"event": "lost", "host": a.host, "reason": format!("{r:?}")}));
            return Ok(());
        }
    }
    event(json!({"event": "done", "host": a.host, "acquisitions": seq}));
    ls.leave().await?;
    Ok(())
}

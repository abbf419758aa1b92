//! `lockmgr-host`: one host of the multi-process lock manager test
//! (`bench/lockmgr-multihost.sh`). It joins the lockspace on a shared device, then
//! loops: acquire a resource, stamp the resource's oracle sector with (host, sequence),
//! hold for a while, check the stamp is still its own, release. Every line it prints is
//! a JSON event (`joined`, `acquired`, `violation`, `lost`, `done`), so the driver can
//! SIGSTOP / SIGKILL hosts and judge the run from the logs and the oracle sectors.
//!
//! The device must give every process an atomic COMPARE AND WRITE: an `iscsi://` URL
//! of a target that implements it (Basalt's own, once it exists). A file works for a
//! single process only (`--allow-file`), since io_uring CAW is atomic only inside one
//! process.

use basalt_blockdev::{BlockDev, SharedBlockDev, UringFile, UringOptions, WriteFlags};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::{FormatOptions, HostState, JoinOptions, LockMode, Lockspace, ResourceId};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Byte offset of the oracle sectors (one per resource), past the lockspace.
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

fn event(v: serde_json::Value) {
    println!("{v}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let a = Args::parse();
    let dev: SharedBlockDev = if a.device.starts_with("iscsi://") {
        let o = IscsiOptions {
            initiator: format!("iqn.2026-11.org.basalt:lockmgr-host{}", a.host),
            io_timeout: Duration::from_secs(2),
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
    let bs = dev.geometry().block_size as usize;
    let mut seq = 0u64;
    let mut rng = u64::from(a.host).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let started = Instant::now();
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
        let off = a.oracle_offset + u64::from(r) * bs as u64;
        let mut stamp = vec![0u8; bs];
        stamp[0] = a.host;
        stamp[8..16].copy_from_slice(&seq.to_le_bytes());
        let stamp = Bytes::from(stamp);
        event(
            json!({"event": "acquired", "host": a.host, "res": r, "seq": seq, "epoch": g.epoch(), "t": started.elapsed().as_secs_f64()}),
        );
        if g.fence().check_for(Duration::from_secs(2)).is_ok() {
            dev.write(off, stamp.clone(), WriteFlags { fua: true })
                .await?;
            tokio::time::sleep(Duration::from_millis(a.hold_ms)).await;
            let now = dev.read(off, bs).await?;
            if now != stamp {
                event(
                    json!({"event": "violation", "host": a.host, "res": r, "seq": seq, "found_host": now[0]}),
                );
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

//! Basalt's iSCSI target, in this test process, listening inside the hub namespace on
//! a file-backed LUN (io_uring): the shared LUN of every host. It runs on its own thread
//! and tokio runtime; the listening socket is created after the thread entered the hub
//! namespace, so it belongs there.

use crate::net;
use basalt_blockdev::{SharedBlockDev, UringFile, UringOptions};
use basalt_iscsi::{ConnConfig, IscsiConfig, IscsiServer, LunHandle, LunMapping, TargetConfig};
use basalt_scsi::LunIdentity;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The target's IQN.
pub const IQN: &str = "iqn.2026-11.org.basalt:lockmgr-multihost";

/// A running target; stopped on drop.
pub struct Target {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<String>>,
    /// The LUN's backing file lives here (removed on drop).
    _dir: tempfile::TempDir,
    /// `iscsi://…/0` as the hosts reach it.
    pub url: String,
}

impl Target {
    /// Starts a target in namespace `hub` with one LUN of `mib` MiB.
    pub fn start(hub: &str, mib: u64) -> Target {
        let dir =
            tempfile::tempdir_in(std::env::var("MH_LUN_DIR").unwrap_or("/tmp".into())).unwrap();
        let path = dir.path().join("shared-lun.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ns = format!("/var/run/netns/{hub}");
        let thread = std::thread::spawn(move || {
            net::enter(&ns);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mh-target")
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dev: SharedBlockDev =
                    Arc::new(UringFile::open(&path, &UringOptions::default()).unwrap());
                let mut units = HashMap::new();
                units.insert(
                    "shared".to_string(),
                    LunHandle {
                        dev,
                        identity: LunIdentity::new(0x10c4_3a9e_0000_0001),
                        pr_store: None,
                    },
                );
                let portal: SocketAddr = format!("{}:3260", net::TARGET_IP).parse().unwrap();
                let cfg = IscsiConfig {
                    targets: vec![TargetConfig {
                        iqn: IQN.into(),
                        portals: vec![portal],
                        tpgt: 1,
                        luns: vec![LunMapping {
                            lun: 0,
                            name: "shared".into(),
                        }],
                        acls: Vec::new(),
                        allow_any_initiator: true,
                        chap: None,
                    }],
                    discovery_chap: None,
                };
                let server = IscsiServer::start(cfg, units, ConnConfig::default())
                    .await
                    .unwrap();
                let _ = ready_tx.send(());
                let _ = stop_rx.await;
                let metrics = serde_json::to_string(&server.metrics()).unwrap_or_default();
                server.stop().await;
                metrics
            })
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the target did not start");
        Target {
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
            url: format!("iscsi://{}:3260/{IQN}/0", net::TARGET_IP),
        }
    }

    /// Stops the target and returns its counters (JSON).
    pub fn stop(&mut self) -> String {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

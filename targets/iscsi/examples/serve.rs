//! A stand-alone iSCSI target for manual tests and benchmarks:
//! `serve --portal 127.0.0.1:3260 --iqn iqn.2026-11.test:t --mem-mib 1024 \
//!        --initiator iqn.2026-11.test:init1 --initiator iqn.2026-11.test:init2`
//! or `--file /path/lun.img` (io_uring; O_DIRECT unless `--buffered`). LUN 1 is a read-only 64 MiB unit, LUN 2 a
//! 256 MiB unit with 4 KiB physical blocks (the conformance suite needs both shapes).
//! Runs until killed.

use basalt_blockdev::{BlockDev, DirectMode, MemDev, SharedBlockDev, UringFile, UringOptions};
use basalt_iscsi::{
    Acl, ConnConfig, IscsiConfig, IscsiServer, LunHandle, LunMapping, TargetConfig,
};
use basalt_scsi::LunIdentity;
use std::collections::HashMap;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mut portal = "127.0.0.1:3260".to_string();
    let mut iqn = "iqn.2026-11.test:basalt".to_string();
    let mut mem_mib = 0u64;
    let mut file = None;
    let mut inits = Vec::new();
    let mut threads = 2usize;
    let mut conn_cfg = ConnConfig::default();
    let mut phys = 512u32;
    let mut direct = DirectMode::Auto;
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--portal" => portal = v,
            "--iqn" => iqn = v,
            "--mem-mib" => mem_mib = v.parse()?,
            "--file" => file = Some(v),
            "--initiator" => inits.push(v),
            "--threads" => threads = v.parse()?,
            "--physical-block" => phys = v.parse()?,
            "--buffered" => {
                // Through the page cache, as tgt's rdwr backing store does.
                direct = DirectMode::Off;
                i -= 1;
            }
            "--no-immediate-data" => {
                conn_cfg.immediate_data = false;
                conn_cfg.allow_unsolicited = false;
                i -= 1;
            }
            _ => return Err(format!("unknown argument {}", args[i]).into()),
        }
        i += 2;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dev: SharedBlockDev = match file {
            Some(f) => Arc::new(UringFile::open(
                std::path::Path::new(&f),
                &UringOptions {
                    direct,
                    ..UringOptions::default()
                },
            )?),
            None => {
                let mut g = MemDev::new(mem_mib.max(64) * 2048, 512).geometry();
                g.physical_block_size = phys;
                Arc::new(MemDev::with_geometry(g))
            }
        };
        let ro: SharedBlockDev = Arc::new(MemDev::new(64 * 2048, 512));

        let mut units = HashMap::new();
        units.insert(
            "lun0".to_string(),
            LunHandle {
                dev,
                identity: LunIdentity::new(0x1234_5678_9abc_def0_1122_3344_5566_7788),
                pr_store: None,
            },
        );
        let mut g4 = MemDev::new(256 * 2048, 512).geometry();
        g4.physical_block_size = 4096;
        units.insert(
            "phys4k".to_string(),
            LunHandle {
                dev: Arc::new(MemDev::with_geometry(g4)),
                identity: LunIdentity::new(0x1234_5678_9abc_def0_1122_3344_5566_778a),
                pr_store: None,
            },
        );
        let mut ro_id = LunIdentity::new(0x1234_5678_9abc_def0_1122_3344_5566_7789);
        ro_id.read_only = true;
        units.insert(
            "ro".to_string(),
            LunHandle {
                dev: ro,
                identity: ro_id,
                pr_store: None,
            },
        );
        let cfg = IscsiConfig {
            targets: vec![TargetConfig {
                iqn,
                portals: vec![portal.parse()?],
                tpgt: 1,
                luns: vec![
                    LunMapping {
                        lun: 0,
                        name: "lun0".into(),
                    },
                    LunMapping {
                        lun: 1,
                        name: "ro".into(),
                    },
                    LunMapping {
                        lun: 2,
                        name: "phys4k".into(),
                    },
                ],
                allow_any_initiator: inits.is_empty(),
                acls: inits
                    .into_iter()
                    .map(|i| Acl {
                        initiator: i,
                        luns: None,
                        chap: None,
                    })
                    .collect(),
                chap: None,
            }],
            discovery_chap: None,
        };
        let _server = IscsiServer::start(cfg, units, conn_cfg).await?;
        eprintln!("serving");
        std::future::pending::<()>().await;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

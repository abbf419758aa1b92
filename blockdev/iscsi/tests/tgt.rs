//! The iSCSI initiator against a real target: Debian's tgt (userspace, no kernel
//! module), started by the test on a private port and control port. tgt 1.0.85 has no
//! COMPARE AND WRITE, so this checks CAW's error path (ILLEGAL REQUEST ->
//! `Unsupported`); the success and MISCOMPARE paths (offset from the sense INFORMATION
//! field) and cross-session atomicity are tested against Basalt's own target in
//! `basalt_target.rs`.
//!
//! Needs root and `tgtd` (`deploy/install-deps.sh test` installs it); without them the
//! tests fail with that hint rather than pass unrun.
//! Debian packages: tgt (target), libiscsi-dev (build), libiscsi7 (run).

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step is a failed test

use basalt_blockdev::{BlockDev, BlockError, WriteFlags, ZeroFlags};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use bytes::Bytes;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Tgt {
    child: Child,
    control: u16,
    port: u16,
    _dir: tempfile::TempDir,
    iqn: String,
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_tgt() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let found = Command::new("tgtd").arg("-V").output().is_ok();
    assert!(
        root && found,
        "needs root and tgtd: run deploy/install-deps.sh test (Debian: tgt)"
    );
    true
}

fn adm(control: u16, args: &str) {
    let st = Command::new("tgtadm")
        .arg("-C")
        .arg(control.to_string())
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(st.success(), "tgtadm {args}");
}

fn start_tgtd(control: u16, port: u16) -> Child {
    let child = Command::new("tgtd")
        .args([
            "-f",
            "-C",
            &control.to_string(),
            "--iscsi",
            &format!("portal=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the control socket.
    for _ in 0..100 {
        let ok = Command::new("tgtadm")
            .args([
                "-C",
                &control.to_string(),
                "--lld",
                "iscsi",
                "--op",
                "show",
                "--mode",
                "target",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn configure(control: u16, iqn: &str, img: &std::path::Path) {
    adm(
        control,
        &format!("--lld iscsi --op new --mode target --tid 1 -T {iqn}"),
    );
    adm(
        control,
        &format!(
            "--lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b {}",
            img.display()
        ),
    );
    adm(
        control,
        "--lld iscsi --op bind --mode target --tid 1 -I ALL",
    );
}

fn tgt(size: u64, salt: u16) -> Tgt {
    let pid = std::process::id() as u16;
    let control = 20000 + (pid.wrapping_add(salt) % 10000);
    let port = 33000 + (pid.wrapping_add(salt) % 10000);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lun.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let child = start_tgtd(control, port);
    let iqn = format!("iqn.2026-11.org.basalt:test{salt}");
    configure(control, &iqn, &img);
    Tgt {
        child,
        control,
        port,
        _dir: dir,
        iqn,
    }
}

fn url(t: &Tgt) -> String {
    format!("iscsi://127.0.0.1:{}/{}/1", t.port, t.iqn)
}

fn opts() -> IscsiOptions {
    IscsiOptions {
        initiator: "iqn.2026-11.org.basalt:init1".into(),
        io_timeout: Duration::from_secs(5),
        reconnect_interval: Duration::from_millis(200),
        ..IscsiOptions::default()
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_against_tgt() {
    if !have_tgt() {
        return;
    }
    let t = tgt(64 << 20, 1);
    let dev = IscsiDev::connect(&url(&t), &opts()).await.unwrap();
    let g = dev.geometry();
    assert_eq!(g.block_size, 512);
    assert_eq!(g.capacity_bytes(), 64 << 20);
    println!("limits: {:?}", dev.limits());
    // Read after write, across the transfer limit.
    let big = pattern(3, 3 << 20);
    dev.write(1 << 20, big.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(dev.read(1 << 20, big.len()).await.unwrap(), big);
    let small = pattern(9, 4096);
    dev.write(0, small.clone(), WriteFlags { fua: true })
        .await
        .unwrap();
    assert_eq!(dev.read(0, 4096).await.unwrap(), small);
    dev.flush().await.unwrap();
    // Write zeroes (WRITE SAME, or writes when tgt refuses it).
    dev.write_zeroes(0, 8192, ZeroFlags::default())
        .await
        .unwrap();
    assert!(dev.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    // Misuse is refused before the wire.
    assert!(matches!(
        dev.read(1, 512).await,
        Err(BlockError::Misaligned { .. })
    ));
    assert!(matches!(
        dev.read(64 << 20, 512).await,
        Err(BlockError::OutOfRange { .. })
    ));
    // Discard only if advertised.
    if g.capabilities.discard {
        dev.discard(1 << 20, 1 << 20).await.unwrap();
    } else {
        assert!(matches!(
            dev.discard(0, 512).await,
            Err(BlockError::Unsupported(_))
        ));
    }
    // COMPARE AND WRITE: tgt answers ILLEGAL REQUEST; the error path says so.
    let r = dev
        .compare_and_write(
            0,
            Bytes::from(vec![0u8; 512]),
            pattern(1, 512),
            WriteFlags::default(),
        )
        .await;
    match r {
        Err(BlockError::Unsupported(m)) => assert!(m.contains("COMPARE AND WRITE"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Nothing was written.
    assert!(dev.read(0, 512).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_target_restart() {
    if !have_tgt() {
        return;
    }
    let mut t = tgt(16 << 20, 2);
    let dev = IscsiDev::connect(&url(&t), &opts()).await.unwrap();
    dev.write(0, pattern(5, 512), WriteFlags { fua: true })
        .await
        .unwrap();
    // Kill the target: requests fail with a clear Offline error meanwhile.
    let _ = t.child.kill();
    let _ = t.child.wait();
    let mut saw_offline = false;
    for _ in 0..50 {
        match dev.read(0, 512).await {
            Err(BlockError::Offline(m)) => {
                assert!(
                    m.contains("iscsi://")
                        && (m.contains("connection lost") || m.contains("reconnecting")),
                    "{m}"
                );
                saw_offline = true;
                break;
            }
            Err(_) => {}
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_offline);
    // Bring it back on the same port with the same LUN file.
    t.child = start_tgtd(t.control, t.port);
    let img = t._dir.path().join("lun.img");
    configure(t.control, &t.iqn, &img);
    let mut back = false;
    for _ in 0..100 {
        if let Ok(d) = dev.read(0, 512).await {
            assert_eq!(d, pattern(5, 512));
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "did not reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_clear() {
    let r = IscsiDev::connect("iscsi://127.0.0.1:1/iqn.none:x/0", &opts()).await;
    let e = r.err().unwrap().to_string();
    assert!(e.contains("cannot connect to iscsi://127.0.0.1:1"), "{e}");
    let e = IscsiDev::connect("http://x", &opts())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("invalid iSCSI URL"), "{e}");
}

//! The NBD client BlockDev against real NBD servers: nbdkit (memory plugin, over a unix
//! socket and TCP) and qemu-nbd (a file). The blockdev conformance suite runs on it,
//! except the checks that need compare-and-write (NBD has none: `compare_and_write*`,
//! `unaligned_buffers`).
//!
//! Needs `nbdkit` and `qemu-nbd`; fails with a clear message without them.

use basalt_blockdev::{conformance, BlockDev, BlockError, SharedBlockDev, WriteFlags};
use basalt_compute::nbd::{NbdAddress, NbdDev};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn require(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is missing: apt-get install {package}");
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn nbdkit_memory(size: &str) -> Server {
    require("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("nbd.sock");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(&sock)
        .args(["memory", size])
        .spawn()
        .expect("spawn nbdkit");
    wait_for(&sock);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
        _dir: dir,
    }
}

fn qemu_nbd(file: &Path, export: &str) -> Server {
    require("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("nbd.sock");
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--format=raw",
            "--cache=none",
            "--discard=unmap",
            "-x",
            export,
            "-k",
        ])
        .arg(&sock)
        .arg(file)
        .spawn()
        .expect("spawn qemu-nbd");
    wait_for(&sock);
    Server {
        child,
        uri: format!("nbd+unix:///{export}?socket={}", sock.display()),
        _dir: dir,
    }
}

async fn connect(uri: &str) -> NbdDev {
    NbdDev::connect(&NbdAddress::parse(uri).expect("uri"))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_nbdkit() {
    // Each check gets its own server, so none sees another's writes.
    let servers = std::sync::Mutex::new(Vec::new());
    macro_rules! check {
        ($f:ident) => {{
            let s = nbdkit_memory("32M");
            let dev: SharedBlockDev = Arc::new(connect(&s.uri).await);
            servers.lock().expect("lock").push(s);
            conformance::$f("NbdDev/nbdkit", dev).await;
        }};
    }
    check!(geometry_is_sane);
    check!(read_after_write);
    check!(misaligned_requests_are_rejected);
    check!(out_of_range_requests_are_rejected);
    check!(fua_and_flush);
    check!(concurrent_disjoint_writers);
    check!(large_io);
    check!(many_small_ios_in_flight);
    check!(block_status);
    check!(write_zeroes);
    check!(discard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_file_round_trip_and_pipelining() {
    let dir = tempfile::tempdir().expect("tmp");
    let img: PathBuf = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).expect("image");
    let s = qemu_nbd(&img, "disk0");
    let dev = Arc::new(connect(&s.uri).await);
    let g = dev.geometry();
    assert_eq!(g.capacity_bytes(), 8 << 20);
    // 128 writes in flight at once, each a distinct 4 KiB block.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..128u64 {
        let d = dev.clone();
        set.spawn(async move {
            let data = Bytes::from(vec![i as u8; 4096]);
            d.write(i * 4096, data, WriteFlags::default()).await
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("join").expect("write");
    }
    dev.flush().await.expect("flush");
    // The host sees the blocks in the file, through no Basalt code at all.
    let file = std::fs::read(&img).expect("read file");
    for i in 0..128usize {
        assert!(
            file[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "block {i}"
        );
    }
    let back = dev.read(5 * 4096, 8192).await.expect("read");
    assert!(back[..4096].iter().all(|&b| b == 5) && back[4096..].iter().all(|&b| b == 6));
    assert!(matches!(
        dev.read(g.capacity_bytes(), 512).await,
        Err(BlockError::OutOfRange { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_refused_exports() {
    require("nbdkit", "nbdkit");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = Command::new("nbdkit")
        .args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "memory",
            "1M",
        ])
        .spawn()
        .expect("spawn nbdkit");
    let deadline = Instant::now() + Duration::from_secs(10);
    let dev = loop {
        match NbdDev::connect(&NbdAddress::parse(&format!("nbd://127.0.0.1:{port}/")).expect("uri"))
            .await
        {
            Ok(d) => break d,
            Err(e) => {
                assert!(Instant::now() < deadline, "nbdkit on TCP: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(dev.geometry().capacity_bytes(), 1 << 20);
    dev.write(0, Bytes::from(vec![9u8; 512]), WriteFlags { fua: true })
        .await
        .expect("write");
    assert_eq!(dev.read(0, 512).await.expect("read")[..], [9u8; 512][..]);
    drop(dev);

    // qemu-nbd refuses an export name it does not serve; the error says so.
    let tmp = tempfile::tempdir().expect("tmp");
    let img = tmp.path().join("x.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("img");
    let s = qemu_nbd(&img, "right");
    let wrong = s.uri.replace("///right", "///wrong");
    let err = NbdDev::connect(&NbdAddress::parse(&wrong).expect("uri"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("refused"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}

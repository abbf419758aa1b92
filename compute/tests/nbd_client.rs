//! The NBD client BlockDev against real NBD servers: nbdkit (memory plugin, over a unix
//! socket and TCP) and qemu-nbd (a file). The blockdev conformance suite runs on it,
//! except the checks that need compare-and-write (NBD has none: `compare_and_write*`,
//! `unaligned_buffers`).
//!
//! Needs `nbdkit` and `qemu-nbd`; fails with a clear message without them.
//!
//! Reconnection runs against Basalt's own NBD server (`basalt-nbd`, as the daemon's VM
//! NBD server) on a unix socket, stopped and started again on the same path over the
//! same device, as a daemon restart does.

use basalt_blockdev::{
    conformance,
    fault::{ErrorRule, FaultOp},
    BlockDev, BlockError, FaultDev, IoKind, MemDev, Metered, SharedBlockDev, WriteFlags,
};
use basalt_compute::nbd::{NbdAddress, NbdDev, NbdOptions};
use basalt_nbd::{Devices, ExportConfig, NbdConfig, NbdServer};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Waits until the server listens on `path` (the socket exists a moment before).
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
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

/// Basalt's NBD server exporting `dev` as `lun0` on the unix socket `sock`.
async fn basalt_server(dev: SharedBlockDev, sock: &Path) -> NbdServer {
    basalt_server_with(dev, sock, ExportConfig::default()).await
}

/// [`basalt_server`] with the export configured as `export`.
async fn basalt_server_with(dev: SharedBlockDev, sock: &Path, export: ExportConfig) -> NbdServer {
    let mut devices = Devices::new();
    devices.insert("lun0".to_string(), dev);
    let mut cfg = NbdConfig {
        listen: Vec::new(),
        ..NbdConfig::default()
    };
    cfg.exports.insert("lun0".into(), export);
    let server = NbdServer::start(cfg, devices, None)
        .await
        .expect("Basalt NBD server");
    server.serve_unix(sock).expect("serve on the unix socket");
    server
}

/// Stops the server at once (connections cut, requests in flight unanswered) and
/// waits until its socket is gone.
async fn kill(server: NbdServer, sock: &Path) {
    server.stop(Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while sock.exists() {
        assert!(Instant::now() < deadline, "socket outlived its server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn block(tag: u8, i: u64) -> Bytes {
    let mut b = vec![tag; 4096];
    b[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(b)
}

async fn reconnecting(sock: &Path, window: Duration) -> NbdDev {
    let uri = format!("nbd+unix:///lun0?socket={}", sock.display());
    NbdDev::connect_with(
        &NbdAddress::parse(&uri).expect("uri"),
        NbdOptions {
            reconnect_window: window,
            ..NbdOptions::default()
        },
    )
    .await
    .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_a_server_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    // The LUN: memory behind a volatile write cache, slow enough that requests are in
    // flight when the server goes.
    let mem = Arc::new(MemDev::new(4096, 4096));
    let fault = Arc::new(FaultDev::new(mem.clone()));
    let server = basalt_server(fault.clone(), &sock).await;
    let dev = Arc::new(reconnecting(&sock, Duration::from_secs(20)).await);
    let mut model = vec![None::<Bytes>; 4096];

    // Blocks 0..32 acknowledged before the outage, not flushed.
    for i in 0..32u64 {
        dev.write(i * 4096, block(1, i), WriteFlags::default())
            .await
            .expect("write");
        model[i as usize] = Some(block(1, i));
    }
    fault.set_latency(FaultOp::Read, Duration::from_millis(300));
    fault.set_latency(FaultOp::Write, Duration::from_millis(300));
    // Writes of blocks 32..96 and reads of 0..32 in flight when the server goes.
    let mut set = tokio::task::JoinSet::new();
    for i in 32..96u64 {
        let d = dev.clone();
        set.spawn(async move {
            d.write(i * 4096, block(2, i), WriteFlags::default())
                .await
                .map(|()| None)
        });
        model[i as usize] = Some(block(2, i));
    }
    for i in 0..32u64 {
        let d = dev.clone();
        set.spawn(async move { d.read(i * 4096, 4096).await.map(|b| Some((i, b))) });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    kill(server, &sock).await;
    // The storage controller lost its cache with it: what was not flushed is gone.
    fault.crash();
    fault.recover().await;
    fault.set_latency(FaultOp::Read, Duration::ZERO);
    fault.set_latency(FaultOp::Write, Duration::ZERO);
    // The client notices the loss (its reader sees the end of the stream) in its time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.is_connected() {
        assert!(Instant::now() < deadline, "the loss went unnoticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Requests issued during the outage wait too.
    for i in 96..128u64 {
        let d = dev.clone();
        set.spawn(async move {
            d.write(i * 4096, block(3, i), WriteFlags::default())
                .await
                .map(|()| None)
        });
        model[i as usize] = Some(block(3, i));
    }
    {
        let d = dev.clone();
        set.spawn(async move { d.read(200 * 4096, 4096).await.map(|b| Some((200, b))) });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _server = basalt_server(fault.clone(), &sock).await;

    let started = Instant::now();
    while let Some(r) = set.join_next().await {
        match r.expect("join").expect("a request across the restart") {
            None => {}
            Some((i, data)) => {
                let want = model[i as usize]
                    .clone()
                    .unwrap_or_else(|| Bytes::from(vec![0u8; 4096]));
                assert!(data == want, "block {i} read back wrong");
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(dev.reconnects(), 1);
    assert!(dev.is_connected());

    // A flush after the reconnection covers the writes acknowledged before the outage
    // (lost with the cache, written again) as well as the others: all of it is on the
    // medium under the cache.
    dev.flush().await.expect("flush");
    assert_eq!(fault.unflushed_blocks(), 0);
    for (i, want) in model.iter().enumerate() {
        let want = want.clone().unwrap_or_else(|| Bytes::from(vec![0u8; 4096]));
        let got = mem.read(i as u64 * 4096, 4096).await.expect("medium");
        assert!(got == want, "block {i} not on the medium after the flush");
        let got = dev.read(i as u64 * 4096, 4096).await.expect("read");
        assert!(got == want, "block {i} reads back wrong");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_past_the_reconnect_window_then_work_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem: SharedBlockDev = Arc::new(MemDev::new(1024, 4096));
    let server = basalt_server(mem.clone(), &sock).await;
    let dev = reconnecting(&sock, Duration::from_secs(1)).await;
    dev.write(0, block(7, 0), WriteFlags { fua: true })
        .await
        .expect("write");
    kill(server, &sock).await;

    // Waits for the window, then fails with a clear error.
    let t = Instant::now();
    let err = dev.read(0, 4096).await.expect_err("no server");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let text = err.to_string();
    assert!(matches!(err, BlockError::Offline(_)), "{err:?}");
    assert!(
        text.contains("unreachable for more than 1 s") && text.contains("vm-nbd.sock"),
        "{text}"
    );
    // Further requests fail at once.
    let t = Instant::now();
    let err = dev
        .write(4096, block(8, 1), WriteFlags::default())
        .await
        .expect_err("still no server");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("unreachable"), "{err}");

    // The device keeps trying: once the export is back, it works again.
    let _server = basalt_server(mem.clone(), &sock).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.is_connected() {
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dev.read(0, 4096).await.expect("read") == block(7, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_came_back_with_another_size_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let server = basalt_server(Arc::new(MemDev::new(1024, 4096)), &sock).await;
    let dev = reconnecting(&sock, Duration::from_secs(2)).await;
    dev.read(0, 4096).await.expect("read");
    kill(server, &sock).await;
    let _other = basalt_server(Arc::new(MemDev::new(512, 4096)), &sock).await;
    let err = dev.read(0, 4096).await.expect_err("another export");
    let text = err.to_string();
    assert!(
        text.contains("came back with 2097152 bytes") && text.contains("refused"),
        "{text}"
    );
    assert_eq!(dev.reconnects(), 0);
    assert!(!dev.is_connected());
}

/// Waits (bounded) until `dev` is connected again.
async fn until_connected(dev: &NbdDev) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.is_connected() {
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops the server and loses the LUN's cache with it (a storage-controller crash).
async fn crash(server: NbdServer, sock: &Path, fault: &FaultDev) {
    kill(server, sock).await;
    fault.crash();
    fault.recover().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_the_replay_is_ridden_out_too() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem = Arc::new(MemDev::new(1024, 4096));
    let fault = Arc::new(FaultDev::new(mem.clone()));
    let server = basalt_server(fault.clone(), &sock).await;
    let uri = format!("nbd+unix:///lun0?socket={}", sock.display());
    let dev = Arc::new(
        NbdDev::connect_with(
            &NbdAddress::parse(&uri).expect("uri"),
            NbdOptions {
                reconnect_window: Duration::from_secs(30),
                ..NbdOptions::default()
            },
        )
        .await
        .expect("connect"),
    );
    // A replay log of acknowledged, unflushed writes, each block written twice: the
    // reconnection writes the first round again and waits for it before the second
    // (overlapping entries go one after the other), so it is waiting for replies.
    for tag in [4, 5] {
        for i in 0..16u64 {
            dev.write(i * 4096, block(tag, i), WriteFlags::default())
                .await
                .expect("write");
        }
    }
    crash(server, &sock, &fault).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.is_connected() {
        assert!(Instant::now() < deadline, "the loss went unnoticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Guest requests waiting through the outage.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let d = dev.clone();
        set.spawn(async move { (i, d.read(i * 4096, 4096).await) });
    }
    // The server comes back slow, and goes again while the replay is in flight.
    fault.set_latency(FaultOp::Write, Duration::from_millis(500));
    let server = basalt_server(fault.clone(), &sock).await;
    until_connected(&dev).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(dev.reconnects(), 0, "the replay should still be in flight");
    fault.set_latency(FaultOp::Write, Duration::ZERO);
    kill(server, &sock).await;
    let _server = basalt_server(fault.clone(), &sock).await;

    let all = async {
        while let Some(r) = set.join_next().await {
            let (i, data) = r.expect("join");
            assert!(
                data.expect("a read across both losses") == block(5, i),
                "block {i}"
            );
        }
        dev.flush().await.expect("flush");
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("the disk hangs after a loss during the replay");
    assert!(dev.is_connected());
    for i in 0..16u64 {
        let got = mem.read(i * 4096, 4096).await.expect("medium");
        assert!(
            got == block(5, i),
            "block {i} not on the medium after the flush"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_flush_fails_when_a_replay_failed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem = Arc::new(MemDev::new(1024, 4096));
    let fault = Arc::new(FaultDev::new(mem.clone()));
    let server = basalt_server(fault.clone(), &sock).await;
    let dev = Arc::new(reconnecting(&sock, Duration::from_secs(20)).await);
    for i in 0..8u64 {
        dev.write(i * 4096, block(5, i), WriteFlags::default())
            .await
            .expect("write");
    }
    crash(server, &sock, &fault).await;
    // After the restart, block 3 cannot be written.
    let rule = fault.add_rule(ErrorRule::new(FaultOp::Write).range(3 * 4096..4 * 4096));
    // A flush waits through the outage; it is resent after the replay.
    let d = dev.clone();
    let flush = tokio::spawn(async move { d.flush().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = basalt_server(fault.clone(), &sock).await;
    let err = tokio::time::timeout(Duration::from_secs(10), flush)
        .await
        .expect("flush answered")
        .expect("join")
        .expect_err("a replayed write failed: the flush must too");
    assert!(matches!(err, BlockError::Io { .. }), "{err:?}");
    assert_eq!(dev.reconnects(), 1);

    // The failed flush covered nothing: the log still holds block 3, and the next
    // reconnection writes it again.
    fault.remove_rule(rule);
    crash(server, &sock, &fault).await;
    let _server = basalt_server(fault.clone(), &sock).await;
    assert!(dev.read(3 * 4096, 4096).await.expect("read") == block(5, 3));
    dev.flush().await.expect("flush once the replay worked");
    for i in 0..8u64 {
        let got = mem.read(i * 4096, 4096).await.expect("medium");
        assert!(got == block(5, i), "block {i} not on the medium");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_flush_does_not_swallow_a_failed_replay() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem = Arc::new(MemDev::new(1024, 4096));
    let fault = Arc::new(FaultDev::new(mem.clone()));
    let server = basalt_server(fault.clone(), &sock).await;
    let uri = format!("nbd+unix:///lun0?socket={}", sock.display());
    // A small replay log: the client flushes on its own past 8 blocks.
    let dev = NbdDev::connect_with(
        &NbdAddress::parse(&uri).expect("uri"),
        NbdOptions {
            reconnect_window: Duration::from_secs(20),
            replay_limit: 8 * 4096,
            ..NbdOptions::default()
        },
    )
    .await
    .expect("connect");
    for i in 0..4u64 {
        dev.write(i * 4096, block(6, i), WriteFlags::default())
            .await
            .expect("write");
    }
    crash(server, &sock, &fault).await;
    let rule = fault.add_rule(ErrorRule::new(FaultOp::Write).range(0..4096));
    let _server = basalt_server(fault.clone(), &sock).await;
    // The read waits for the reconnection, whose replay of block 0 fails.
    assert!(dev.read(4096, 4096).await.expect("read") == block(6, 1));
    fault.remove_rule(rule);
    // Enough writes to make the client flush on its own, and let it finish.
    for i in 4..16u64 {
        dev.write(i * 4096, block(6, i), WriteFlags::default())
            .await
            .expect("write");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = dev.flush().await.expect_err("the replay of block 0 failed");
    assert!(matches!(err, BlockError::Io { .. }), "{err:?}");
    // Reported once.
    dev.flush().await.expect("the next flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_grew_is_accepted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let server = basalt_server(Arc::new(MemDev::new(1024, 4096)), &sock).await;
    let dev = reconnecting(&sock, Duration::from_secs(5)).await;
    dev.write(0, block(9, 0), WriteFlags { fua: true })
        .await
        .expect("write");
    kill(server, &sock).await;
    // Grown online: the same LUN, larger.
    let grown = Arc::new(MemDev::new(2048, 4096));
    grown
        .write(0, block(9, 0), WriteFlags { fua: true })
        .await
        .expect("seed");
    let server = basalt_server(grown.clone(), &sock).await;
    assert!(dev.read(0, 4096).await.expect("read after growth") == block(9, 0));
    assert_eq!(dev.reconnects(), 1);
    // The guest keeps the size it saw.
    assert_eq!(dev.geometry().capacity_bytes(), 1024 * 4096);
    assert!(matches!(
        dev.read(1024 * 4096, 4096).await,
        Err(BlockError::OutOfRange { .. })
    ));
    // Smaller than at first is still refused.
    kill(server, &sock).await;
    let _small = basalt_server(Arc::new(MemDev::new(1000, 4096)), &sock).await;
    let err = dev.read(0, 4096).await.expect_err("a smaller export");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(dev.reconnects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fua_write_is_not_undone_by_the_replay_of_an_older_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem = Arc::new(MemDev::new(1024, 4096));
    let fault = Arc::new(FaultDev::new(mem.clone()));
    let server = basalt_server(fault.clone(), &sock).await;
    let dev = reconnecting(&sock, Duration::from_secs(20)).await;
    // A, then B with FUA (durable when acknowledged) over the same block.
    dev.write(3 * 4096, block(0xa, 3), WriteFlags::default())
        .await
        .expect("write A");
    dev.write(3 * 4096, block(0xb, 3), WriteFlags { fua: true })
        .await
        .expect("write B (FUA)");
    crash(server, &sock, &fault).await;
    let _server = basalt_server(fault.clone(), &sock).await;
    assert!(
        dev.read(3 * 4096, 4096).await.expect("read") == block(0xb, 3),
        "the replay of A undid the FUA write B"
    );
    dev.flush().await.expect("flush");
    assert!(mem.read(3 * 4096, 4096).await.expect("medium") == block(0xb, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_came_back_read_only_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    let mem: SharedBlockDev = Arc::new(MemDev::new(1024, 4096));
    let server = basalt_server(mem.clone(), &sock).await;
    let dev = reconnecting(&sock, Duration::from_secs(1)).await;
    dev.write(0, block(1, 0), WriteFlags { fua: true })
        .await
        .expect("write");
    kill(server, &sock).await;
    // The same LUN, same size, but read-only now: the guest's writes would all fail.
    let _ro = basalt_server_with(
        mem.clone(),
        &sock,
        ExportConfig {
            read_only: true,
            ..ExportConfig::default()
        },
    )
    .await;
    let err = dev.read(0, 4096).await.expect_err("a read-only export");
    let text = err.to_string();
    assert!(matches!(err, BlockError::Offline(_)), "{err:?}");
    assert!(
        text.contains("came back read-only") && text.contains("refused"),
        "{text}"
    );
    assert_eq!(dev.reconnects(), 0);
    assert!(!dev.is_connected());
}

/// A fault-injecting proxy on `listener` in front of the NBD server on `server`: it
/// passes the handshake through, then (while `cut` is set) drops both sides at the
/// client's first transmission request, before the server sees it: a server that
/// completes every handshake and loses every connection. Counts the connections.
async fn cutting_proxy(
    listener: tokio::net::UnixListener,
    server: PathBuf,
    cut: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
) {
    const IHAVEOPT_HI: u32 = 0x4948_4156; // "IHAV"
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        let server = server.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            let Ok(upstream) = tokio::net::UnixStream::connect(&server).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = upstream.into_split();
            let down = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            // Client to server: the client flags, then options framed as IHAVEOPT,
            // option, length, data; the first thing that is not an option is a request.
            let mut flags = [0u8; 4];
            if cr.read_exact(&mut flags).await.is_err() || sw.write_all(&flags).await.is_err() {
                down.abort();
                return;
            }
            loop {
                let mut magic = [0u8; 4];
                if cr.read_exact(&mut magic).await.is_err() {
                    break;
                }
                if u32::from_be_bytes(magic) == IHAVEOPT_HI {
                    let mut rest = [0u8; 12];
                    if cr.read_exact(&mut rest).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
                    let mut data = vec![0u8; len as usize];
                    if cr.read_exact(&mut data).await.is_err()
                        || sw.write_all(&magic).await.is_err()
                        || sw.write_all(&rest).await.is_err()
                        || sw.write_all(&data).await.is_err()
                    {
                        break;
                    }
                } else if cut.load(Ordering::SeqCst) {
                    break;
                } else {
                    // Transmission: pass everything through from here.
                    if sw.write_all(&magic).await.is_ok() {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    }
                    break;
                }
            }
            // Dropping both halves of both sockets closes them.
            down.abort();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_drops_every_connection_after_the_handshake_fails_requests_in_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let real = tmp.path().join("real.sock");
    let front = tmp.path().join("vm-nbd.sock");
    let _server = basalt_server(Arc::new(MemDev::new(1024, 4096)), &real).await;
    let cut = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::UnixListener::bind(&front).expect("bind the proxy");
    let proxy = tokio::spawn(cutting_proxy(
        listener,
        real.clone(),
        cut.clone(),
        accepted.clone(),
    ));
    let dev = reconnecting(&front, Duration::from_secs(1)).await;

    // Every connection is lost at the first request: the read waits out the window
    // from the first loss, then fails, rather than waiting forever.
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), dev.read(0, 4096))
        .await
        .expect("the read still waits long past the reconnect window")
        .expect_err("no connection ever answers");
    let waited = t.elapsed();
    let connections = accepted.load(Ordering::SeqCst);
    let text = err.to_string();
    assert!(matches!(err, BlockError::Offline(_)), "{err:?}");
    assert!(text.contains("unreachable for more than 1 s"), "{text}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    // The backoff carries over from one lost connection to the next (pauses of 0, 50,
    // 100, 200, 400, 800 ms: about 7 connections by then); restarting it at every loss
    // makes hundreds.
    assert!(
        (2..=20).contains(&connections),
        "{connections} connections in {waited:?}"
    );

    // Once connections are answered again, the device works again.
    cut.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match dev.read(0, 4096).await {
            Ok(data) => {
                assert!(data.iter().all(|&b| b == 0));
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "never worked again: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(dev.reconnects() >= 1);
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_count_toward_the_replay_limit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("vm-nbd.sock");
    // Metered counts the flushes the server passes down.
    let lun = Arc::new(Metered::new(MemDev::new(1024, 4096)));
    let _server = basalt_server(lun.clone(), &sock).await;
    let uri = format!("nbd+unix:///lun0?socket={}", sock.display());
    let dev = NbdDev::connect_with(
        &NbdAddress::parse(&uri).expect("uri"),
        NbdOptions {
            reconnect_window: Duration::from_secs(5),
            replay_limit: 8 * 4096,
            ..NbdOptions::default()
        },
    )
    .await
    .expect("connect");
    // A guest that discards and never flushes: past 8 entries' worth the client must
    // flush on its own to bound the log, payload or not.
    for i in 0..64u64 {
        dev.discard(i * 4096, 4096).await.expect("discard");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lun.stats().snapshot().kind(IoKind::Flush).ops == 0 {
        assert!(
            Instant::now() < deadline,
            "64 unflushed discards and no flush: the replay log is unbounded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

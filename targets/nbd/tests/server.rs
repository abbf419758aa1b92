//! The server over loopback TCP, driven by the crate's simulated client
//! (`test_utils::BlockingClient`): the transmission phase end to end, pipelining,
//! errors, access control, reconfiguration, multi-conn durability and graceful stop.

// Test helpers outside #[test] functions may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use basalt_blockdev::{BlockDev, FaultDev, MemDev, SharedBlockDev, WriteFlags};
use basalt_nbd::proto::{cmd, cmd_flags, opt, rep, state, tx_flags};
use basalt_nbd::test_utils::{opt_data_info, BlockingClient, ClientOptions, Outcome};
use basalt_nbd::{Cidr, Devices, ExportConfig, NbdConfig, NbdServer, TlsMode};
use bytes::Bytes;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn config(exports: &[&str]) -> NbdConfig {
    let mut c = NbdConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..NbdConfig::default()
    };
    for e in exports {
        c.exports.insert((*e).into(), ExportConfig::default());
    }
    c
}

fn mem(blocks: u64, bs: u32) -> SharedBlockDev {
    Arc::new(MemDev::new(blocks, bs))
}

async fn start(c: NbdConfig, devices: Devices) -> (NbdServer, SocketAddr) {
    let s = NbdServer::start(c, devices, None).await.unwrap();
    let addr = s.local_addrs().await[0];
    (s, addr)
}

fn connect(
    addr: SocketAddr,
    export: &str,
    o: &ClientOptions,
) -> std::io::Result<BlockingClient<TcpStream>> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    BlockingClient::connect(s, export, o)
}

/// Runs blocking client code off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn data_of(o: Outcome) -> Vec<u8> {
    match o {
        Outcome::Ok { data, .. } => data,
        Outcome::Err(e, m) => panic!("error {e}: {m}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_zero_trim_and_block_status() {
    let dev = mem(2048, 512); // 1 MiB
    let mut devices = Devices::new();
    devices.insert("lun0".into(), dev.clone());
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        for structured in [true, false] {
            let o = ClientOptions {
                structured,
                block_status: structured,
                block_sizes: true,
            };
            let mut c = connect(addr, "lun0", &o).unwrap();
            assert_eq!(c.size, 1 << 20);
            assert_eq!(c.block_sizes, Some((512, 4096, 1 << 25)));
            assert!(c.flags & tx_flags::CAN_MULTI_CONN != 0);
            assert!(c.flags & tx_flags::SEND_TRIM != 0);
            let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
            assert_eq!(c.write(131072, &pattern).unwrap().errno(), 0);
            assert_eq!(data_of(c.read(131072, 65536).unwrap()), pattern);
            // A read spanning data and a zeroed run comes back whole.
            let got = data_of(c.read(65536, 196608).unwrap());
            assert!(got[..65536].iter().all(|&b| b == 0));
            assert_eq!(&got[65536..131072], &pattern[..]);
            assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]).unwrap().errno(), 0);
            assert_eq!(
                c.call(cmd::WRITE_ZEROES, cmd_flags::FUA, 131072, 4096, &[])
                    .unwrap()
                    .errno(),
                0
            );
            let got = data_of(c.read(131072, 8192).unwrap());
            assert!(got[..4096].iter().all(|&b| b == 0));
            assert_eq!(&got[4096..], &pattern[4096..8192]);
            assert_eq!(c.call(cmd::CACHE, 0, 0, 4096, &[]).unwrap().errno(), 0);
            if structured {
                let Outcome::Ok { extents, .. } = c.block_status(0, 1 << 20).unwrap() else {
                    panic!()
                };
                let total: u64 = extents.iter().map(|e| u64::from(e.0)).sum();
                assert_eq!(total, 1 << 20);
                assert_eq!(extents[0], (131072, state::HOLE | state::ZERO));
                assert_eq!(extents[1], (65536, 0));
            }
            assert_eq!(c.call(cmd::TRIM, 0, 131072, 65536, &[]).unwrap().errno(), 0);
            let got = data_of(c.read(131072, 65536).unwrap());
            assert!(got.iter().all(|&b| b == 0));
            c.disconnect().unwrap();
        }
    })
    .await;
    let m = server.metrics();
    let lun = &m.exports["lun0"];
    assert!(lun.commands["read"].ops >= 8);
    assert!(lun.commands["write"].bytes >= 2 * 65536);
    assert_eq!(lun.connections_total, 2);
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_get_answers() {
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(8192, 512));
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        let mut c = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        // 200 writes of distinct blocks, then 200 reads, without waiting in between.
        let mut handles = std::collections::BTreeSet::new();
        for i in 0..200u64 {
            let block = vec![(i % 250) as u8 + 1; 4096];
            handles.insert(c.send(cmd::WRITE, 0, i * 4096, 4096, &block).unwrap());
        }
        for _ in 0..200 {
            let (h, o) = c.recv().unwrap();
            assert_eq!(o.errno(), 0);
            assert!(handles.remove(&h));
        }
        let mut expect = std::collections::BTreeMap::new();
        for i in 0..200u64 {
            let h = c.send(cmd::READ, 0, i * 4096, 4096, &[]).unwrap();
            expect.insert(h, (i % 250) as u8 + 1);
        }
        for _ in 0..200 {
            let (h, o) = c.recv().unwrap();
            let byte = expect.remove(&h).unwrap();
            assert!(data_of(o).iter().all(|&b| b == byte));
        }
    })
    .await;
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_arriving_in_pieces_are_received_whole() {
    // Large write payloads are received into buffers of their own, with the socket's
    // receive low-water mark raised to the bytes still missing: payloads that arrive in
    // uneven parts with pauses, a header alone, a payload followed at once by the next
    // request, unaligned and FUA writes must all land whole and nothing may stall.
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(16384, 512)); // 8 MiB
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        // No block size agreement, so unaligned writes are allowed.
        let o = ClientOptions {
            block_sizes: false,
            ..ClientOptions::default()
        };
        let mut c = connect(addr, "lun0", &o).unwrap();
        let mut model = vec![0u8; 8 << 20];
        let cases: [(u64, usize, &[usize]); 6] = [
            (0, 1 << 20, &[28, 100_000, 7, 300_000]),
            (1 << 20, 65536, &[10, 18, 65536]),
            ((2 << 20) + 3, 65537 + 4096, &[40_000]),
            (3 << 20, 2 << 20, &[1 << 20, 1, 333_333]),
            (6 << 20, 64 * 1024 - 1, &[5000]),
            ((7 << 20) - 512, 1 << 20, &[28, 1 << 20]),
        ];
        let mut handles = std::collections::BTreeSet::new();
        for (i, &(offset, len, pieces)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13) as u8 | 1).collect();
            let flags = if i % 2 == 1 { cmd_flags::FUA } else { 0 };
            let req = (cmd::WRITE, flags, offset, len as u32);
            let pause = Duration::from_millis(20);
            handles.insert(c.send_in_pieces(req, &data, pieces, pause).unwrap());
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            // A small request right behind the large one.
            handles.insert(c.send(cmd::FLUSH, 0, 0, 0, &[]).unwrap());
        }
        for _ in 0..handles.len() {
            let (h, o) = c.recv().unwrap();
            assert_eq!(o.errno(), 0, "request {h}");
            assert!(handles.remove(&h));
        }
        for chunk in 0..8u64 {
            let got = data_of(c.read(chunk << 20, 1 << 20).unwrap());
            let at = (chunk << 20) as usize;
            assert!(got == model[at..at + (1 << 20)], "MiB {chunk} differs");
        }
        // Large and small writes back to back, each header right behind the previous
        // payload (after a large write the server reads the next header on its own).
        let burst: [(u64, usize); 5] = [
            (0, 1 << 20),
            (1 << 20, 1 << 20),
            (2 << 20, 4096),
            ((2 << 20) + 4096, 100_000),
            (3 << 20, 512),
        ];
        for (i, &(offset, len)) in burst.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j * 5 + i * 11) as u8 | 2).collect();
            handles.insert(c.send(cmd::WRITE, 0, offset, len as u32, &data).unwrap());
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        for _ in 0..burst.len() {
            let (h, o) = c.recv().unwrap();
            assert_eq!(o.errno(), 0, "request {h}");
            assert!(handles.remove(&h));
        }
        for chunk in 0..4u64 {
            let got = data_of(c.read(chunk << 20, 1 << 20).unwrap());
            let at = (chunk << 20) as usize;
            assert!(
                got == model[at..at + (1 << 20)],
                "MiB {chunk} differs after the burst"
            );
        }
        // A connection that dies in the middle of a payload changes nothing.
        let mut d = connect(addr, "lun0", &o).unwrap();
        let header = basalt_nbd::RequestHeader {
            flags: 0,
            kind: cmd::WRITE,
            handle: 1,
            offset: 0,
            len: 1 << 20,
        };
        d.stream_mut().write_all(&header.encode()).unwrap();
        d.stream_mut().write_all(&[0xEE; 300_000]).unwrap();
        drop(d);
        std::thread::sleep(Duration::from_millis(100));
        let got = data_of(c.read(0, 1 << 20).unwrap());
        assert!(got == model[..1 << 20]);
    })
    .await;
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_the_documented_ones() {
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(2048, 4096)); // 8 MiB, 4 KiB blocks
    devices.insert("ro".into(), mem(16, 512));
    let mut c = config(&["lun0", "ro"]);
    c.exports.get_mut("ro").unwrap().read_only = true;
    let (server, addr) = start(c, devices).await;
    blocking(move || {
        let mut c = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        let size = c.size;
        // Agreed block sizes: unaligned is EINVAL.
        assert_eq!(c.read(100, 4096).unwrap().errno(), 22);
        assert_eq!(c.read(size, 4096).unwrap().errno(), 22);
        assert_eq!(c.write(size - 4096, &[1u8; 8192]).unwrap().errno(), 28);
        assert_eq!(
            c.call(cmd::WRITE_ZEROES, 0, size, 4096, &[])
                .unwrap()
                .errno(),
            28
        );
        assert_eq!(c.call(cmd::TRIM, 0, size, 4096, &[]).unwrap().errno(), 22);
        assert_eq!(
            c.call(cmd::BLOCK_STATUS, 0, size, 4096, &[])
                .unwrap()
                .errno(),
            22
        );
        assert_eq!(c.call(42, 0, 0, 0, &[]).unwrap().errno(), 22);
        assert_eq!(
            c.call(cmd::READ, cmd_flags::NO_HOLE, 0, 4096, &[])
                .unwrap()
                .errno(),
            22
        );
        // Larger than the maximum block size.
        assert_eq!(c.read(0, (1 << 25) + 4096).unwrap().errno(), 22);
        // The connection still works.
        assert_eq!(c.read(0, 4096).unwrap().errno(), 0);
        // Read-only: EPERM for every kind of write, reads fine.
        let mut r = connect(addr, "ro", &ClientOptions::default()).unwrap();
        assert!(r.flags & tx_flags::READ_ONLY != 0);
        assert_eq!(r.write(0, &[1u8; 512]).unwrap().errno(), 1);
        assert_eq!(
            r.call(cmd::WRITE_ZEROES, 0, 0, 512, &[]).unwrap().errno(),
            1
        );
        assert_eq!(r.call(cmd::TRIM, 0, 0, 512, &[]).unwrap().errno(), 1);
        assert_eq!(r.read(0, 512).unwrap().errno(), 0);
        assert_eq!(r.call(cmd::FLUSH, 0, 0, 0, &[]).unwrap().errno(), 0);
    })
    .await;
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_requests_without_block_size_agreement_are_served() {
    let dev = mem(256, 4096);
    let mut devices = Devices::new();
    devices.insert("lun0".into(), dev.clone());
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        let o = ClientOptions {
            block_sizes: false,
            ..ClientOptions::default()
        };
        let mut c = connect(addr, "lun0", &o).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 200) as u8 + 1).collect();
        assert_eq!(c.write(1234, &data).unwrap().errno(), 0);
        assert_eq!(data_of(c.read(1234, 10_000).unwrap()), data);
        let around = data_of(c.read(1000, 10_500).unwrap());
        assert!(around[..234].iter().all(|&b| b == 0));
        assert_eq!(&around[234..10_234], &data[..]);
        assert_eq!(
            c.call(cmd::WRITE_ZEROES, 0, 1300, 100, &[])
                .unwrap()
                .errno(),
            0
        );
        let got = data_of(c.read(1234, 10_000).unwrap());
        assert!(got[66..166].iter().all(|&b| b == 0));
        assert_eq!(&got[..66], &data[..66]);
        assert_eq!(&got[166..], &data[166..]);
    })
    .await;
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_and_listing() {
    let mut devices = Devices::new();
    devices.insert("open".into(), mem(16, 512));
    devices.insert("closed".into(), mem(16, 512));
    let mut c = config(&["open", "closed"]);
    c.exports.get_mut("closed").unwrap().allowed_networks = vec!["10.0.0.0/8".parse().unwrap()];
    c.default_export = Some("open".into());
    let (server, addr) = start(c, devices).await;
    blocking(move || {
        let e = connect(addr, "closed", &ClientOptions::default()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("denied"), "{e}");
        // The default export is reached with the empty name, and LIST hides the other.
        let mut c = connect(addr, "", &ClientOptions::default()).unwrap();
        assert_eq!(c.size, 8192);
        let r = c.option(opt::LIST, &[]);
        // Options after GO are not allowed; LIST is checked on a fresh connection.
        drop(r);
        let mut s = TcpStream::connect(addr).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&1u32.to_be_bytes()).unwrap();
        s.write_all(&basalt_nbd::test_utils::ClientMsg::option(opt::LIST, &[]))
            .unwrap();
        let mut got = Vec::new();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).unwrap();
            if kind == rep::ACK {
                break;
            }
            got.push(String::from_utf8(d[4..].to_vec()).unwrap());
        }
        assert_eq!(got, vec!["open".to_string()]);
    })
    .await;
    assert!(server.metrics().exports["closed"].access_denied >= 1);
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(16, 512));
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        let mut good = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        let mut bad = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        bad.stream_mut().write_all(&[0xEE; 64]).unwrap();
        let mut buf = [0u8; 16];
        // The server hangs up without replying.
        assert!(matches!(bad.stream_mut().read(&mut buf), Ok(0) | Err(_)));
        assert_eq!(good.read(0, 512).unwrap().errno(), 0);
        // A handshake with garbage options is closed too.
        let mut s = TcpStream::connect(addr).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&[0xFF; 4]).unwrap();
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    })
    .await;
    let m = server.metrics();
    assert!(m.server.protocol_errors >= 1);
    assert!(m.server.handshakes_failed >= 1);
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfiguration_reaches_open_connections() {
    let a = mem(16, 512);
    let b = mem(16, 512);
    let mut devices = Devices::new();
    devices.insert("a".into(), a.clone());
    devices.insert("b".into(), b.clone());
    let cfg = config(&["a", "b"]);
    let (server, addr) = start(cfg.clone(), devices.clone()).await;
    let (mut ca, mut cb) = blocking(move || {
        (
            connect(addr, "a", &ClientOptions::default()).unwrap(),
            connect(addr, "b", &ClientOptions::default()).unwrap(),
        )
    })
    .await;
    // a becomes read-only, b is removed.
    let mut cfg2 = cfg.clone();
    cfg2.exports.get_mut("a").unwrap().read_only = true;
    cfg2.exports.remove("b");
    let mut devices2 = devices.clone();
    devices2.remove("b");
    server
        .reconfigure(cfg2.clone(), devices2.clone(), None)
        .await
        .unwrap();
    let (ca2, cb2) = blocking(move || {
        assert_eq!(ca.write(0, &[1u8; 512]).unwrap().errno(), 1);
        assert_eq!(ca.read(0, 512).unwrap().errno(), 0);
        // b's connection was drained and closed.
        let r = cb.read(0, 512);
        assert!(r.is_err() || r.unwrap().errno() == 108);
        (ca, cb)
    })
    .await;
    drop(cb2);
    // Restricting a's networks drains the loopback client.
    let mut cfg3 = cfg2.clone();
    cfg3.exports.get_mut("a").unwrap().allowed_networks =
        vec![Cidr::new([10, 0, 0, 0].into(), 8).unwrap()];
    server.reconfigure(cfg3, devices2, None).await.unwrap();
    blocking(move || {
        let mut ca = ca2;
        let r = ca.read(0, 512);
        assert!(r.is_err() || r.unwrap().errno() == 108);
    })
    .await;
    // A configuration error changes nothing.
    let mut bad = cfg.clone();
    bad.tls = TlsMode::Require;
    assert!(server.reconfigure(bad, devices, None).await.is_err());
    server.stop(Duration::from_secs(5)).await;
}

/// CAN_MULTI_CONN: a write completed on one connection is made durable by a FLUSH on
/// another. The device has a volatile cache that a crash empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_on_one_connection_covers_writes_of_another() {
    let fault = Arc::new(FaultDev::new(mem(2048, 512)));
    fault.set_write_cache(true);
    let mut devices = Devices::new();
    devices.insert("lun0".into(), fault.clone() as SharedBlockDev);
    let (server, addr) = start(config(&["lun0"]), devices).await;
    blocking(move || {
        let mut w = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        let mut f = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        assert!(w.flags & tx_flags::CAN_MULTI_CONN != 0);
        assert_eq!(w.write(0, &[7u8; 4096]).unwrap().errno(), 0);
        assert_eq!(w.write(8192, &[8u8; 4096]).unwrap().errno(), 0);
        assert_eq!(f.call(cmd::FLUSH, 0, 0, 0, &[]).unwrap().errno(), 0);
        // Written after the flush: not covered.
        assert_eq!(w.write(65536, &[9u8; 4096]).unwrap().errno(), 0);
    })
    .await;
    fault.crash();
    fault.recover().await;
    let inner = fault.inner();
    assert!(inner.read(0, 4096).await.unwrap().iter().all(|&b| b == 7));
    assert!(inner
        .read(8192, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 8));
    assert!(inner
        .read(65536, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_answers_in_flight_and_refuses_handshakes() {
    let fault = Arc::new(FaultDev::new(mem(2048, 512)));
    fault.set_latency(
        basalt_blockdev::fault::FaultOp::Write,
        Duration::from_millis(300),
    );
    let mut devices = Devices::new();
    devices.insert("lun0".into(), fault.clone() as SharedBlockDev);
    let (server, addr) = start(config(&["lun0"]), devices).await;
    let (mut c, h) = blocking(move || {
        let mut c = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        let h = c.send(cmd::WRITE, 0, 0, 512, &[3u8; 512]).unwrap();
        (c, h)
    })
    .await;
    // Let the write reach the device, then stop while it is in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopping = tokio::spawn(server.stop(Duration::from_secs(5)));
    let (got, o) = blocking(move || c.recv().unwrap()).await;
    assert_eq!(got, h);
    assert_eq!(o.errno(), 0);
    stopping.await.unwrap();
    assert!(fault.read(0, 512).await.unwrap().iter().all(|&b| b == 3));
    // The listener is gone.
    assert!(TcpStream::connect(addr).is_err());
}

/// A client mid-handshake when the server stops gets `NBD_REP_ERR_SHUTDOWN` for its
/// next option, however its bytes and the stop interleave: a stopping server never
/// completes a handshake (a client that reconnects at once must not land on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_in_progress_when_the_server_stops_is_refused() {
    use basalt_nbd::test_utils::{ClientMsg, OptionReply};
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(2048, 512));
    let (server, addr) = start(config(&["lun0"]), devices).await;
    let mut s = blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    })
    .await;
    let stopping = tokio::spawn(server.stop(Duration::from_secs(5)));
    // The stop has begun once the listener is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "listener outlived stop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replies = blocking(move || {
        s.write_all(&ClientMsg::option(opt::GO, &opt_data_info("lun0", &[])))
            .unwrap();
        // One reply (the client then disconnects, as it would on this error).
        let mut reply = vec![0u8; 20];
        s.read_exact(&mut reply).unwrap();
        let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
        reply.resize(20 + len, 0);
        s.read_exact(&mut reply[20..]).unwrap();
        OptionReply::parse_all(&reply)
    })
    .await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].kind, rep::ERR_SHUTDOWN, "{replies:?}");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_plaintext_options() {
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(16, 512));
    let mut c = config(&["lun0"]);
    c.tls = TlsMode::Require;
    assert!(NbdServer::start(c.clone(), devices.clone(), None)
        .await
        .is_err());
    let tls = test_tls_config();
    let server = NbdServer::start(c, devices, Some(tls)).await.unwrap();
    let addr = server.local_addrs().await[0];
    blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&1u32.to_be_bytes()).unwrap();
        s.write_all(&basalt_nbd::test_utils::ClientMsg::option(
            opt::GO,
            &opt_data_info("lun0", &[]),
        ))
        .unwrap();
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            rep::ERR_TLS_REQD
        );
    })
    .await;
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_and_random_io_match_a_model() {
    let dev = mem(4096, 512); // 2 MiB
    let mut devices = Devices::new();
    devices.insert("lun0".into(), dev.clone());
    let (server, addr) = start(config(&["lun0"]), devices).await;
    // Each connection owns a disjoint quarter; a model per quarter.
    let mut tasks = Vec::new();
    for q in 0..4u64 {
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut c = connect(addr, "lun0", &ClientOptions::default()).unwrap();
            let base = q * (512 << 10);
            let mut model = vec![0u8; 512 << 10];
            let mut seed = q + 1;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..200 {
                let off = (next() % 1000) * 512;
                let len = ((next() % 16 + 1) * 512).min((512 << 10) - off);
                match next() % 4 {
                    0 | 1 => {
                        let b = (next() % 255) as u8 + 1;
                        let d = vec![b; len as usize];
                        assert_eq!(c.write(base + off, &d).unwrap().errno(), 0);
                        model[off as usize..(off + len) as usize].fill(b);
                    }
                    2 => {
                        assert_eq!(
                            c.call(cmd::WRITE_ZEROES, 0, base + off, len as u32, &[])
                                .unwrap()
                                .errno(),
                            0
                        );
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    _ => {
                        let got = data_of(c.read(base + off, len as u32).unwrap());
                        assert_eq!(got, &model[off as usize..(off + len) as usize]);
                    }
                }
            }
            let got = data_of(c.read(base, 512 << 10).unwrap());
            assert_eq!(got, model);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let _ = dev
        .write(0, Bytes::from(vec![0u8; 512]), WriteFlags::default())
        .await;
    server.stop(Duration::from_secs(5)).await;
}

/// A self-signed server configuration for tests that only need TLS to be configured.
fn test_tls_config() -> Arc<rustls::ServerConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_listener_serves_outside_the_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("nbd.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut c = config(&["lun0"]);
    c.listen.clear();
    let mut devices = Devices::new();
    devices.insert("lun0".into(), mem(2048, 512));
    let server = NbdServer::start(c.clone(), devices.clone(), None)
        .await
        .unwrap();
    server.serve_unix(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A reconfiguration (no TCP listeners in it) keeps the unix listener.
    c.exports.get_mut("lun0").unwrap().description = Some("VM disk".into());
    server.reconfigure(c, devices, None).await.unwrap();
    assert!(server.local_addrs().await.is_empty());
    let p = path.clone();
    blocking(move || {
        let s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = BlockingClient::connect(s, "lun0", &ClientOptions::default()).unwrap();
        assert_eq!(c.size, 1 << 20);
        assert_eq!(c.write(4096, &[7u8; 4096]).unwrap().errno(), 0);
        assert_eq!(data_of(c.read(4096, 4096).unwrap()), vec![7u8; 4096]);
        c.disconnect().unwrap();
    })
    .await;
    assert_eq!(server.metrics().exports["lun0"].connections_total, 1);
    server.stop(Duration::from_secs(5)).await;
    assert!(!path.exists(), "the socket file outlived the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_of_a_cached_file_go_out_from_the_page_cache_intact() {
    use basalt_blockdev::{DirectMode, UringFile, UringOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let size = 8usize << 20;
    let content: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &content).unwrap();
    let file = Arc::new(
        UringFile::open(
            &path,
            &UringOptions {
                direct: DirectMode::Off,
                block_size: Some(512),
                ..UringOptions::default()
            },
        )
        .unwrap(),
    );
    let mut devices = Devices::new();
    devices.insert("lun0".into(), file.clone() as SharedBlockDev);
    let (server, addr) = start(config(&["lun0"]), devices).await;
    let content = Arc::new(content);
    // (offset, length): from the page cache when at least 64 KiB and block-aligned.
    let reads: [(u64, u32); 6] = [
        (0, 1 << 20),
        (512, 65536),
        (3 << 20, 4 << 20),
        (7 << 20, 1 << 20),
        (4096, 4096),
        (1000, 100_000),
    ];
    let from_cache = 4;
    let c2 = content.clone();
    blocking(move || {
        for structured in [true, false] {
            let o = ClientOptions {
                structured,
                block_sizes: false,
                ..ClientOptions::default()
            };
            let mut c = connect(addr, "lun0", &o).unwrap();
            // One at a time, then all pipelined with a small write among them that
            // touches none of them.
            for &(off, len) in &reads {
                let got = data_of(c.read(off, len).unwrap());
                assert!(got == c2[off as usize..][..len as usize], "{off}+{len}");
            }
            let mut expect = std::collections::BTreeMap::new();
            for &(off, len) in &reads {
                expect.insert(c.send(cmd::READ, 0, off, len, &[]).unwrap(), (off, len));
            }
            let w = c.send(cmd::WRITE, 0, 2 << 20, 4096, &c2[2 << 20..][..4096]);
            let w = w.unwrap();
            for _ in 0..=reads.len() {
                let (h, o) = c.recv().unwrap();
                if h == w {
                    assert_eq!(o.errno(), 0);
                    continue;
                }
                let (off, len) = expect.remove(&h).unwrap();
                let got = data_of(o);
                assert!(got == c2[off as usize..][..len as usize], "{off}+{len}");
            }
            c.disconnect().unwrap();
        }
    })
    .await;
    let sent = file.driver_stats().cached_ranges;
    assert_eq!(sent, 2 * 2 * from_cache, "{:?}", file.driver_stats());

    // Out of the page cache, the same reads are read (and then cached) as usual.
    file.flush().await.unwrap();
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: plain advice on a descriptor we own.
    let r = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    let c2 = content.clone();
    blocking(move || {
        let mut c = connect(addr, "lun0", &ClientOptions::default()).unwrap();
        let got = data_of(c.read(5 << 20, 1 << 20).unwrap());
        assert!(got == c2[5 << 20..][..1 << 20]);
        c.disconnect().unwrap();
    })
    .await;
    assert_eq!(file.driver_stats().cached_ranges, sent);
    server.stop(Duration::from_secs(5)).await;
}

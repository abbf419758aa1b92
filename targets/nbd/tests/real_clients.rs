//! The server against real NBD clients on loopback: `nbdinfo` (export, size, `--map`
//! after data, zeroes and trims), `nbdcopy` round trips, `qemu-img convert` both ways and
//! `qemu-img compare`, fio's nbd engine with verification, TLS with `nbdinfo` and
//! `qemu-img` trusting a test CA made with rcgen, `tls = require` refusing plaintext,
//! access control, and a read-only export refusing writes.
//!
//! The clients come from Debian packages (`libnbd-bin`, `qemu-utils`, `fio`) that
//! `deploy/install-deps.sh test` installs; a missing tool fails the test with that hint
//! rather than letting it pass without running.

// Test helpers outside #[test] functions may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use basalt_blockdev::uring::create_sparse_file;
use basalt_blockdev::{BlockDev, DirectMode, MemDev, SharedBlockDev, UringFile, UringOptions};
use basalt_nbd::{Devices, ExportConfig, NbdConfig, NbdServer, TlsMode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;

fn have(tools: &[&str]) -> bool {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{t} is not installed: run deploy/install-deps.sh test (Debian: libnbd-bin qemu-utils fio)"
        );
    }
    true
}

async fn run(cmd: &str, args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(cmd).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} {args:?} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    out
}

async fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args).await;
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

async fn serve(c: NbdConfig, name: &str, dev: SharedBlockDev) -> (NbdServer, SocketAddr) {
    let mut devices = Devices::new();
    devices.insert(name.into(), dev);
    let s = NbdServer::start(c, devices, None).await.unwrap();
    let a = s.local_addrs().await[0];
    (s, a)
}

fn uri(addr: SocketAddr, export: &str) -> String {
    format!("nbd://{addr}/{export}")
}

/// A UringFile on a new sparse file of `size` bytes in `dir`.
fn uring_dev(dir: &Path, name: &str, size: u64) -> (SharedBlockDev, PathBuf) {
    let path = dir.join(name);
    create_sparse_file(&path, size).unwrap();
    let f = UringFile::open(
        &path,
        &UringOptions {
            direct: DirectMode::Auto,
            ..UringOptions::default()
        },
    )
    .unwrap();
    (Arc::new(f), path)
}

/// Deterministic bytes with zero stretches, so copies exercise holes and data.
fn test_image(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        if i % 3 == 1 {
            continue; // leave zero
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_the_export_and_a_truthful_map() {
    if !have(&["nbdinfo", "qemu-io"]) {
        return;
    }
    // MemDev reports unallocated 64 KiB chunks as holes.
    let dev: SharedBlockDev = Arc::new(MemDev::new(16 << 11, 512)); // 16 MiB
    let mut c = config(&["lun0"]);
    c.exports.get_mut("lun0").unwrap().description = Some("test LUN".into());
    let (server, addr) = serve(c, "lun0", dev.clone()).await;
    let u = uri(addr, "lun0");

    let json = ok("nbdinfo", &["--json", &u]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "lun0");
    assert_eq!(e["export-size"], 16u64 << 20);
    assert_eq!(e["description"], "test LUN");
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["block_size_minimum"], 512);

    // Fresh: one hole over everything.
    let map = ok("nbdinfo", &["--map", "--json", &u]).await;
    let m: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(m.as_array().unwrap().len(), 1, "{map}");
    assert_eq!(m[0]["type"], 3, "{map}");

    // Data at 1 MiB (64 KiB), data at 4 MiB (1 MiB) then zeroed, data at 8 MiB (1 MiB)
    // then trimmed.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 4M 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0xef 8M 1M",
            "-c",
            "discard 8M 1M",
            "-c",
            "flush",
            &u,
        ],
    )
    .await;
    let map = ok("nbdinfo", &["--map", "--json", &u]).await;
    let m: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let extents: Vec<(u64, u64, u64)> = m
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 65536, 0),
            ((1 << 20) + 65536, (15 << 20) - 65536, 3),
        ],
        "{map}"
    );
    // The data is what was written, the zeroed and trimmed ranges read as zero.
    let got = dev.read(1 << 20, 65536).await.unwrap();
    assert!(got.iter().all(|&b| b == 0xab));
    assert!(dev
        .read(4 << 20, 1 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(dev
        .read(8 << 20, 1 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // Totals agree.
    let totals = ok("nbdinfo", &["--map", "--totals", &u]).await;
    assert!(totals.contains("hole,zero"), "{totals}");
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_is_byte_identical() {
    if !have(&["nbdcopy", "cmp"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 24 << 20;
    let src = dir.path().join("src.img");
    std::fs::write(&src, test_image(size)).unwrap();
    let (dev, _) = uring_dev(dir.path(), "export.img", size as u64);
    let (server, addr) = serve(config(&["lun0"]), "lun0", dev).await;
    let u = uri(addr, "lun0");
    let back = dir.path().join("back.img");
    ok("nbdcopy", &["--flush", src.to_str().unwrap(), &u]).await;
    ok("nbdcopy", &[&u, back.to_str().unwrap()]).await;
    ok("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()]).await;
    // Several connections at once (multi-conn) and a synchronous copy give the same.
    let back2 = dir.path().join("back2.img");
    ok("nbdcopy", &["--connections=4", &u, back2.to_str().unwrap()]).await;
    ok("cmp", &[src.to_str().unwrap(), back2.to_str().unwrap()]).await;
    let m = server.metrics();
    assert!(m.exports["lun0"].commands["read"].bytes >= 2 * size as u64 - 16 * 65536);
    server.stop(Duration::from_secs(5)).await;

    // A buffered file: what nbdcopy wrote is in the page cache, so its reads (256 KiB
    // requests) go out with sendfile, over one connection and over four.
    let path = dir.path().join("buffered.img");
    create_sparse_file(&path, size as u64).unwrap();
    let options = UringOptions {
        direct: DirectMode::Off,
        ..UringOptions::default()
    };
    let file = Arc::new(UringFile::open(&path, &options).unwrap());
    let (server, addr) = serve(config(&["lun0"]), "lun0", file.clone()).await;
    let u = uri(addr, "lun0");
    ok("nbdcopy", &[src.to_str().unwrap(), &u]).await;
    for (name, conns) in [
        ("back3.img", "--connections=1"),
        ("back4.img", "--connections=4"),
    ] {
        let back = dir.path().join(name);
        ok("nbdcopy", &[conns, &u, back.to_str().unwrap()]).await;
        ok("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()]).await;
    }
    let s = file.driver_stats();
    assert!(s.cached_ranges > 0, "{s:?}");
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_to_and_from_nbd() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 << 20;
    let src = dir.path().join("src.raw");
    std::fs::write(&src, test_image(size)).unwrap();
    let (dev, _) = uring_dev(dir.path(), "export.img", size as u64);
    let (server, addr) = serve(config(&["lun0"]), "lun0", dev).await;
    let u = uri(addr, "lun0");
    let s = src.to_str().unwrap();
    ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, &u],
    )
    .await;
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &u]).await;
    let back = dir.path().join("back.qcow2");
    let b = back.to_str().unwrap();
    ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &u, b]).await;
    ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s, b]).await;
    let info = ok("qemu-img", &["info", "--output=json", &u]).await;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], size as u64);
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies() {
    if !have(&["fio"]) {
        return;
    }
    let engines = run("fio", &["--enghelp"]).await;
    assert!(
        String::from_utf8_lossy(&engines.stdout).contains("nbd"),
        "this fio has no nbd engine"
    );
    let dir = tempfile::tempdir().unwrap();
    let (dev, _) = uring_dev(dir.path(), "export.img", 32 << 20);
    let (server, addr) = serve(config(&["lun0"]), "lun0", dev).await;
    let u = uri(addr, "lun0");
    for (rw, bs) in [("randwrite", "4k"), ("write", "1m")] {
        ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={u}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--iodepth=32",
                "--size=32m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                &format!("--directory={}", dir.path().display()),
                "--output-format=json",
            ],
        )
        .await;
    }
    let m = server.metrics();
    assert_eq!(m.exports["lun0"].commands["read"].errors, 0);
    assert_eq!(m.exports["lun0"].commands["write"].errors, 0);
    server.stop(Duration::from_secs(5)).await;
}

/// A test CA and a server certificate for 127.0.0.1 and localhost; writes the CA as
/// `ca-cert.pem` into `dir` (where libnbd's `tls-certificates` and QEMU's
/// `tls-creds-x509` look for it).
fn tls_setup(dir: &Path) -> Arc<rustls::ServerConfig> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Basalt test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_nbdinfo_and_qemu_img_and_plaintext_refused() {
    if !have(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    std::fs::create_dir(&certs).unwrap();
    let tls = tls_setup(&certs);
    let dev: SharedBlockDev = Arc::new(MemDev::new(8 << 11, 512));
    let mut c = config(&["lun0"]);
    c.tls = TlsMode::Require;
    let mut devices = Devices::new();
    devices.insert("lun0".into(), dev);
    let server = NbdServer::start(c, devices, Some(tls)).await.unwrap();
    let addr = server.local_addrs().await[0];
    let tls_uri = format!("nbds://{addr}/lun0?tls-certificates={}", certs.display());

    let json = ok("nbdinfo", &["--json", &tls_uri]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["TLS"], true, "{json}");
    assert_eq!(v["exports"][0]["export-size"], 8u64 << 20);
    ok("nbdinfo", &["--map", &tls_uri]).await;

    // Plaintext is refused.
    // (libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as a generic refusal of opt_go.)
    let failed_before = server.metrics().server.tls_handshakes;
    let out = run("nbdinfo", &[&uri(addr, "lun0")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opt_go"), "{err}");
    assert_eq!(server.metrics().server.tls_handshakes, failed_before);

    // QEMU with an x509 credentials object trusting the CA: write through TLS, read back.
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        certs.display()
    );
    let image = format!(
        "driver=nbd,host=127.0.0.1,port={},export=lun0,tls-creds=tls0",
        addr.port()
    );
    ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x5a 0 64k",
            // Large payloads, received into buffers of their own under TLS too.
            "-c",
            "write -P 0x5b 1M 2M",
        ],
    )
    .await;
    let out = ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &image,
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0x5b 1M 2M",
        ],
    )
    .await;
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(out.contains("read 2097152/2097152"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let info = ok(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &image],
    )
    .await;
    assert!(info.contains("8 MiB"), "{info}");
    assert!(server.metrics().server.tls_handshakes >= 4);
    server.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_and_read_only_with_real_clients() {
    if !have(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev: SharedBlockDev = Arc::new(MemDev::new(4 << 11, 512));
    let mut c = config(&["closed", "ro"]);
    c.exports.get_mut("closed").unwrap().allowed_networks = vec!["10.0.0.0/8".parse().unwrap()];
    c.exports.get_mut("ro").unwrap().read_only = true;
    let mut devices = Devices::new();
    devices.insert("closed".into(), dev.clone());
    devices.insert("ro".into(), dev.clone());
    let server = NbdServer::start(c, devices, None).await.unwrap();
    let addr = server.local_addrs().await[0];

    let out = run("nbdinfo", &[&uri(addr, "closed")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opt_go"), "{err}");
    assert!(server.metrics().exports["closed"].access_denied >= 1);
    // The list shows only what this client may use.
    let list = ok("nbdinfo", &["--list", "--json", &uri(addr, "")]).await;
    assert!(!list.contains("\"closed\""), "{list}");
    assert!(list.contains("\"ro\""), "{list}");

    let json = ok("nbdinfo", &["--json", &uri(addr, "ro")]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![1u8; 4 << 20]).unwrap();
    let out = run("nbdcopy", &[src.to_str().unwrap(), &uri(addr, "ro")]).await;
    assert!(!out.status.success());
    assert!(dev.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    server.stop(Duration::from_secs(5)).await;
}

//! End to end with the QEMU runner: the test guest (deploy/guest/build.sh: Debian's
//! cloud kernel and busybox-static) boots under TCG through the whole stack a daemon
//! uses — a VM folder in a `VmStore`, the `Supervisor`, a `basalt vmm` process
//! (`basalt-compute-vmm`), QEMU over QMP — with its disk served by Basalt's own NBD
//! server from a Basalt BlockDev (`UringFile`) and its NIC on a TAP. The guest mounts
//! the disk, reads a file the host put there, writes one back, checks its NIC and
//! prints markers on the serial console; the host then reads the disk back through
//! Basalt (the NBD client BlockDev) and finds the guest's file with debugfs.
//!
//! Needs root (TAP), qemu-system-x86_64, e2fsprogs (mkfs.ext4, debugfs), iproute2, and
//! apt access for the guest build; fails with a clear message when one is missing.

use basalt_blockdev::{BlockDev, SharedBlockDev, UringFile, UringOptions};
use basalt_compute::definition::VmDefinition;
use basalt_compute::launch::{DiskEndpoint, NicEndpoint, VmmArgs};
use basalt_compute::nbd::{NbdAddress, NbdDev};
use basalt_compute::store::{VmState, VmStore};
use basalt_compute::supervisor::{Launch, Resolver, Supervisor, SupervisorConfig};
use basalt_nbd::{Devices, ExportConfig, NbdConfig, NbdServer};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn require(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is missing: apt-get install {package}");
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "failed: {cmd}");
}

/// Builds (or reuses) the test guest; returns (vmlinuz, initrd.gz).
fn guest() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "deploy/guest/build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::env::var_os("BASALT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/basalt-guest")
        });
    (dir.join("vmlinuz"), dir.join("initrd.gz"))
}

/// A persistent TAP with the host side up; deleted on drop.
struct TapIf(String);

impl TapIf {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        sh(&format!(
            "ip tuntap add dev {name} mode tap && ip link set {name} up"
        ));
        TapIf(name.to_string())
    }
}

impl Drop for TapIf {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The daemon's part in this test: the LUN is exported by Basalt's NBD server on
/// loopback, the NIC is a TAP by name.
struct TestResolver {
    nbd: String,
    tap: String,
}

impl Resolver for TestResolver {
    fn resolve(&self, _def: &VmDefinition, dir: &Path) -> Result<Launch, String> {
        let mut args = VmmArgs::new(dir);
        args.disks
            .push(("root".into(), DiskEndpoint::parse(&self.nbd)?));
        args.nics
            .push(("eth0".into(), NicEndpoint::TapName(self.tap.clone())));
        Ok(Launch {
            args,
            fds: Vec::new(),
        })
    }
}

struct Rig {
    _tmp: tempfile::TempDir,
    sup: Arc<Supervisor>,
    server: Option<NbdServer>,
    nbd_uri: String,
    image: PathBuf,
    token: String,
    _tap: TapIf,
}

async fn rig(name: &str, end: &str, tap: &str) -> Rig {
    require(
        "qemu-system-x86_64",
        "qemu-system-x86 (from bookworm-backports)",
    );
    require("mkfs.ext4", "e2fsprogs");
    require("debugfs", "e2fsprogs");
    require("ip", "iproute2");
    let (kernel, initrd) = guest();
    let tmp = tempfile::tempdir().expect("tmp");
    // The LUN: an ext4 image with a file from the host, behind a Basalt BlockDev.
    let token = format!("token-{}-{}", std::process::id(), name);
    let seed = tmp.path().join("seed");
    std::fs::create_dir(&seed).expect("seed");
    std::fs::write(seed.join("basalt-in.txt"), &token).expect("seed file");
    let image = tmp.path().join("lun0.img");
    sh(&format!(
        "truncate -s 64M {img} && mkfs.ext4 -q -F -d {seed} {img}",
        img = image.display(),
        seed = seed.display()
    ));
    let lun: SharedBlockDev =
        Arc::new(UringFile::open(&image, &UringOptions::default()).expect("open LUN image"));
    let mut devices = Devices::new();
    devices.insert("lun0".to_string(), lun);
    let mut cfg = NbdConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        ..NbdConfig::default()
    };
    cfg.exports.insert("lun0".into(), ExportConfig::default());
    let server = NbdServer::start(cfg, devices, None)
        .await
        .expect("Basalt NBD server");
    let port = server.local_addrs().await[0].port();
    let nbd_uri = format!("nbd://127.0.0.1:{port}/lun0");

    let store = VmStore::open(tmp.path().join("vms")).expect("store");
    let def = VmDefinition::from_json(&format!(
        r#"{{"name":"{name}","vcpus":1,"memory_mib":256,"runner":"qemu",
            "boot":{{"kind":"kernel","kernel":"{k}","initrd":"{i}",
                     "cmdline":"console=ttyS0 panic=-1 quiet basalt.end={end}"}},
            "disks":[{{"id":"root","source":{{"lun":"pool0/lun0"}}}}],
            "nics":[{{"id":"eth0","port_group":"test-pg"}}]}}"#,
        k = kernel.display(),
        i = initrd.display(),
    ))
    .expect("definition");
    store.create(&def).expect("create VM");
    let tapif = TapIf::new(tap);
    let mut scfg = SupervisorConfig::new(env!("CARGO_BIN_EXE_basalt-compute-vmm"));
    scfg.args_prefix.clear();
    scfg.guest_grace = Duration::from_secs(2);
    scfg.stop_timeout = Duration::from_secs(15);
    let sup = Supervisor::new(
        store,
        scfg,
        Arc::new(TestResolver {
            nbd: nbd_uri.clone(),
            tap: tap.into(),
        }),
    );
    Rig {
        _tmp: tmp,
        sup,
        server: Some(server),
        nbd_uri,
        image,
        token,
        _tap: tapif,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_boots_the_test_guest_from_a_basalt_lun() {
    let mut r = rig("e2e1", "poweroff", "bte2e1").await;
    let started = Instant::now();
    r.sup.start("e2e1").await.expect("start");
    let st = r
        .sup
        .wait_for("e2e1", Duration::from_secs(120), |s| !s.state.is_active())
        .await
        .expect("the guest should power off by itself");
    let (log, _) = r.sup.console_paths("e2e1");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let vmm_log =
        std::fs::read_to_string(r.sup.store().dir("e2e1").join("vmm.log")).unwrap_or_default();
    assert_eq!(
        st.state,
        VmState::Stopped,
        "status {st:?}\nvmm.log:\n{vmm_log}\nconsole:\n{console}"
    );
    let exit = st.last_exit.expect("exit record");
    assert_eq!(exit.code, Some(0));
    assert_eq!(exit.reason, "guest powered off", "{vmm_log}");
    assert!(
        console.contains("BASALT-GUEST-READY"),
        "no marker; console:\n{console}"
    );
    assert!(
        console.contains(&format!("BASALT: disk read {}", r.token)),
        "guest did not read the host's file:\n{console}"
    );
    assert!(
        console.contains("BASALT: disk wrote guest.txt"),
        "{console}"
    );
    let def = r.sup.store().get("e2e1").expect("def");
    let mac = def
        .nic_mac(0)
        .expect("mac")
        .map(|b| format!("{b:02x}"))
        .join(":");
    assert!(
        console.contains(&format!("BASALT: nic eth0 mac={mac} state=up")),
        "{console}"
    );
    assert!(console.contains("BASALT: balloon bound"), "{console}");
    eprintln!("boot to power-off under TCG: {:?}", started.elapsed());

    // Read the whole disk back through Basalt (the NBD client BlockDev against Basalt's
    // NBD server) and let debugfs find the guest's file in that copy.
    let dev = NbdDev::connect(&NbdAddress::parse(&r.nbd_uri).expect("uri"))
        .await
        .expect("connect");
    let size = dev.geometry().capacity_bytes();
    let copy = r.image.with_extension("readback");
    let mut f = std::fs::File::create(&copy).expect("copy");
    let mut off = 0;
    while off < size {
        let n = (4u64 << 20).min(size - off);
        let data = dev.read(off, n as usize).await.expect("read back");
        f.write_all(&data).expect("write copy");
        off += n;
    }
    drop(f);
    drop(dev);
    let out = Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&copy)
        .output()
        .expect("debugfs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("written by the guest on"),
        "guest.txt: {text:?}"
    );
    if let Some(s) = r.server.take() {
        s.stop(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_attach_and_stop_a_running_guest() {
    let r = rig("e2e2", "shell", "bte2e2").await;
    r.sup.start("e2e2").await.expect("start");
    let (log, sock) = r.sup.console_paths("e2e2");
    // Wait for the shell.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("BASALT-GUEST-READY") {
            break;
        }
        assert!(Instant::now() < deadline, "guest never got ready:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Attach (as `basalt vm console` does) and run a command in the guest.
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).expect("attach");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    conn.write_all(b"\necho attach-$((40+2))\n").expect("type");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("attach-42") {
        let n = conn.read(&mut buf).expect("console output");
        assert!(n > 0, "console closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    // Stop: SIGTERM to the VMM, ACPI power button (the busybox guest ignores it), QMP
    // quit after the grace period.
    let st = r.sup.stop("e2e2").await.expect("stop");
    assert_eq!(st.state, VmState::Stopped, "{st:?}");
    let exit = st.last_exit.expect("exit");
    assert!(exit.requested);
    assert!(exit.reason.starts_with("stopped on request"), "{exit:?}");
    assert!(std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("attach-42"));
}

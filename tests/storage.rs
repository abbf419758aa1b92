//! Pools, LUNs and targets end to end: RAID pools on file disks, LUNs written and read
//! through real NBD and iSCSI clients (nbdcopy, nbdinfo, iscsi-ls, qemu-img), a failed
//! disk with a spare rebuilding, restart, and import on a second appliance.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step is a failed test

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A desired state with `n` file disks of `size` under `dir`, the API and NBD on
/// ephemeral ports.
fn disks_doc(dir: &Path, n: usize, size: &str) -> String {
    let mut s = String::from("version = 1\n[api]\nlisten = [\"127.0.0.1:0\"]\n");
    for i in 0..n {
        s += &format!(
            "\n[[disk]]\nname = \"d{i}\"\npath = \"{}\"\nkind = \"file\"\nsize = \"{size}\"\n",
            dir.join(format!("d{i}.img")).display()
        );
    }
    s
}

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.cli(&a).ok().stdout).unwrap()
}

fn nbd_url(d: &Daemon, export: &str) -> String {
    let info = json(d, &["target", "nbd", "show"]);
    let addr = info["listening"][0]
        .as_str()
        .expect("NBD listening")
        .to_string();
    format!("nbd://{addr}/{export}")
}

fn random_file(path: &Path, mib: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; mib << 20];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn same_prefix(a: &Path, b: &Path, len: usize) {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert!(a.len() >= len && b.len() >= len);
    assert!(a[..len] == b[..len], "contents differ");
}

/// Polls the pool until `pred` holds on its JSON status.
fn wait_pool(
    d: &Daemon,
    pool: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = json(d, &["pool", "status", pool]);
        if pred(&p[0]) {
            return p[0].clone();
        }
        assert!(Instant::now() < deadline, "pool never became {what}: {p:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Setup {
    dir: tempfile::TempDir,
    d: Daemon,
    data: PathBuf,
}

/// A RAID5 pool over d0-d2 with d3 as spare, LUN vm1 (64 MiB written through NBD).
fn setup() -> Setup {
    let dir = tempdir();
    let d = Daemon::start(
        &dir.path().join("var"),
        Some(&disks_doc(dir.path(), 5, "256M")),
    );
    d.cli(&[
        "pool", "create", "p0", "--raid", "5", "--chunk", "64K", "--spare", "d3", "d0", "d1", "d2",
    ])
    .ok();
    d.cli(&["lun", "create", "vm1", "--pool", "p0", "--size", "128M"])
        .ok();
    d.cli(&["target", "nbd", "set", "--listen", "127.0.0.1:0"])
        .ok();
    d.cli(&["target", "nbd", "export", "vm1"]).ok();
    let data = dir.path().join("data.img");
    random_file(&data, 64, 1);
    run("nbdcopy", &[data.to_str().unwrap(), &nbd_url(&d, "vm1")]);
    Setup { dir, d, data }
}

fn read_back(s: &Setup, d: &Daemon, export: &str, name: &str) -> PathBuf {
    let out = s.dir.path().join(name);
    let _ = std::fs::remove_file(&out);
    run("nbdcopy", &[&nbd_url(d, export), out.to_str().unwrap()]);
    out
}

#[test]
fn pool_lun_nbd_and_iscsi_end_to_end() {
    let s = setup();
    let d = &s.d;
    let back = read_back(&s, d, "vm1", "back.img");
    same_prefix(&s.data, &back, 64 << 20);

    // nbdinfo --map: the written 64 MiB are data, the rest a hole.
    let map = run("nbdinfo", &["--map", &nbd_url(d, "vm1")]);
    assert!(
        map.lines()
            .any(|l| l.contains("67108864") && l.contains("hole")),
        "{map}"
    );

    let luns = json(d, &["lun", "list"]);
    assert_eq!(luns[0]["name"], "vm1");
    assert!(luns[0]["allocated_bytes"].as_u64().unwrap() >= 64 << 20);
    let pool = json(d, &["pool", "status", "p0"]);
    assert_eq!(pool[0]["state"], "online", "{pool:#}");
    let text = d.cli(&["pool", "status"]).ok().stdout;
    assert!(
        text.contains("raid5") && text.contains("[UUU]") && text.contains("(S)"),
        "{text}"
    );

    // iSCSI: discovery lists only what the ACL allows; qemu-img reads what NBD wrote.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let portal = format!("127.0.0.1:{port}");
    let iqn = "iqn.2026-11.io.basalt:test";
    d.cli(&["target", "iscsi", "create", iqn, "--portal", &portal])
        .ok();
    d.cli(&["target", "iscsi", "lun", iqn, "vm1"]).ok();
    let ls = Command::new("iscsi-ls")
        .args([
            "-i",
            "iqn.2026-11.test:stranger",
            "-s",
            &format!("iscsi://{portal}/"),
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains(iqn),
        "no demo mode: a stranger sees nothing"
    );
    d.cli(&["target", "iscsi", "acl", iqn, "iqn.2026-11.test:init1"])
        .ok();
    let ls = run(
        "iscsi-ls",
        &[
            "-i",
            "iqn.2026-11.test:init1",
            "-s",
            &format!("iscsi://{portal}/"),
        ],
    );
    assert!(ls.contains(iqn) && ls.contains("Lun:0"), "{ls}");
    let via_iscsi = s.dir.path().join("iscsi.img");
    run("qemu-img", &[
        "convert", "-O", "raw",
        "--image-opts", &format!("driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=0,initiator-name=iqn.2026-11.test:init1"),
        via_iscsi.to_str().unwrap(),
    ]);
    same_prefix(&s.data, &via_iscsi, 64 << 20);

    // The configuration round-trips with every section, and the metrics pass promtool.
    let exported = d.cli(&["config", "export"]).ok().stdout;
    for section in ["[[pool]]", "[[lun]]", "[nbd]", "[[iscsi.targets]]"] {
        assert!(exported.contains(section), "{section} missing:\n{exported}");
    }
    let file = s.dir.path().join("all.toml");
    std::fs::write(&file, &exported).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("Nothing to change"), "{}", r.stdout);
    let (_, scrape) = d.curl("/metrics", None, &[]);
    for name in [
        "basalt_md_state{pool=\"p0\",state=\"clean\"}",
        "basalt_md_disks{pool=\"p0\",state=\"spare\"} 1",
        "basalt_pool_allocated_bytes{pool=\"p0\"}",
        "basalt_lun_written_bytes_total{pool=\"p0\",lun=\"vm1\"}",
        "basalt_nbd_commands_total{export=\"vm1\",command=\"write\"}",
        "basalt_iscsi_commands_total{target=\"iqn.2026-11.io.basalt:test\",lun=\"vm1\"}",
    ] {
        assert!(scrape.contains(name), "{name} missing");
    }
    promtool_check(&scrape);
}

#[test]
fn a_failed_disk_is_rebuilt_onto_the_spare_and_nothing_is_lost() {
    let s = setup();
    let d = &s.d;
    d.cli(&["disk", "fail", "d1"]).ok();
    wait_pool(d, "p0", "rebuilt onto the spare", |p| {
        p["state"] == "online" && p["md_text"].as_str().is_some_and(|t| t.contains("[UUU]"))
    });
    let back = read_back(&s, d, "vm1", "after-rebuild.img");
    same_prefix(&s.data, &back, 64 << 20);
    // Replace the faulty disk with a fresh one: it becomes the new spare.
    d.cli(&["disk", "replace", "d1", "d4"]).ok();
    let p = wait_pool(d, "p0", "with d4", |p| {
        p["md_text"].as_str().is_some_and(|t| t.contains("d4"))
    });
    assert!(
        p["disks"].as_array().unwrap().iter().any(|x| x == "d4"),
        "{p:#}"
    );
}

#[test]
fn snapshots_clones_resize_and_deletion_rules() {
    let s = setup();
    let d = &s.d;
    d.cli(&["lun", "snapshot", "vm1", "vm1-snap"]).ok();
    // Overwrite the LUN; the snapshot keeps the old data.
    let newer = s.dir.path().join("newer.img");
    random_file(&newer, 64, 2);
    run("nbdcopy", &[newer.to_str().unwrap(), &nbd_url(d, "vm1")]);
    d.cli(&["target", "nbd", "export", "vm1-snap", "--read-only"])
        .ok();
    let snap = read_back(&s, d, "vm1-snap", "snap.img");
    same_prefix(&s.data, &snap, 64 << 20);
    // A clone of the snapshot is writable and starts with the snapshot's data.
    d.cli(&["lun", "clone", "vm1-snap", "vm1-clone"]).ok();
    d.cli(&["target", "nbd", "export", "vm1-clone"]).ok();
    let clone = read_back(&s, d, "vm1-clone", "clone.img");
    same_prefix(&s.data, &clone, 64 << 20);

    // Grow works; shrinking needs --force; apply never deletes a LUN.
    d.cli(&["lun", "resize", "vm1", "256M"]).ok();
    let r = d.cli(&["lun", "resize", "vm1", "64M"]);
    assert!(r.stderr.contains("loses the data"), "{}", r.stderr);
    let exported = d.cli(&["config", "export"]).ok().stdout;
    let without = exported.replace(
        "[[lun]]\nname = \"vm1-clone\"",
        "[[ignored]]\nname = \"vm1-clone\"",
    );
    let cut = match without.find("[[ignored]]") {
        Some(at) => {
            let rest = &without[at..];
            let end = rest[1..]
                .find("\n[")
                .map(|e| at + 1 + e)
                .unwrap_or(without.len());
            format!("{}{}", &without[..at], &without[end..])
        }
        None => panic!("clone section not found:\n{exported}"),
    };
    let file = s.dir.path().join("cut.toml");
    std::fs::write(&file, cut).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("holds data; apply never deletes it"),
        "{}",
        r.stderr
    );
    // Deleting an exported LUN is refused; unexported, it goes and frees its space.
    let r = d.cli(&["lun", "delete", "vm1-clone"]);
    assert!(
        r.stderr.contains("in use by a target export"),
        "{}",
        r.stderr
    );
    // So is renaming it; unexported, it takes its new name in the pool and the
    // configuration, keeps its data, and the old name is gone.
    let r = d.cli(&["lun", "rename", "vm1-clone", "web-data"]);
    assert!(
        r.stderr.contains("in use by a target export"),
        "{}",
        r.stderr
    );
    d.cli(&["target", "nbd", "unexport", "vm1-clone"]).ok();
    let r = d.cli(&["lun", "rename", "vm1-clone", "vm1"]);
    assert!(
        r.stderr.contains("a LUN named \"vm1\" exists"),
        "{}",
        r.stderr
    );
    d.cli(&["lun", "rename", "vm1-clone", "web-data"]).ok();
    let config = d.cli(&["config", "export"]).ok().stdout;
    assert!(config.contains("name = \"web-data\""), "{config}");
    assert!(!config.contains("vm1-clone"), "{config}");
    d.cli(&["target", "nbd", "export", "web-data"]).ok();
    let renamed = read_back(&s, d, "web-data", "renamed.img");
    same_prefix(&s.data, &renamed, 64 << 20);
    d.cli(&["target", "nbd", "unexport", "web-data"]).ok();
    d.cli(&["lun", "delete", "web-data"]).ok();
    d.cli(&["target", "nbd", "unexport", "vm1-snap"]).ok();
    d.cli(&["lun", "delete", "vm1-snap"]).ok();
    let luns = json(d, &["lun", "list"]);
    assert_eq!(luns.as_array().unwrap().len(), 1, "{luns:#}");
}

#[test]
fn restart_assembles_and_a_second_appliance_imports() {
    let s = setup();
    let data_dir = s.d.data_dir.clone();
    let mut d = s.d;
    assert_eq!(d.stop(), 0);
    // The same appliance comes back with its pool, LUN and export.
    let d = Daemon::start(&data_dir, None);
    let back = read_back_with(&s.dir, &d, "vm1", "restart.img");
    same_prefix(&s.data, &back, 64 << 20);
    // Export the pool; a second appliance (new data dir) with the same disk files
    // imports it from the disks alone.
    d.cli(&["target", "nbd", "unexport", "vm1"]).ok();
    d.cli(&["pool", "export", "p0"]).ok();
    drop(d);
    let other = Daemon::start(
        &s.dir.path().join("var2"),
        Some(&disks_doc(s.dir.path(), 5, "256M")),
    );
    let r = other.cli(&["pool", "import"]).ok();
    assert!(
        r.stdout.contains("add pool p0") && r.stdout.contains("add lun vm1"),
        "{}",
        r.stdout
    );
    other
        .cli(&["target", "nbd", "set", "--listen", "127.0.0.1:0"])
        .ok();
    other.cli(&["target", "nbd", "export", "vm1"]).ok();
    let imported = read_back_with(&s.dir, &other, "vm1", "imported.img");
    same_prefix(&s.data, &imported, 64 << 20);
}

fn read_back_with(dir: &tempfile::TempDir, d: &Daemon, export: &str, name: &str) -> PathBuf {
    let out = dir.path().join(name);
    let _ = std::fs::remove_file(&out);
    run("nbdcopy", &[&nbd_url(d, export), out.to_str().unwrap()]);
    out
}

#[test]
fn pools_refuse_disks_that_hold_something_else() {
    let dir = tempdir();
    let d = Daemon::start(
        &dir.path().join("var"),
        Some(&disks_doc(dir.path(), 4, "128M")),
    );
    d.cli(&["pool", "create", "p0", "--raid", "1", "d0", "d1"])
        .ok();
    d.cli(&["pool", "export", "p0"]).ok();
    // d0 and d1 still hold p0: a new pool on them is refused, naming the array.
    let r = d.cli(&["pool", "create", "p1", "--raid", "1", "d0", "d2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("belongs to array \"p0\""), "{}", r.stderr);
    let r = d.cli(&["pool", "create", "p1", "--raid", "5", "d2", "d3"]);
    assert!(
        r.stderr.contains("raid5 needs at least 3 disks"),
        "{}",
        r.stderr
    );
    let r = d.cli(&["disk", "remove", "d0"]);
    assert_eq!(
        r.code, 0,
        "d0 is in no declared pool any more: {}",
        r.stderr
    );
}

/// Disks, a pool on them and a LUN in one document, at first start and in a later
/// `config apply`: the pool's disks are checked before they exist (a file the apply
/// creates is blank; an existing one is opened for a look) and everything comes up.
#[test]
fn disks_pool_and_lun_come_in_one_document() {
    let dir = tempdir();
    let pool = "\n[[pool]]\nname = \"p0\"\nraid = \"raid1\"\ndisks = [\"d0\", \"d1\"]\n\
                \n[[lun]]\nname = \"vm1\"\npool = \"p0\"\nsize = \"64M\"\n";
    let d = Daemon::start(
        &dir.path().join("var"),
        Some(&(disks_doc(dir.path(), 2, "128M") + pool)),
    );
    let p = wait_pool(&d, "p0", "online", |p| p["state"] == "online");
    assert_eq!(p["array"]["members"].as_array().unwrap().len(), 2, "{p:#}");
    let luns = json(&d, &["lun", "list"]);
    assert!(luns.to_string().contains("\"vm1\""), "{luns:#}");

    // A later apply adds two disks and a pool on them; one of the disks is a file that
    // already holds p0's superblock (a copy of d0): refused, naming the array.
    let doc = disks_doc(dir.path(), 4, "128M")
        + pool
        + "\n[[pool]]\nname = \"p1\"\nraid = \"raid1\"\ndisks = [\"d2\", \"d3\"]\n";
    std::fs::copy(dir.path().join("d0.img"), dir.path().join("d3.img")).unwrap();
    let file = dir.path().join("next.toml");
    std::fs::write(&file, &doc).unwrap();
    let r = d.cli(&["config", "apply", file.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("belongs to array \"p0\""), "{}", r.stderr);
    // With a blank d3 it goes through.
    std::fs::remove_file(dir.path().join("d3.img")).unwrap();
    d.cli(&["config", "apply", file.to_str().unwrap()]).ok();
    wait_pool(&d, "p1", "online", |p| p["state"] == "online");
}

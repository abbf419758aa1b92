//! Cluster lockspaces end to end: a daemon with a pool, a LUN and a `[[lockspace]]` on
//! that LUN (formatted with `basalt lockspace format`); a second host — the lock
//! manager in this test process — reaches the same LUN through the daemon's own iSCSI
//! target with the libiscsi initiator, joins and takes a lock; `basalt lock list`, the
//! API and `/metrics` show it. Bad lockspace sections are refused with their line.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step is a failed test

mod common;
use basalt_blockdev::SharedBlockDev;
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::{JoinOptions, LockMode, Lockspace, ResourceId};
use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.io.basalt:locks";
const HOST_B_IQN: &str = "iqn.2026-11.test:host-b";

/// The lockspace section used throughout: short timings so that the test takes seconds.
const LOCKSPACE: &str = "\n[[lockspace]]\nname = \"ls0\"\ndevice = \"p0/ls\"\nheartbeat = \"1s\"\ndead_after = \"3s\"\nmax_hosts = 8\nmax_locks = 64\n";

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.cli(&a).ok().stdout).unwrap()
}

/// A daemon named node-a with one file disk, pool p0 (RAID0) and LUN ls, exported
/// over iSCSI to host B's initiator. Returns the daemon and the iSCSI portal.
fn setup(dir: &Path) -> (Daemon, String) {
    let doc = format!(
        "version = 1\n[appliance]\nname = \"node-a\"\n[api]\nlisten = [\"127.0.0.1:0\"]\n\n[[disk]]\nname = \"d0\"\npath = \"{}\"\nkind = \"file\"\nsize = \"128M\"\n",
        dir.join("d0.img").display()
    );
    let d = Daemon::start(&dir.join("var"), Some(&doc));
    d.cli(&["pool", "create", "p0", "--raid", "0", "d0"]).ok();
    d.cli(&["lun", "create", "ls", "--pool", "p0", "--size", "16M"])
        .ok();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let portal = format!("127.0.0.1:{port}");
    d.cli(&["target", "iscsi", "create", IQN, "--portal", &portal])
        .ok();
    d.cli(&["target", "iscsi", "lun", IQN, "ls"]).ok();
    d.cli(&["target", "iscsi", "acl", IQN, HOST_B_IQN]).ok();
    (d, portal)
}

/// Applies the exported configuration plus `extra`; returns the CLI's outcome.
fn apply_with(d: &Daemon, dir: &Path, file: &str, extra: &str) -> Run {
    let exported = d.cli(&["config", "export"]).ok().stdout;
    let path = dir.join(file);
    std::fs::write(&path, format!("{exported}{extra}")).unwrap();
    d.cli(&["config", "apply", path.to_str().unwrap()])
}

/// The line `needle` is on in the file `file` under `dir`.
fn line_of(dir: &Path, file: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

fn wait_for(
    d: &Daemon,
    args: &[&str],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = json(d, args);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_host_over_iscsi_holds_a_lock_the_daemon_lists() {
    let dir = tempdir();
    let (mut d, portal) = setup(dir.path());

    // Declared on a fresh LUN: not formatted implicitly.
    apply_with(&d, dir.path(), "ls.toml", LOCKSPACE).ok();
    let ls = json(&d, &["lockspace", "status", "ls0"]);
    assert_eq!(ls["state"], "unformatted", "{ls:#}");
    assert!(
        ls["error"]
            .as_str()
            .unwrap()
            .contains("basalt lockspace format ls0"),
        "{ls:#}"
    );
    let r = d.cli(&["lock", "list", "ls0"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not joined"), "{}", r.stderr);

    // The explicit format joins; a second format is refused.
    let f = json(&d, &["lockspace", "format", "ls0"]);
    assert_eq!(f["state"], "live", "{f:#}");
    assert_eq!(f["slot"], 0);
    assert_eq!(f["generation"], 1);
    assert_eq!(f["heartbeat_ms"], 1000);
    assert_eq!(f["dead_after_ms"], 3000);
    assert_eq!(f["host_name"], "node-a");
    let r = d.cli(&["lockspace", "format", "ls0"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("holds a lockspace already"),
        "{}",
        r.stderr
    );

    // Host B: the lock manager in this process, over iSCSI to the daemon's target.
    let rt = host_b_runtime();
    let (host_b, guard) = rt.block_on(async {
        let ls = join_host_b(&portal).await;
        let guard = ls
            .try_lock(
                ResourceId::from_name("vm1/disk0.vmdk").unwrap(),
                LockMode::Exclusive,
            )
            .await
            .unwrap();
        (ls, guard)
    });
    let (b_slot, b_gen) = (host_b.slot(), host_b.generation());
    assert_eq!(b_slot, 1, "slot 0 is the daemon's");
    // Host B sees the daemon live too.
    let b_status = host_b.status();
    assert!(
        b_status
            .slots
            .iter()
            .any(|s| s.hostname == "node-a" && s.slot == 0),
        "{b_status:?}"
    );

    // Both hosts appear in the daemon's slots.
    let st = wait_for(&d, &["lockspace", "status", "ls0"], "two live hosts", |v| {
        v["hosts"]["live"] == 2
    });
    let slots = st["slots"].as_array().unwrap();
    assert!(
        slots
            .iter()
            .any(|s| s["host_name"] == "node-a" && s["this_host"] == true && s["state"] == "live"),
        "{st:#}"
    );
    assert!(
        slots.iter().any(|s| s["host_name"] == "test-host-b"
            && s["slot"] == b_slot
            && s["state"] == "live"
            && s["this_host"] == false),
        "{st:#}"
    );
    let text = d.cli(&["lockspace", "status", "ls0"]).ok().stdout;
    assert!(
        text.contains("test-host-b") && text.contains("node-a (this host)"),
        "{text}"
    );
    let text = d.cli(&["lockspace", "list"]).ok().stdout;
    assert!(
        text.contains("ls0") && text.contains("p0/ls") && text.contains("live"),
        "{text}"
    );

    // `basalt lock list` names the holder: host name, slot, generation.
    let text = d.cli(&["lock", "list"]).ok().stdout;
    assert!(
        text.contains("vm1/disk0.vmdk")
            && text.contains("exclusive")
            && text.contains(&format!("test-host-b/{b_slot}/{b_gen}")),
        "{text}"
    );
    let locks = json(&d, &["lock", "list", "ls0"]);
    let lock = locks
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["resource"] == "vm1/disk0.vmdk")
        .unwrap_or_else(|| panic!("{locks:#}"));
    assert_eq!(lock["lockspace"], "ls0");
    assert_eq!(lock["mode"], "exclusive");
    assert_eq!(lock["holders"][0]["host_name"], "test-host-b");
    assert_eq!(lock["holders"][0]["slot"], b_slot);
    assert_eq!(lock["holders"][0]["generation"], b_gen);
    assert_eq!(lock["holders"][0]["current"], true);

    // The same over HTTPS.
    let (code, body) = d.curl("/api/v1/lockspaces/ls0/locks", Some(&d.token()), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("test-host-b"), "{body}");
    let (code, body) = d.curl("/api/v1/lockspaces", Some(&d.token()), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"slots\"") && body.contains("test-host-b"),
        "{body}"
    );
    let (code, _) = d.curl("/api/v1/lockspaces/nope/locks", Some(&d.token()), &[]);
    assert_eq!(code, 404);

    // Metrics: the families, and promtool finds nothing wrong (after a heartbeat).
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let (_, scrape) = d.curl("/metrics", None, &[]);
        if !scrape.contains("basalt_lockspace_heartbeats_total{lockspace=\"ls0\"} 0\n") {
            break scrape;
        }
        assert!(Instant::now() < deadline, "no heartbeat counted:\n{scrape}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for name in [
        "basalt_lockspace_info{lockspace=\"ls0\",device=\"p0/ls\"",
        "basalt_lockspace_up{lockspace=\"ls0\"} 1",
        "basalt_lockspace_state{lockspace=\"ls0\",state=\"live\"} 1",
        "basalt_lockspace_hosts{lockspace=\"ls0\",state=\"live\"} 2",
        "basalt_lockspace_heartbeats_total{lockspace=\"ls0\"}",
        "basalt_lockspace_heartbeat_duration_seconds_bucket{lockspace=\"ls0\",le=\"+Inf\"}",
        "basalt_lockspace_lock_acquire_duration_seconds_count{lockspace=\"ls0\"}",
        "basalt_lockspace_locks_held{lockspace=\"ls0\"} 0",
        "basalt_lockspace_breaks_total{lockspace=\"ls0\"} 0",
        "basalt_lockspace_takeovers_total{lockspace=\"ls0\"} 0",
        "basalt_lockspace_fencing_events_total{lockspace=\"ls0\"} 0",
        "basalt_lockspace_lost_total{lockspace=\"ls0\"} 0",
    ] {
        assert!(scrape.contains(name), "{name} missing from:\n{scrape}");
    }
    promtool_check(&scrape);

    // Host B releases and leaves: its slot is free again and the lock has no holder.
    rt.block_on(async {
        guard.unlock().await.unwrap();
        host_b.leave().await.unwrap();
    });
    wait_for(&d, &["lockspace", "status", "ls0"], "host B gone", |v| {
        v["hosts"]["live"] == 1
            && v["slots"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["slot"] == b_slot && s["state"] == "free")
    });
    let locks = json(&d, &["lock", "list", "ls0"]);
    assert!(
        locks[0]["holders"].as_array().unwrap().is_empty(),
        "{locks:#}"
    );

    // A clean stop leaves the lockspace; a restart joins it again (next generation).
    assert_eq!(d.stop(), 0);
    assert!(
        d.log_text().contains("left the lockspace"),
        "{}",
        d.log_text()
    );
    let d = Daemon::start(&d.data_dir.clone(), None);
    let st = wait_for(&d, &["lockspace", "status", "ls0"], "rejoined", |v| {
        v["state"] == "live"
    });
    assert_eq!(st["slot"], 0, "{st:#}");
    assert_eq!(st["generation"], 2, "{st:#}");

    // Removing the section leaves the lockspace cleanly.
    let exported = d.cli(&["config", "export"]).ok().stdout;
    let without = exported
        .split("\n[[lockspace]]")
        .next()
        .unwrap()
        .to_string();
    let path = dir.path().join("without.toml");
    std::fs::write(&path, format!("{without}\n")).unwrap();
    d.cli(&["config", "apply", path.to_str().unwrap()]).ok();
    assert_eq!(json(&d, &["lockspace", "list"]), serde_json::json!([]));
    assert!(
        d.log_text().contains("left the lockspace"),
        "{}",
        d.log_text()
    );
}

#[test]
fn bad_lockspace_sections_are_refused_with_their_line() {
    let dir = tempdir();
    let (d, _portal) = setup(dir.path());
    let before = d.cli(&["config", "export"]).ok().stdout;
    let cases = [
        (
            "unknown.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"p0/nope\"\n",
            "lockspace \"bad\": LUN \"nope\" is not declared",
        ),
        (
            "wrongpool.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"p9/ls\"\n",
            "lockspace \"bad\": LUN \"ls\" is in pool \"p0\", not \"p9\"",
        ),
        (
            "url.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"iscsi://10.0.0.1\"\n",
            "lockspace \"bad\": invalid iSCSI URL",
        ),
        (
            "timing.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"p0/ls\"\nheartbeat = \"2s\"\ndead_after = \"3s\"\n",
            "dead_after 3s must be at least three heartbeats (6s)",
        ),
        (
            "duration.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"p0/ls\"\nheartbeat = \"soon\"\n",
            "lockspace \"bad\": heartbeat \"soon\"",
        ),
        (
            "key.toml",
            "\n[[lockspace]]\nname = \"bad\"\ndevice = \"p0/ls\"\ncolour = \"red\"\n",
            "lockspace \"bad\": unknown field `colour`",
        ),
    ];
    for (file, extra, message) in cases {
        let r = apply_with(&d, dir.path(), file, extra);
        assert_ne!(r.code, 0, "{file} was accepted");
        let line = line_of(dir.path(), file, "[[lockspace]]");
        assert!(
            r.stderr.contains(&format!("line {line}: ")) && r.stderr.contains(message),
            "{file}: want line {line}: {message}\n{}",
            r.stderr
        );
    }
    assert_eq!(d.cli(&["config", "export"]).ok().stdout, before);

    // Timings must equal the header's: checked against the formatted lockspace.
    apply_with(&d, dir.path(), "ls.toml", LOCKSPACE).ok();
    d.cli(&["lockspace", "format", "ls0"]).ok();
    let before = d.cli(&["config", "export"]).ok().stdout;
    let mismatched = before.replace("heartbeat = \"1s\"", "heartbeat = \"500ms\"");
    assert_ne!(mismatched, before);
    let path = dir.path().join("mismatch.toml");
    std::fs::write(&path, &mismatched).unwrap();
    let r = d.cli(&["config", "apply", path.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    let line = line_of(dir.path(), "mismatch.toml", "[[lockspace]]");
    assert!(
        r.stderr.contains(&format!(
            "line {line}: lockspace \"ls0\": heartbeat 500ms differs from the lockspace header's 1s"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(d.cli(&["config", "export"]).ok().stdout, before);
    assert_eq!(json(&d, &["lockspace", "status", "ls0"])["state"], "live");

    // A second section on the same device is refused too.
    let r = apply_with(
        &d,
        dir.path(),
        "twice.toml",
        "\n[[lockspace]]\nname = \"ls1\"\ndevice = \"p0/ls\"\n",
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("device \"p0/ls\" is already lockspace"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dead_host_is_taken_over_and_its_lock_broken() {
    let dir = tempdir();
    let (d, portal) = setup(dir.path());
    // `format = true` formats a blank device at join, with no separate step.
    apply_with(
        &d,
        dir.path(),
        "ls.toml",
        &format!("{LOCKSPACE}format = true\n"),
    )
    .ok();
    let st = wait_for(&d, &["lockspace", "status", "ls0"], "joined", |v| {
        v["state"] == "live"
    });
    assert_eq!(st["slot"], 0, "{st:#}");
    assert!(
        d.log_text().contains("lockspace formatted"),
        "{}",
        d.log_text()
    );

    // Host B joins, takes a lock, and dies (its runtime stops: no release, no leave).
    let rt = host_b_runtime();
    let (b_slot, b_gen) = rt.block_on(async {
        let ls = join_host_b(&portal).await;
        let guard = ls
            .lock(
                ResourceId::from_name("vm2/disk0.vmdk").unwrap(),
                LockMode::Exclusive,
            )
            .await
            .unwrap();
        let held = (ls.slot(), ls.generation());
        std::mem::forget(guard);
        std::mem::forget(ls);
        held
    });
    rt.shutdown_background();
    let locks = json(&d, &["lock", "list", "ls0"]);
    assert_eq!(
        locks[0]["holders"][0]["host_name"], "test-host-b",
        "{locks:#}"
    );

    // After the dead-host timeout (3 s) the daemon takes B's slot over, recovers it and
    // breaks its lock.
    let st = wait_for(&d, &["lockspace", "status", "ls0"], "taken over", |v| {
        v["takeovers"].as_array().is_some_and(|t| !t.is_empty())
            && v["slots"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["slot"] == b_slot && s["state"] == "free")
    });
    assert_eq!(st["takeovers"][0]["host_name"], "test-host-b", "{st:#}");
    assert_eq!(st["takeovers"][0]["dead_generation"], b_gen, "{st:#}");
    let locks = json(&d, &["lock", "list", "ls0"]);
    assert!(
        locks[0]["holders"].as_array().unwrap().is_empty(),
        "{locks:#}"
    );
    let (_, scrape) = d.curl("/metrics", None, &[]);
    for name in [
        "basalt_lockspace_takeovers_total{lockspace=\"ls0\"} 1",
        "basalt_lockspace_breaks_total{lockspace=\"ls0\"} 1",
        "basalt_lockspace_recoveries_total{lockspace=\"ls0\"} 1",
        "basalt_lockspace_hosts{lockspace=\"ls0\",state=\"live\"} 1",
    ] {
        assert!(scrape.contains(name), "{name} missing from:\n{scrape}");
    }
    promtool_check(&scrape);
}

#[test]
fn a_second_daemon_joins_over_iscsi() {
    let dir = tempdir();
    let (a, portal) = setup(dir.path());
    apply_with(&a, dir.path(), "ls.toml", LOCKSPACE).ok();
    a.cli(&["lockspace", "format", "ls0"]).ok();

    // Node B: another appliance whose lockspace is node A's LUN, through iSCSI. Its
    // timings are wrong first: refused at join (the header is remote), reported.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b = Daemon::start(
        &b_dir.join("var"),
        Some("version = 1\n[appliance]\nname = \"node-b\"\n[api]\nlisten = [\"127.0.0.1:0\"]\n"),
    );
    let remote = |heartbeat: &str| {
        format!(
            "\n[[lockspace]]\nname = \"shared\"\ndevice = \"iscsi://{portal}/{IQN}/0\"\ninitiator = \"{HOST_B_IQN}\"\nheartbeat = \"{heartbeat}\"\n"
        )
    };
    let r = apply_with(&b, &b_dir, "wrong.toml", &remote("2s")).ok();
    assert!(r.stdout.contains("add lockspace shared"), "{}", r.stdout);
    let st = json(&b, &["lockspace", "status", "shared"]);
    assert_eq!(st["state"], "error", "{st:#}");
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("heartbeat 2s differs from the lockspace header's 1s"),
        "{st:#}"
    );
    assert_eq!(st["device"], format!("iscsi://{portal}/{IQN}/0"));

    // Fixed: node B joins, and each node sees the other live.
    let exported = b.cli(&["config", "export"]).ok().stdout;
    let fixed = exported.replace("heartbeat = \"2s\"", "heartbeat = \"1s\"");
    std::fs::write(b_dir.join("right.toml"), fixed).unwrap();
    b.cli(&[
        "config",
        "apply",
        b_dir.join("right.toml").to_str().unwrap(),
    ])
    .ok();
    let st = wait_for(&b, &["lockspace", "status", "shared"], "live on B", |v| {
        v["state"] == "live" && v["hosts"]["live"] == 2
    });
    assert!(
        st["slots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["host_name"] == "node-a" && s["this_host"] == false),
        "{st:#}"
    );
    wait_for(&a, &["lockspace", "status", "ls0"], "node B on A", |v| {
        v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["host_name"] == "node-b" && s["state"] == "live")
    });
    let (_, scrape) = b.curl("/metrics", None, &[]);
    assert!(
        scrape.contains(&format!(
            "basalt_lockspace_info{{lockspace=\"shared\",device=\"iscsi://{portal}/{IQN}/0\""
        )),
        "{scrape}"
    );
    promtool_check(&scrape);
}

/// A lockspace whose remote target does not answer (a portal that accepts the TCP
/// connection and never replies to the login) is joined in the background: neither
/// the apply that declares it nor later configuration changes wait for it, and
/// `lockspace list` reports it not live, with the error once the connect times out.
#[test]
fn an_unreachable_lockspace_target_does_not_stall_configuration_changes() {
    let dir = tempdir();
    let (d, _portal) = setup(dir.path());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_portal = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let device = format!("iscsi://{silent_portal}/iqn.2026-11.test:silent/0");
    let section = format!(
        "\n[[lockspace]]\nname = \"remote\"\ndevice = \"{device}\"\nheartbeat = \"1s\"\ndead_after = \"3s\"\n"
    );

    let started = Instant::now();
    let r = apply_with(&d, dir.path(), "remote.toml", &section).ok();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "config apply took {took:?}");
    assert!(r.stdout.contains("add lockspace remote"), "{}", r.stdout);
    assert!(
        r.stdout.contains("joining") || r.stderr.contains("joining"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );

    // Configuration changes that do not touch the lockspace do not wait for it.
    for (i, args) in [
        ["lun", "create", "l1", "--pool", "p0", "--size", "4M"],
        ["lun", "create", "l2", "--pool", "p0", "--size", "4M"],
    ]
    .iter()
    .enumerate()
    {
        let started = Instant::now();
        d.cli(args).ok();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "change {i} took {took:?}");
    }

    // Not live; once the connect times out the error says why.
    let deadline = Instant::now() + Duration::from_secs(45);
    let ls = loop {
        let list = json(&d, &["lockspace", "list"]);
        let ls = list
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "remote")
            .unwrap_or_else(|| panic!("{list:#}"))
            .clone();
        assert_ne!(ls["state"], "live", "{ls:#}");
        if ls["error"].is_string() {
            break ls;
        }
        assert!(Instant::now() < deadline, "no error reported: {ls:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        ls["error"].as_str().unwrap().contains("timed out"),
        "{ls:#}"
    );
    assert_eq!(ls["device"], device);
    let text = d.cli(&["lockspace", "list"]).ok().stdout;
    assert!(text.contains("remote") && !text.contains("live"), "{text}");

    // Still prompt while the background retry is connecting again.
    let started = Instant::now();
    d.cli(&["lun", "create", "l3", "--pool", "p0", "--size", "4M"])
        .ok();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "lun create took {took:?}");
}

/// Two hosts with `format = true` on the same blank device, applied at the same time:
/// one formats it, the other joins that lockspace (it does not format again over the
/// first host's slot): one lockspace id, both hosts live in it, no lease lost.
#[test]
fn two_hosts_formatting_one_blank_device_share_one_lockspace() {
    let dir = tempdir();
    let (a, portal) = setup(dir.path());
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b = Daemon::start(
        &b_dir.join("var"),
        Some("version = 1\n[appliance]\nname = \"node-b\"\n[api]\nlisten = [\"127.0.0.1:0\"]\n"),
    );
    let remote = format!(
        "\n[[lockspace]]\nname = \"shared\"\ndevice = \"iscsi://{portal}/{IQN}/0\"\ninitiator = \"{HOST_B_IQN}\"\nheartbeat = \"1s\"\ndead_after = \"3s\"\nmax_hosts = 8\nmax_locks = 64\nformat = true\n"
    );
    let local = format!("{LOCKSPACE}format = true\n");
    // Both documents written first, then applied together.
    let a_doc = format!("{}{local}", a.cli(&["config", "export"]).ok().stdout);
    let b_doc = format!("{}{remote}", b.cli(&["config", "export"]).ok().stdout);
    let (a_path, b_path) = (dir.path().join("a.toml"), b_dir.join("b.toml"));
    std::fs::write(&a_path, a_doc).unwrap();
    std::fs::write(&b_path, b_doc).unwrap();
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let ta = s.spawn(|| {
            barrier.wait();
            a.cli(&["config", "apply", a_path.to_str().unwrap()]).ok();
        });
        barrier.wait();
        b.cli(&["config", "apply", b_path.to_str().unwrap()]).ok();
        ta.join().unwrap();
    });

    let on_a = wait_for(&a, &["lockspace", "status", "ls0"], "both live on A", |v| {
        v["state"] == "live" && v["hosts"]["live"] == 2
    });
    let on_b = wait_for(
        &b,
        &["lockspace", "status", "shared"],
        "both live on B",
        |v| v["state"] == "live" && v["hosts"]["live"] == 2,
    );
    assert!(on_a["lockspace_id"].is_string(), "{on_a:#}");
    assert_eq!(on_a["lockspace_id"], on_b["lockspace_id"]);
    assert_ne!(on_a["slot"], on_b["slot"]);
    let formatted = [&a, &b]
        .iter()
        .filter(|d| d.log_text().contains("blank device: lockspace formatted"))
        .count();
    assert_eq!(formatted, 1, "formatted {formatted} times");
    // A few heartbeats later neither host has lost its lease (its slot overwritten).
    std::thread::sleep(Duration::from_secs(3));
    for (d, name) in [(&a, "ls0"), (&b, "shared")] {
        let st = json(d, &["lockspace", "status", name]);
        assert_eq!(st["state"], "live", "{st:#}");
        assert_eq!(st["lost_total"], 0, "{st:#}");
        assert_eq!(st["lockspace_id"], on_a["lockspace_id"], "{st:#}");
    }
}

/// The runtime host B (the lock manager in this test process) runs on.
fn host_b_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Host B joins the lockspace at the start of LUN 0 of the daemon's target at `portal`,
/// over iSCSI.
async fn join_host_b(portal: &str) -> Lockspace {
    let opts = IscsiOptions {
        initiator: HOST_B_IQN.into(),
        io_timeout: Duration::from_secs(5),
        ..IscsiOptions::default()
    };
    let url = format!("iscsi://{portal}/{IQN}/0");
    let dev: SharedBlockDev = Arc::new(IscsiDev::connect(&url, &opts).await.unwrap());
    Lockspace::join(dev, 0, JoinOptions::new([0xbb; 16], "test-host-b"))
        .await
        .unwrap()
}

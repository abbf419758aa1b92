//! Daemon start, stop and restart.

mod common;
use common::*;

#[test]
fn restart_keeps_the_store_and_sigterm_exits_zero() {
    let dir = tempdir();
    let data = dir.path().join("var");
    let mut d = Daemon::start(&data, Some(EPHEMERAL));
    d.cli(&["disk", "add", "d0", "--size", "256M"]).ok();
    let before: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "status"]).ok().stdout).unwrap();
    let config_before = d.cli(&["config", "export"]).ok().stdout;
    assert_eq!(d.stop(), 0, "SIGTERM must exit 0:\n{}", d.log_text());
    assert!(!data.join("basalt.sock").exists(), "socket left behind");

    let d = Daemon::start(&data, None);
    let after: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "status"]).ok().stdout).unwrap();
    assert_eq!(before["appliance_id"], after["appliance_id"]);
    assert_eq!(before["config_generation"], after["config_generation"]);
    assert_eq!(after["disks"]["online"], 1);
    assert_eq!(d.cli(&["config", "export"]).ok().stdout, config_before);
}

#[test]
fn sigint_also_stops_cleanly() {
    let dir = tempdir();
    let mut d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let mut child = d.child.take().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_text());
}

#[test]
fn a_missing_disk_stays_declared_and_is_reported() {
    let dir = tempdir();
    let data = dir.path().join("var");
    let mut d = Daemon::start(&data, Some(EPHEMERAL));
    d.cli(&["disk", "add", "d0", "--size", "64M"]).ok();
    assert_eq!(d.stop(), 0);
    std::fs::remove_file(data.join("disks/d0.img")).unwrap();

    let d = Daemon::start(&data, None);
    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "disk", "list"]).ok().stdout).unwrap();
    assert_eq!(list[0]["state"], "missing");
    assert!(list[0]["error"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    assert!(
        !data.join("disks/d0.img").exists(),
        "a lost disk must not be recreated empty"
    );
    let status: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "status"]).ok().stdout).unwrap();
    assert_eq!(status["disks"]["unavailable"], 1);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = tempdir();
    let data = dir.path().join("var");
    let _d = Daemon::start(&data, Some(EPHEMERAL));
    let r: Run = std::process::Command::new(BASALT)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("another basalt daemon is running"),
        "{}",
        r.stderr
    );
}

#[test]
fn cli_without_a_daemon_says_so() {
    let dir = tempdir();
    let data = dir.path().join("var");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("admin.token"), "x".repeat(64)).unwrap();
    let r: Run = std::process::Command::new(BASALT)
        .arg("--data-dir")
        .arg(&data)
        .arg("status")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is `basalt serve` running"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_fresh_appliance_starts_on_the_embedded_default() {
    let dir = tempdir();
    let data = dir.path().join("var");
    // No --config: the embedded default (sparse file disks under var/disks). Port 8443
    // may be taken on a test machine; the daemon then serves on its unix socket alone.
    let mut d = Daemon::start(&data, None);
    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "disk", "list"]).ok().stdout).unwrap();
    let disks = list.as_array().unwrap();
    assert_eq!(disks.len(), 4);
    for disk in disks {
        assert_eq!(disk["state"], "online", "{disk}");
        assert_eq!(disk["size_bytes"], 8u64 << 30);
    }
    assert_eq!(d.stop(), 0);
    // A restart does not apply the default again (the admin may have changed things).
    let d = Daemon::start(&data, None);
    d.cli(&["disk", "remove", "d3"]).ok();
    drop(d);
    let d = Daemon::start(&data, None);
    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "disk", "list"]).ok().stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
}

#[test]
fn no_defaults_starts_empty() {
    let dir = tempdir();
    let data = dir.path().join("var");
    std::fs::create_dir_all(&data).unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new(BASALT)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--no-defaults")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon {
        data_dir: data.clone(),
        child: None,
        log: dir.path().join("log"),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.cli(&["status"]).code != 0 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(d.cli(&["--json", "disk", "list"]).ok().stdout.trim(), "[]");
    let _ = child.kill();
    let _ = child.wait();
}

//! `basalt switch ...`: switches created through the CLI run a real datapath, persist
//! across restarts, appear in the exported configuration and in /metrics.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step is a failed test

mod common;
use common::*;
use std::process::Command;

/// A veth pair made for one test, deleted on drop.
struct Veth(String);

impl Veth {
    fn new(name: &str) -> Veth {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        let ok = Command::new("ip")
            .args([
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{name}p"),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot create veth {name} (the tests run as root)");
        for dev in [name.to_string(), format!("{name}p")] {
            Command::new("ip")
                .args(["link", "set", &dev, "up"])
                .status()
                .unwrap();
        }
        Veth(name.to_string())
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn switch_lifecycle_through_the_cli() {
    let _uplink = Veth::new("bsw-up0");
    let dir = tempdir();
    let data = dir.path().join("var");
    let mut d = Daemon::start(&data, Some(EPHEMERAL));

    d.cli(&["switch", "create", "vs0", "--uplink", "uplink0=bsw-up0"])
        .ok();
    d.cli(&[
        "switch",
        "portgroup",
        "add",
        "vs0",
        "vm-net",
        "--vlan",
        "10",
    ])
    .ok();
    d.cli(&[
        "switch",
        "port",
        "add",
        "vs0",
        "bsw-vm1",
        "--portgroup",
        "vm-net",
        "--mac",
        "02:00:00:00:00:01",
    ])
    .ok();
    assert!(
        std::path::Path::new("/sys/class/net/bsw-vm1").exists(),
        "the TAP port was not created"
    );

    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "switch", "list"]).ok().stdout).unwrap();
    assert_eq!(list[0]["name"], "vs0");
    assert_eq!(list[0]["running"], true, "{list}");
    assert_eq!(list[0]["ports"], 1);
    let table = d.cli(&["switch", "show", "vs0"]).ok().stdout;
    assert!(
        table.contains("bsw-vm1") && table.contains("vm-net"),
        "{table}"
    );

    // Refusals name the problem and change nothing.
    let r = d.cli(&["switch", "portgroup", "add", "vs0", "bad", "--vlan", "5000"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("5000"), "{}", r.stderr);
    let r = d.cli(&[
        "switch",
        "create",
        "vs1",
        "--uplink",
        "uplink0=nonexistent9",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("nonexistent9, which this host does not have"),
        "{}",
        r.stderr
    );
    let r = d.cli(&["switch", "portgroup", "remove", "vs0", "vm-net"]);
    assert!(r.stderr.contains("still has ports"), "{}", r.stderr);

    let exported = d.cli(&["config", "export"]).ok().stdout;
    assert!(
        exported.contains("[[switch]]") && exported.contains("bsw-vm1"),
        "{exported}"
    );
    let (_, metrics) = d.curl("/metrics", None, &[]);
    assert!(
        metrics.contains("basalt_switch_port_dropped_packets_total{switch=\"vs0\",port=\"bsw-vm1\",reason=\"vlan\"}"),
        "{metrics}"
    );

    // A restart brings the switch back from the store.
    assert_eq!(d.stop(), 0);
    assert!(
        !std::path::Path::new("/sys/class/net/bsw-vm1").exists(),
        "TAP left after stop"
    );
    let d = Daemon::start(&data, None);
    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["--json", "switch", "list"]).ok().stdout).unwrap();
    assert_eq!(list[0]["running"], true, "{list}");
    assert!(std::path::Path::new("/sys/class/net/bsw-vm1").exists());

    // A whole definition replaces the switch; delete removes it.
    let file = dir.path().join("vs0.toml");
    std::fs::write(
        &file,
        "name = \"vs0\"\nuplinks = [{ name = \"uplink0\", interface = \"bsw-up0\" }]\n\
         [[portgroups]]\nname = \"trunk\"\ntrunk = [\"10\", \"20-29\"]\nnative_vlan = 1\n",
    )
    .unwrap();
    d.cli(&["switch", "apply", file.to_str().unwrap()]).ok();
    assert!(
        !std::path::Path::new("/sys/class/net/bsw-vm1").exists(),
        "the port should be gone"
    );
    d.cli(&["switch", "delete", "vs0"]).ok();
    assert_eq!(
        d.cli(&["--json", "switch", "list"]).ok().stdout.trim(),
        "[]"
    );
}

//! NIC teaming against a real Linux bridge: two uplinks of one Basalt host cabled to the
//! bridge, a remote host on the bridge, VMs behind the switch.

mod common;
use basalt_net::DropReason;
use common::*;
use std::time::{Duration, Instant};

const DEF: &str = r#"
name = "vs0"
[[uplinks]]
name = "uplink1"
interface = "up1"
[[uplinks]]
name = "uplink2"
interface = "up2"

[[portgroups]]
name = "fo"
teaming = { policy = "failover-order", active = ["uplink1"], standby = ["uplink2"], failback = true }
[[portgroups]]
name = "lb"
teaming = { policy = "port-id" }

[[ports]]
name = "vm1"
portgroup = "fo"
mac = "02:00:00:00:02:01"
[[ports]]
name = "vm2"
portgroup = "lb"
mac = "02:00:00:00:02:02"
[[ports]]
name = "vm3"
portgroup = "lb"
mac = "02:00:00:00:02:03"
"#;

/// The bridge port that `mac` is learned on, if any.
fn fdb_port(p: &Ns, mac: &str) -> Option<String> {
    let out = p.exec("bridge fdb show br br0");
    out.lines()
        .find(|l| l.starts_with(mac) && !l.contains("permanent"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
}

fn wait_fdb(p: &Ns, mac: &str, port: &str, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if fdb_port(p, mac).as_deref() == Some(port) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// (sent, received, duplicates) from ping's summary.
fn ping_stats(out: &str) -> (u32, u32, bool) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("{out}"));
    let n: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    (
        n[0],
        n[1],
        out.contains("DUP!") || line.contains("duplicates"),
    )
}

/// Explicit failover order with a standby uplink: pulling the active uplink (on the
/// physical side, then on the host side) moves the VM to the standby with a bounded
/// number of lost pings, the bridge learns the new path from the switch's RARP at once,
/// and failback returns it. Port-ID load balancing spreads VMs over both uplinks
/// without duplicate or looped frames.
#[test]
fn failover_notify_and_failback() {
    assert!(root(), "the switch tests need root");
    let p = physical_switch("p");
    let h = Ns::new("h");
    let r = Ns::new("r");
    cable(&h, "up1", &p, "up1p");
    cable(&h, "up2", &p, "up2p");
    cable(&r, "eth0", &p, "rp");
    for i in ["up1p", "up2p", "rp"] {
        plug(&p, i);
    }
    r.exec("ip addr add 10.2.0.100/24 dev eth0");
    let sw = start(DEF, &h, "esx1");
    let _v1 = vm(&h, "vm1", "v1", "10.2.0.1");
    let _v2 = vm(&h, "vm2", "v2", "10.2.0.2");
    let _v3 = vm(&h, "vm3", "v3", "10.2.0.3");
    const M1: &str = "02:00:00:00:02:01";

    // Port ID: the two "lb" VMs use different uplinks; no duplicates reach anyone,
    // though the bridge floods every broadcast back into the other uplink.
    let st = sw.status().expect("status");
    let pin = |n: &str| {
        st.ports
            .iter()
            .find(|p| p.name == n)
            .and_then(|p| p.uplink.clone())
    };
    assert_ne!(pin("vm2"), pin("vm3"), "{st:#?}");
    assert_eq!(pin("vm1").as_deref(), Some("uplink1"));
    for ip in ["10.2.0.1", "10.2.0.2", "10.2.0.3"] {
        let out = r.exec(&format!("ping -c 3 -i 0.1 -W 1 {ip}"));
        let (sent, got, dup) = ping_stats(&out);
        assert!(got == sent && !dup, "{ip}: {out}");
    }
    let c = sw.counters();
    assert!(
        c["uplink1"].drops[DropReason::Loop.label()] + c["uplink2"].drops[DropReason::Loop.label()]
            > 0,
        "our own broadcasts come back through the other uplink and must be dropped: {c:#?}"
    );
    assert_eq!(fdb_port(&p, M1).as_deref(), Some("up1p"));

    // Pull the active uplink's cable on the physical side, in silence: the bridge learns
    // vm1's new port from the switch's RARP alone.
    p.exec("ip link set up1p down");
    let t = wait_fdb(&p, M1, "up2p", Duration::from_secs(2));
    eprintln!("bridge learned vm1 on up2p after {t:?}");
    assert!(
        t.is_some_and(|t| t < Duration::from_millis(500)),
        "bridge did not learn the new path"
    );
    let st = sw.status().expect("status");
    let team = st.teams.iter().find(|t| t.portgroup == "fo").expect("team");
    assert_eq!(team.uplinks_in_use, vec!["uplink2".to_string()]);
    assert!(r.ping("10.2.0.1", 2));

    // Failback under load: 100 pings per second while the uplink returns.
    let pinger = r.spawn("ping -i 0.01 -c 250 -W 1 10.2.0.1");
    std::thread::sleep(Duration::from_millis(800));
    p.exec("ip link set up1p up");
    let (sent, got, _) = ping_stats(&pinger.wait());
    eprintln!("failback: {} of {sent} pings lost", sent - got);
    assert!(sent - got <= 10, "failback lost {} pings", sent - got);
    assert!(wait_fdb(&p, M1, "up1p", Duration::from_secs(1)).is_some());

    // Failover under load, this time by downing the host's own end.
    let pinger = r.spawn("ping -i 0.01 -c 250 -W 1 10.2.0.1");
    std::thread::sleep(Duration::from_millis(800));
    h.exec("ip link set up1 down");
    let (sent, got, _) = ping_stats(&pinger.wait());
    eprintln!("failover: {} of {sent} pings lost", sent - got);
    assert!(sent - got <= 10, "failover lost {} pings", sent - got);
    assert_eq!(fdb_port(&p, M1).as_deref(), Some("up2p"));
    assert!(sw.counters()["uplink2"].tx_packets > 0);

    // Both uplinks down: no uplink, counted.
    h.exec("ip link set up2 down");
    std::thread::sleep(Duration::from_millis(50));
    let st = sw.status().expect("status");
    assert!(st
        .ports
        .iter()
        .filter(|p| p.name.starts_with("uplink"))
        .all(|p| !p.link_up));
    assert!(!r.ping("10.2.0.1", 1));
    drop(sw);
}

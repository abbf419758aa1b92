//! A distributed switch: one definition, applied by two Basalt hosts (namespaces), each
//! running its own data plane, their uplinks tagged into one Linux bridge.

mod common;
use basalt_net::SwitchDefinition;
use common::*;
use std::time::Duration;

const DEF: &str = r#"
name = "dvs0"
[[uplinks]]
name = "uplink1"
[[uplinks]]
name = "uplink2"

[hosts.esx1.uplinks]
uplink1 = "a1"
uplink2 = "a2"
[hosts.esx2.uplinks]
uplink1 = "b1"
uplink2 = "b2"

[[portgroups]]
name = "app"
vlan = 100
teaming = { policy = "src-mac" }
[[portgroups]]
name = "db"
vlan = 200

[[ports]]
name = "vmA"
portgroup = "app"
host = "esx1"
[[ports]]
name = "vmB"
portgroup = "app"
host = "esx2"
[[ports]]
name = "vmC"
portgroup = "db"
host = "esx2"
"#;

/// Two hosts apply one definition: VMs in the same port group reach each other across
/// the tagged uplinks (ping, iperf3), other port groups stay apart, tshark on the
/// physical side sees the port group's VLAN ID, and a changed definition applied to
/// both hosts adds and removes ports without losing the running traffic.
#[test]
fn two_hosts_one_definition() {
    assert!(root(), "the switch tests need root");
    let p = physical_switch("p");
    let h1 = Ns::new("h1");
    let h2 = Ns::new("h2");
    cable(&h1, "a1", &p, "a1p");
    cable(&h1, "a2", &p, "a2p");
    cable(&h2, "b1", &p, "b1p");
    cable(&h2, "b2", &p, "b2p");
    for i in ["a1p", "a2p", "b1p", "b2p"] {
        plug(&p, i);
    }
    let s1 = start(DEF, &h1, "esx1");
    let s2 = start(DEF, &h2, "esx2");
    let va = vm(&h1, "vmA", "va", "10.100.0.1");
    let vb = vm(&h2, "vmB", "vb", "10.100.0.2");
    let _vc = vm(&h2, "vmC", "vc", "10.100.0.3");

    assert!(
        va.ping("10.100.0.2", 3),
        "{:#?}\n{:#?}",
        s1.counters(),
        s2.counters()
    );
    assert!(
        !va.ping("10.100.0.3", 2),
        "port group db (VLAN 200) must be unreachable"
    );

    // tshark on the physical side of host 1's uplinks sees VLAN 100 only.
    let cap =
        p.spawn("tshark -l -n -i a1p -i a2p -a duration:4 -Y 'vlan && icmp' -T fields -e vlan.id");
    std::thread::sleep(Duration::from_millis(2500));
    let _ = va.ok("ping -c 4 -i 0.2 -W 1 10.100.0.2");
    let vids = cap.wait();
    let ids: Vec<&str> = vids
        .lines()
        .filter(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|v| *v == "100"),
        "tshark saw: {vids}"
    );

    let _srv = iperf_server(&vb);
    let bps = iperf(&va, "10.100.0.2", "-t 3");
    eprintln!("iperf3 across two hosts (TAP -> AF_PACKET -> bridge -> AF_PACKET -> TAP, VLAN 100): {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 300e6, "{bps}");
    drop(_srv);

    // A new version of the definition: a port group and a port added on esx1, vmC
    // removed from esx2. vmA <-> vmB traffic keeps flowing through the change.
    let mut next = SwitchDefinition::from_toml(DEF).expect("def");
    next.portgroups
        .push(basalt_net::PortGroupSpec::new("web", 300));
    next.ports.retain(|p| p.name != "vmC");
    next.ports.push(basalt_net::PortSpec {
        name: "vmD".into(),
        portgroup: "web".into(),
        kind: basalt_net::PortKind::Tap,
        mac: None,
        interface: None,
        host: Some("esx1".into()),
    });
    let pinger = va.spawn("ping -i 0.01 -c 150 -W 1 10.100.0.2");
    std::thread::sleep(Duration::from_millis(400));
    let c1 = s1.apply(next.clone()).expect("apply esx1");
    let c2 = s2.apply(next).expect("apply esx2");
    assert_eq!(c1.added, vec!["vmD".to_string()]);
    assert!(c1.removed.is_empty());
    assert_eq!(c2.removed, vec!["vmC".to_string()]);
    let out = pinger.wait();
    assert!(
        out.contains(" 0% packet loss"),
        "traffic was disturbed by the apply: {out}"
    );
    assert!(h1.ok("ip link show vmD"), "vmD's TAP exists on esx1");
    assert!(!h2.ok("ip link show vmD"), "vmD is esx1's only");
    assert!(s1.port("vmD").is_some() && s2.port("vmC").is_none());
    drop(s1);
    drop(s2);
}

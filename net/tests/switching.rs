//! One Basalt host in a network namespace, its switch's uplink cabled to a Linux bridge
//! (the physical switch) in another, and VMs as namespaces holding the switch's TAP
//! devices. Real pings, iperf3 and raw-socket peers; tags are checked on the physical
//! side, since this kernel has no 8021q module.

mod common;
use basalt_net::{DropReason, MacAddr};
use common::*;
use std::time::Duration;

const M1: &str = "02:00:00:00:01:01";
const M2: &str = "02:00:00:00:01:02";
const M3: &str = "02:00:00:00:01:03";
const M4: &str = "02:00:00:00:01:04";

fn mac(s: &str) -> MacAddr {
    s.parse().expect("mac")
}

const DEF: &str = r#"
name = "vs0"
[[uplinks]]
name = "uplink1"
interface = "up1"

[[portgroups]]
name = "v10"
vlan = 10
[[portgroups]]
name = "v20"
vlan = 20
[[portgroups]]
name = "vgt"
vlan = 4095
[[portgroups]]
name = "mgmt"
vlan = 0

[[ports]]
name = "vm1"
portgroup = "v10"
mac = "02:00:00:00:01:01"
[[ports]]
name = "vm2"
portgroup = "v10"
mac = "02:00:00:00:01:02"
[[ports]]
name = "vm3"
portgroup = "v20"
mac = "02:00:00:00:01:03"
[[ports]]
name = "vm4"
portgroup = "vgt"
mac = "02:00:00:00:01:04"
[[ports]]
name = "vm5"
portgroup = "mgmt"
[[ports]]
name = "vmk0"
portgroup = "mgmt"
kind = "internal"
"#;

/// VST: VMs in one VLAN reach each other (ping, iperf3), VMs in another do not, the
/// uplink carries each VM's frames tagged with its port group's VLAN ID, and a tagged
/// frame from the physical side reaches only its VLAN. VGT passes the guest's tags both
/// ways. An internal port reaches the host's own stack.
#[test]
fn vlans_tags_and_internal_port() {
    assert!(root(), "the switch tests need root");
    let p = physical_switch("p");
    let h = Ns::new("h");
    cable(&h, "up1", &p, "up1p");
    plug(&p, "up1p");
    let sw = start(DEF, &h, "esx1");
    let v1 = vm(&h, "vm1", "v1", "10.10.0.1");
    let v2 = vm(&h, "vm2", "v2", "10.10.0.2");
    let v3 = vm(&h, "vm3", "v3", "10.10.0.3");
    let v4 = vm(&h, "vm4", "v4", "10.10.0.4");
    let v5 = vm(&h, "vm5", "v5", "10.0.0.2");

    // Same VLAN: ping and iperf3.
    assert!(
        v1.ping("10.10.0.2", 3),
        "same VLAN must reach: {:#?}",
        sw.counters()
    );
    let _srv = iperf_server(&v2);
    let bps = iperf(&v1, "10.10.0.2", "-t 2");
    eprintln!(
        "iperf3 vm1 -> vm2 (VLAN 10, TAP to TAP): {:.2} Gbit/s",
        bps / 1e9
    );
    assert!(bps > 500e6, "{bps}");
    // Other VLAN, same subnet: unreachable.
    assert!(
        !v1.ping("10.10.0.3", 2),
        "VLAN 20 must not be reachable from VLAN 10"
    );

    // VST on the wire: vm1's ARP broadcasts leave the uplink tagged 10, vm3's tagged 20.
    let wire = RawPeer::open(&p, "up1p");
    let _ = v1.ok("ping -c 2 -i 0.2 -W 1 10.10.0.99");
    let _ = v3.ok("ping -c 2 -i 0.2 -W 1 10.10.0.98");
    let seen = wire.collect(Duration::from_millis(300), |f, _| {
        src(f) == mac(M1) || src(f) == mac(M3)
    });
    assert!(
        seen.iter()
            .any(|(f, v)| src(f) == mac(M1) && *v == Some(10)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(f, v)| src(f) == mac(M3) && *v == Some(20)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(f, v)| (src(f) == mac(M1)) == (*v == Some(10))),
        "{seen:?}"
    );

    // A tagged peer on the physical side: VLAN 10 reaches vm1, VLAN 20 does not.
    let peer = mac("02:aa:00:00:00:01");
    let req = arp_request(peer, [10, 10, 0, 200], [10, 10, 0, 1]);
    wire.send(&eth(MacAddr::BROADCAST, peer, Some(20), 0x0806, &req));
    let got = wire.collect(Duration::from_millis(300), |f, _| src(f) == mac(M1));
    assert!(got.is_empty(), "vm1 answered a VLAN 20 ARP: {got:?}");
    wire.send(&eth(MacAddr::BROADCAST, peer, Some(10), 0x0806, &req));
    let got = wire.collect(Duration::from_millis(500), |f, _| src(f) == mac(M1));
    assert!(
        got.iter().any(|(_, v)| *v == Some(10)),
        "no tagged ARP reply: {got:?}"
    );

    // VGT: the guest's tagged frames pass with their tags, both ways.
    let guest = RawPeer::open(&v4, "vm4");
    let req = arp_request(mac(M4), [10, 10, 0, 4], [10, 10, 0, 1]);
    guest.send(&eth(MacAddr::BROADCAST, mac(M4), Some(10), 0x0806, &req));
    let got = guest.collect(Duration::from_millis(500), |f, _| src(f) == mac(M1));
    assert!(
        got.iter().any(|(_, v)| *v == Some(10)),
        "VGT guest got no VLAN 10 reply: {got:?}"
    );
    guest.send(&eth(
        MacAddr::BROADCAST,
        mac(M4),
        Some(30),
        0x88b5,
        b"vgt-30",
    ));
    let got = wire.collect(Duration::from_millis(300), |f, _| src(f) == mac(M4));
    assert!(
        got.iter().any(|(_, v)| *v == Some(30)),
        "VGT tag 30 not on the wire: {got:?}"
    );
    // A VST guest may not tag: dropped and counted.
    let vst_guest = RawPeer::open(&v2, "vm2");
    vst_guest.send(&eth(
        MacAddr::BROADCAST,
        mac(M2),
        Some(10),
        0x88b5,
        b"tagged",
    ));
    std::thread::sleep(Duration::from_millis(100));
    assert!(sw.counters()["vm2"].drops[DropReason::Vlan.label()] >= 1);

    // An internal port is the host's own interface in the port group's VLAN.
    h.exec("ip addr add 10.0.0.1/24 dev vmk0");
    assert!(
        v5.ping("10.0.0.1", 3),
        "VM must reach the host stack through vmk0"
    );

    let c = sw.counters();
    assert!(c["vm1"].rx_packets > 0 && c["vm2"].tx_packets > 0 && c["uplink1"].tx_packets > 0);
    let st = sw.status().expect("status");
    let up = st
        .ports
        .iter()
        .find(|p| p.name == "uplink1")
        .expect("uplink");
    assert!(up.link_up);
    drop(sw);
}

/// Security policy: forged transmits and MAC address changes are rejected on a port
/// group whose policy says so, and accepted on one whose policy allows them.
#[test]
fn security_policy() {
    assert!(root(), "the switch tests need root");
    let h = Ns::new("h");
    let sw = start(
        r#"
name = "vs0"
[[portgroups]]
name = "strict"
security = { promiscuous = "reject", mac_changes = "reject", forged_transmits = "reject" }
[[portgroups]]
name = "open"
security = { mac_changes = "accept", forged_transmits = "accept" }
[[portgroups]]
name = "tap"
security = { promiscuous = "accept" }
[[ports]]
name = "vm5"
portgroup = "strict"
mac = "02:00:00:00:05:05"
[[ports]]
name = "vm6"
portgroup = "strict"
mac = "02:00:00:00:05:06"
[[ports]]
name = "vm7"
portgroup = "open"
mac = "02:00:00:00:05:07"
[[ports]]
name = "mon"
portgroup = "tap"
"#,
        &h,
        "esx1",
    );
    let v5 = vm(&h, "vm5", "v5", "10.5.0.5");
    let v6 = vm(&h, "vm6", "v6", "10.5.0.6");
    let v7 = vm(&h, "vm7", "v7", "10.5.0.7");
    let mon = vm(&h, "mon", "vm", "10.5.0.9");
    assert!(v5.ping("10.5.0.6", 2));
    assert!(v7.ping("10.5.0.6", 2));

    // Promiscuous: the monitor port sees unicast between two other VMs.
    let tap = RawPeer::open(&mon, "mon");
    let _ = v5.ok("ping -c 2 -i 0.1 -W 1 10.5.0.6");
    let seen = tap.collect(Duration::from_millis(300), |f, _| {
        src(f) == mac("02:00:00:00:05:05") && f[0..6] == mac("02:00:00:00:05:06").0
    });
    assert!(!seen.is_empty(), "the promiscuous port saw nothing");

    // Forged transmit from the strict port: dropped; the same frame from its own MAC
    // passes.
    let r5 = RawPeer::open(&v5, "vm5");
    let r6 = RawPeer::open(&v6, "vm6");
    let forged = mac("02:66:66:66:66:66");
    r5.send(&eth(MacAddr::BROADCAST, forged, None, 0x88b5, b"forged"));
    r5.send(&eth(
        MacAddr::BROADCAST,
        mac("02:00:00:00:05:05"),
        None,
        0x88b5,
        b"honest",
    ));
    let got = r6.collect(Duration::from_millis(300), |f, _| f[12..14] == [0x88, 0xb5]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(src(&got[0].0), mac("02:00:00:00:05:05"));
    assert!(sw.counters()["vm5"].drops[DropReason::ForgedTransmit.label()] >= 1);

    // The same forged frame from the open port passes.
    let r7 = RawPeer::open(&v7, "vm7");
    r7.send(&eth(MacAddr::BROADCAST, forged, None, 0x88b5, b"forged"));
    let got = r6.collect(Duration::from_millis(300), |f, _| f[12..14] == [0x88, 0xb5]);
    assert_eq!(
        got.len(),
        1,
        "open port's forged transmit must pass: {got:?}"
    );

    // MAC change on the strict port: its traffic stops, and it is blocked.
    v5.exec("ip link set vm5 address 02:55:55:55:55:55");
    assert!(
        !v5.ping("10.5.0.6", 3),
        "a rejected MAC change must cut the VM off"
    );
    let st = sw.status().expect("status");
    let p5 = st.ports.iter().find(|p| p.name == "vm5").expect("vm5");
    assert!(p5.blocked, "{p5:?}");
    let c5 = &sw.counters()["vm5"];
    assert!(c5.drops[DropReason::ForgedTransmit.label()] >= 2, "{c5:?}");
    // Changing back restores it.
    v5.exec("ip link set vm5 address 02:00:00:00:05:05");
    let _ = v5.ok("ping -c 1 -W 1 10.5.0.6");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        v5.ping("10.5.0.6", 3),
        "back on its own MAC the VM must reach again"
    );

    // MAC change on the open port: accepted, the VM keeps working on its new MAC.
    v7.exec("ip link set vm7 address 02:77:77:77:77:77");
    let _ = v7.ok("ping -c 1 -W 1 10.5.0.6");
    assert!(
        v7.ping("10.5.0.6", 3),
        "an accepted MAC change must keep working"
    );
    let st = sw.status().expect("status");
    let p7 = st.ports.iter().find(|p| p.name == "vm7").expect("vm7");
    assert_eq!(p7.mac.as_deref(), Some("02:77:77:77:77:77"));
    assert!(!p7.blocked);
    drop(sw);
}

/// Outbound shaping: a shaped port's iperf3 rate is within 10% of its average.
#[test]
fn shaping_holds_the_average_rate() {
    assert!(root(), "the switch tests need root");
    let h = Ns::new("h");
    let sw = start(
        r#"
name = "vs0"
[[portgroups]]
name = "shaped"
shaping = { average_bps = 200_000_000, peak_bps = 400_000_000, burst_bytes = 1_000_000 }
[[portgroups]]
name = "free"
[[ports]]
name = "vm1"
portgroup = "shaped"
[[ports]]
name = "vm2"
portgroup = "free"
"#,
        &h,
        "esx1",
    );
    let v1 = vm(&h, "vm1", "v1", "10.6.0.1");
    let v2 = vm(&h, "vm2", "v2", "10.6.0.2");
    assert!(v1.ping("10.6.0.2", 2));
    let _s2 = iperf_server(&v2);
    let bps = iperf(&v1, "10.6.0.2", "-t 5");
    eprintln!("shaped vm1 -> vm2: {:.1} Mbit/s (average 200)", bps / 1e6);
    assert!(
        (bps - 200e6).abs() <= 20e6,
        "shaped rate {bps} not within 10% of 200 Mbit/s"
    );
    // The other direction is not shaped (shaping is what a port sends).
    let _s1 = iperf_server(&v1);
    let back = iperf(&v2, "10.6.0.1", "-t 2");
    eprintln!("unshaped vm2 -> vm1: {:.2} Gbit/s", back / 1e9);
    assert!(back > 400e6, "{back}");
    drop(sw);
}

//! Fixtures for the switch's end-to-end tests: network namespaces as hosts, veth pairs
//! as cables, a Linux bridge in its own namespace as the physical switch, TAP devices
//! moved into namespaces as VMs, and raw-socket peers. Everything is named uniquely per
//! test process and removed by Drop guards, even when a test fails. Nothing touches the
//! root namespace's interfaces or routes.
#![allow(dead_code)]

use basalt_net::io::{in_netns, PacketOptions, PacketSocket};
use basalt_net::{MacAddr, Switch, SwitchDefinition, SwitchOptions};
use std::io::IoSlice;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a shell command; panics with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a shell command and returns its output whatever happens.
pub fn run(cmd: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs")
}

/// A short prefix unique to this test process, for interface and namespace names.
pub fn uniq(tag: &str) -> String {
    let pid = std::process::id();
    let mut n = pid;
    let mut s = String::new();
    while n > 0 {
        let d = (n % 36) as u8;
        s.push(if d < 10 {
            (b'0' + d) as char
        } else {
            (b'a' + d - 10) as char
        });
        n /= 36;
    }
    let name = format!("b{s}{tag}");
    assert!(name.len() <= 15, "name too long: {name}");
    name
}

/// A network namespace, deleted on drop (with every interface in it).
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = uniq(tag);
        let _ = run(&format!("ip netns del {name} 2>/dev/null"));
        sh(&format!("ip netns add {name}"));
        let ns = Ns { name };
        ns.exec("ip link set lo up");
        ns.exec("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }

    /// Runs a command inside the namespace; returns whether it succeeded.
    pub fn ok(&self, cmd: &str) -> bool {
        run(&format!("ip netns exec {} {cmd}", self.name))
            .status
            .success()
    }

    /// Starts a command in the background inside the namespace; killed on drop.
    pub fn spawn(&self, cmd: &str) -> Bg {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "bash",
                "-c",
                &format!("exec {cmd}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        Bg(Some(child))
    }

    /// Whether `ip` can ping `to` within `count` tries.
    pub fn ping(&self, to: &str, count: u32) -> bool {
        self.ok(&format!("ping -q -c {count} -i 0.2 -W 1 {to}"))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run(&format!(
            "ip netns pids {} | xargs -r kill 2>/dev/null",
            self.name
        ));
        let _ = run(&format!("ip netns del {}", self.name));
    }
}

/// A background process, killed on drop.
pub struct Bg(Option<Child>);

impl Bg {
    /// Waits for the process and returns its stdout.
    pub fn wait(mut self) -> String {
        let c = self.0.take().expect("child");
        let o = c.wait_with_output().expect("wait");
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A veth pair with one end in each namespace, both up.
pub fn cable(a: &Ns, a_if: &str, b: &Ns, b_if: &str) {
    sh(&format!(
        "ip -n {an} link add {a_if} type veth peer name {b_if} netns {bn} && ip -n {an} link set {a_if} up && ip -n {bn} link set {b_if} up",
        an = a.name,
        bn = b.name
    ));
}

/// A physical switch: a Linux bridge `br0` in its own namespace.
pub fn physical_switch(tag: &str) -> Ns {
    let p = Ns::new(tag);
    p.exec("ip link add br0 type bridge");
    p.exec("ip link set br0 up");
    p
}

/// Plugs `ifname` (in the physical switch's namespace) into its bridge.
pub fn plug(p: &Ns, ifname: &str) {
    p.exec(&format!("ip link set {ifname} master br0"));
}

/// Moves a TAP the switch made in `host` into a new VM namespace and gives it an IPv4
/// address (a /24).
pub fn vm(host: &Ns, tap: &str, tag: &str, ip: &str) -> Ns {
    let v = Ns::new(tag);
    sh(&format!(
        "ip -n {} link set {tap} netns {}",
        host.name, v.name
    ));
    v.exec(&format!("ip addr add {ip}/24 dev {tap}"));
    v.exec(&format!("ip link set {tap} up"));
    v
}

/// Starts a switch whose devices live in `host`.
pub fn start(def: &str, host: &Ns, host_name: &str) -> Switch {
    let def = SwitchDefinition::from_toml(def).expect("definition");
    Switch::start_with(
        def,
        SwitchOptions {
            host: host_name.to_string(),
            netns: Some(host.path()),
            ..SwitchOptions::default()
        },
    )
    .expect("switch starts")
}

/// A raw AF_PACKET peer on an interface inside a namespace (no virtio-net header), that
/// sends and receives tagged frames.
pub struct RawPeer {
    sock: PacketSocket,
}

impl RawPeer {
    pub fn open(ns: &Ns, ifname: &str) -> RawPeer {
        let ifname = ifname.to_string();
        let sock = in_netns(Some(&ns.path()), move || {
            PacketSocket::open(
                &ifname,
                PacketOptions {
                    vnet_hdr: false,
                    promiscuous: true,
                    qdisc_bypass: false,
                    buffer_bytes: 1 << 20,
                },
            )
        })
        .expect("raw socket");
        RawPeer { sock }
    }

    pub fn send(&self, frame: &[u8]) {
        self.sock.send(&[IoSlice::new(frame)]).expect("raw send");
    }

    /// Receives frames for up to `wait`, returning (frame with its tag re-inserted, vid)
    /// for each one `keep` accepts.
    pub fn collect(
        &self,
        wait: Duration,
        mut keep: impl FnMut(&[u8], Option<u16>) -> bool,
    ) -> Vec<(Vec<u8>, Option<u16>)> {
        let end = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70000];
        while Instant::now() < end {
            match self.sock.recv(&mut buf) {
                Ok((n, tci)) => {
                    let f = &buf[..n];
                    // The kernel strips a received tag into metadata; an inline tag is
                    // the frame's own.
                    let (frame, vid) = match tci {
                        Some(t) => {
                            let mut v = f[..12].to_vec();
                            v.extend_from_slice(&[0x81, 0, (t >> 8) as u8, t as u8]);
                            v.extend_from_slice(&f[12..]);
                            (v, Some(t & 0xfff))
                        }
                        None if n >= 16 && f[12] == 0x81 && f[13] == 0 => {
                            (f.to_vec(), Some(u16::from_be_bytes([f[14], f[15]]) & 0xfff))
                        }
                        None => (f.to_vec(), None),
                    };
                    if keep(&frame, vid) {
                        out.push((frame, vid));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        out
    }
}

/// An Ethernet frame: dst, src, optional 802.1Q tag, ethertype, payload padded to 60.
pub fn eth(
    dst: MacAddr,
    src: MacAddr,
    vid: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = dst.0.to_vec();
    f.extend_from_slice(&src.0);
    if let Some(v) = vid {
        f.extend_from_slice(&[0x81, 0, (v >> 8) as u8, v as u8]);
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An ARP request payload: who has `target` (IPv4), tell `sender_ip` at `sender`.
pub fn arp_request(sender: MacAddr, sender_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&sender.0);
    p.extend_from_slice(&sender_ip);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    p
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &Ns, ifname: &str) -> MacAddr {
    ns.exec(&format!("cat /sys/class/net/{ifname}/address"))
        .trim()
        .parse()
        .expect("mac")
}

/// Source MAC of a frame.
pub fn src(f: &[u8]) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&f[6..12]);
    MacAddr(m)
}

/// Whether this process may create namespaces (the tests need root), and the peers the
/// tests talk to are installed (panics naming the missing ones).
pub fn root() -> bool {
    let missing: Vec<&str> = ["ip", "bridge", "ping", "iperf3", "tshark", "ss"]
        .into_iter()
        .filter(|t| !run(&format!("command -v {t}")).status.success())
        .collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: apt-get install iproute2 iputils-ping iperf3 tshark"
    );
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Parses iperf3's JSON output and returns the receiver's rate in bits per second.
pub fn iperf_bps(json: &str) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {json}"));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| v["end"]["sum"]["bits_per_second"].as_f64())
        .unwrap_or_else(|| panic!("no rate in {json}"))
}

/// Runs iperf3 from `client` to `server_ip` (a server must run in the other namespace)
/// and returns the received rate.
pub fn iperf(client: &Ns, server_ip: &str, args: &str) -> f64 {
    let out = client.exec(&format!("iperf3 -J -c {server_ip} {args}"));
    iperf_bps(&out)
}

/// Starts an iperf3 server in `ns` and waits until it listens.
pub fn iperf_server(ns: &Ns) -> Bg {
    let bg = ns.spawn("iperf3 -s");
    for _ in 0..50 {
        if ns.ok("ss -ltn | grep -q ':5201'") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bg
}

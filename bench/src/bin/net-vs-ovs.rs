//! `net-vs-ovs`: Basalt's userspace switch against Open vSwitch's userspace (netdev)
//! datapath and the Linux bridge, in one run, between the same two network namespaces.
//!
//! Datapaths:
//! - `bridge`: a Linux bridge in its own namespace, veth pairs to the two hosts, default
//!   offloads (the kernel's best case).
//! - `ovs-txoff`: OVS, `datapath_type=netdev`, veth ports with tx checksumming off (what
//!   it needs without userspace TSO).
//! - `ovs-tso`: the same with `other_config:userspace-tso-enable=true`.
//! - `basalt-tap`: Basalt's VM ports: the switch's TAP devices moved into the two
//!   namespaces (virtio-net headers, offloads on).
//! - `basalt-veth`: Basalt with the same veth topology as OVS, attached as `netdev`
//!   ports through AF_PACKET (virtio-net headers, recvmmsg/sendmmsg).
//!
//! Basalt's datapath thread runs at nice -10 (its default); every ovs-vswitchd thread is
//! reniced to -10 too, so both userspace switches get the same share on a busy host.
//!
//! Workloads: iperf3 TCP with 1 and 4 streams, and UDP with 64-byte payloads at full
//! speed (received packets per second). OVS runs from a private database and run
//! directory, started and stopped here (by pid); nothing of the host's is touched.

use basalt_net::{Switch, SwitchDefinition, SwitchOptions};
use clap::Parser;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Basalt's switch against OVS netdev and the Linux bridge.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Skip Open vSwitch.
    #[arg(long)]
    skip_ovs: bool,
    /// Only the datapaths whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Rounds over every datapath; the order alternates between rounds (forward,
    /// backward, ...) to spread drift, and the table shows the mean of the rounds.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

fn sh(cmd: &str) -> Result<String, BoxError> {
    let o = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        return Err(format!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn quiet(cmd: &str) {
    let _ = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output();
}

/// A namespace, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: &str) -> Result<Ns, BoxError> {
        quiet(&format!("ip netns del {name} 2>/dev/null"));
        sh(&format!("ip netns add {name}"))?;
        let ns = Ns(name.to_string());
        ns.exec("ip link set lo up")?;
        ns.exec(
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        )?;
        Ok(ns)
    }
    fn exec(&self, cmd: &str) -> Result<String, BoxError> {
        sh(&format!("ip netns exec {} {cmd}", self.0))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        quiet(&format!(
            "ip netns pids {} | xargs -r kill 2>/dev/null",
            self.0
        ));
        quiet(&format!("ip netns del {}", self.0));
    }
}

/// What one datapath leaves running; dropped after its measurements.
#[allow(dead_code)] // The fields are held only for their Drop.
enum Running {
    Nothing,
    Switch(Box<Switch>),
    Ovs(Ovs),
}

/// A private ovsdb-server and ovs-vswitchd, stopped by pid on drop.
struct Ovs {
    dir: PathBuf,
}

impl Ovs {
    fn vsctl(&self, args: &str) -> Result<String, BoxError> {
        sh(&format!(
            "ovs-vsctl --db=unix:{}/db.sock {args}",
            self.dir.display()
        ))
    }

    fn start(tso: bool) -> Result<Ovs, BoxError> {
        let dir = PathBuf::from(format!("/tmp/basalt-bench-ovs-{}", std::process::id()));
        quiet(&format!("rm -rf {}", dir.display()));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let env = format!("OVS_RUNDIR={d} OVS_LOGDIR={d} OVS_DBDIR={d} OVS_SYSCONFDIR={d}");
        sh(&format!(
            "ovsdb-tool create {d}/conf.db /usr/share/openvswitch/vswitch.ovsschema"
        ))?;
        sh(&format!(
            "{env} ovsdb-server {d}/conf.db --remote=punix:{d}/db.sock --pidfile={d}/ovsdb-server.pid --unixctl={d}/ovsdb-server.ctl --log-file={d}/ovsdb-server.log --detach"
        ))?;
        let ovs = Ovs { dir };
        ovs.vsctl("--no-wait init")?;
        if tso {
            ovs.vsctl("--no-wait set Open_vSwitch . other_config:userspace-tso-enable=true")?;
        }
        sh(&format!(
            "{env} ovs-vswitchd unix:{d}/db.sock --pidfile={d}/ovs-vswitchd.pid --unixctl={d}/ovs-vswitchd.ctl --log-file={d}/ovs-vswitchd.log --detach"
        ))?;
        Ok(ovs)
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        let d = self.dir.display();
        quiet(&format!(
            "ovs-vsctl --db=unix:{d}/db.sock --timeout=5 --if-exists del-br bbr0"
        ));
        for p in ["ovs-vswitchd", "ovsdb-server"] {
            quiet(&format!("kill $(cat {d}/{p}.pid) 2>/dev/null"));
        }
        std::thread::sleep(Duration::from_millis(300));
        quiet(&format!("rm -rf {d}"));
    }
}

const DATAPATHS: [&str; 5] = [
    "bridge",
    "ovs-txoff",
    "ovs-tso",
    "basalt-tap",
    "basalt-veth",
];

/// Builds the datapath between namespaces `c` and `s` (10.77.0.1 and .2 on `eth0`).
fn setup(dp: &str, c: &Ns, s: &Ns, sw: &Ns) -> Result<Running, BoxError> {
    let addr = |ns: &Ns, ip: &str| -> Result<(), BoxError> {
        ns.exec(&format!("ip addr add {ip}/24 dev eth0"))?;
        ns.exec("ip link set eth0 up")?;
        Ok(())
    };
    match dp {
        "bridge" => {
            sw.exec("ip link add br0 type bridge")?;
            sw.exec("ip link set br0 up")?;
            for (ns, v) in [(c, "v1"), (s, "v2")] {
                sh(&format!(
                    "ip -n {} link add {v} type veth peer name eth0 netns {}",
                    sw.0, ns.0
                ))?;
                sw.exec(&format!("ip link set {v} master br0"))?;
                sw.exec(&format!("ip link set {v} up"))?;
            }
            addr(c, "10.77.0.1")?;
            addr(s, "10.77.0.2")?;
            Ok(Running::Nothing)
        }
        "ovs-txoff" | "ovs-tso" => {
            let tso = dp == "ovs-tso";
            let ovs = Ovs::start(tso)?;
            ovs.vsctl("add-br bbr0 -- set bridge bbr0 datapath_type=netdev")?;
            for (ns, v) in [(c, "bovs1"), (s, "bovs2")] {
                quiet(&format!("ip link del {v} 2>/dev/null"));
                sh(&format!(
                    "ip link add {v} type veth peer name eth0 netns {}",
                    ns.0
                ))?;
                sh(&format!("ip link set {v} up"))?;
                if !tso {
                    sh(&format!("ethtool -K {v} tx off >/dev/null"))?;
                    ns.exec("ethtool -K eth0 tx off >/dev/null")?;
                }
                ovs.vsctl(&format!("add-port bbr0 {v}"))?;
            }
            addr(c, "10.77.0.1")?;
            addr(s, "10.77.0.2")?;
            // The same priority as Basalt's datapath thread (nice -10), for every
            // thread of ovs-vswitchd.
            quiet(&format!(
                "for t in /proc/$(cat {}/ovs-vswitchd.pid)/task/*; do renice -n -10 -p ${{t##*/}} >/dev/null; done",
                ovs.dir.display()
            ));
            Ok(Running::Ovs(ovs))
        }
        "basalt-tap" => {
            let def = SwitchDefinition::from_toml(
                "name = \"bench\"\n[[portgroups]]\nname = \"pg\"\n\
                 [[ports]]\nname = \"p1\"\nportgroup = \"pg\"\n\
                 [[ports]]\nname = \"p2\"\nportgroup = \"pg\"\n",
            )?;
            let swi = Switch::start_with(
                def,
                SwitchOptions {
                    host: "bench".into(),
                    netns: Some(sw.path()),
                    ..SwitchOptions::default()
                },
            )?;
            for (ns, p) in [(c, "p1"), (s, "p2")] {
                sh(&format!("ip -n {} link set {p} netns {}", sw.0, ns.0))?;
                ns.exec(&format!("ip link set {p} name eth0"))?;
            }
            addr(c, "10.77.0.1")?;
            addr(s, "10.77.0.2")?;
            Ok(Running::Switch(Box::new(swi)))
        }
        "basalt-veth" => {
            for (ns, v) in [(c, "v1"), (s, "v2")] {
                sh(&format!(
                    "ip -n {} link add {v} type veth peer name eth0 netns {}",
                    sw.0, ns.0
                ))?;
            }
            let def = SwitchDefinition::from_toml(
                "name = \"bench\"\n[[portgroups]]\nname = \"pg\"\n\
                 [[ports]]\nname = \"p1\"\nportgroup = \"pg\"\nkind = \"netdev\"\ninterface = \"v1\"\n\
                 [[ports]]\nname = \"p2\"\nportgroup = \"pg\"\nkind = \"netdev\"\ninterface = \"v2\"\n",
            )?;
            let swi = Switch::start_with(
                def,
                SwitchOptions {
                    host: "bench".into(),
                    netns: Some(sw.path()),
                    ..SwitchOptions::default()
                },
            )?;
            addr(c, "10.77.0.1")?;
            addr(s, "10.77.0.2")?;
            Ok(Running::Switch(Box::new(swi)))
        }
        _ => Err(format!("unknown datapath {dp}").into()),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Result3 {
    tcp1: f64,
    tcp4: f64,
    udp_pps: f64,
}

fn iperf(c: &Ns, s: &Ns, args: &str) -> Result<serde_json::Value, BoxError> {
    quiet(&format!("ip netns exec {} pkill -x iperf3", s.0));
    let mut server = Command::new("ip")
        .args(["netns", "exec", &s.0, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..50 {
        if s.exec("ss -ltn")
            .map(|o| o.contains(":5201"))
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = c.exec(&format!("iperf3 -J -c 10.77.0.2 {args}"));
    let _ = server.kill();
    let _ = server.wait();
    Ok(serde_json::from_str(&out?)?)
}

fn measure(c: &Ns, s: &Ns, secs: u32) -> Result<Result3, BoxError> {
    let bps = |v: &serde_json::Value| {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let tcp1 = bps(&iperf(c, s, &format!("-t {secs}"))?);
    let tcp4 = bps(&iperf(c, s, &format!("-t {secs} -P 4"))?);
    let u = iperf(c, s, &format!("-t {secs} -u -b 0 -l 64"))?;
    // UDP: packets the server received per second.
    let sum = &u["end"]["sum"];
    let packets =
        sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs_f = sum["seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(f64::from(secs));
    Ok(Result3 {
        tcp1,
        tcp4,
        udp_pps: packets / secs_f,
    })
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let tag = format!("bnb{}", std::process::id() % 100_000);
    let chosen: Vec<&str> = DATAPATHS
        .into_iter()
        .filter(|dp| !(args.skip_ovs && dp.starts_with("ovs")))
        .filter(|dp| args.only.as_deref().is_none_or(|o| dp.contains(o)))
        .collect();
    let mut runs: Vec<(&str, Vec<Result3>)> = chosen.iter().map(|d| (*d, Vec::new())).collect();
    for round in 0..args.rounds.max(1) {
        let mut order: Vec<usize> = (0..chosen.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let dp = chosen[i];
            let c = Ns::new(&format!("{tag}c"))?;
            let s = Ns::new(&format!("{tag}s"))?;
            let sw = Ns::new(&format!("{tag}w"))?;
            eprint!("round {} {dp:12} ... ", round + 1);
            let r = setup(dp, &c, &s, &sw).and_then(|running| {
                c.exec("ping -c 3 -i 0.2 -W 1 10.77.0.2")?;
                let r = measure(&c, &s, args.seconds);
                drop(running);
                r
            });
            match r {
                Ok(r) => {
                    eprintln!(
                        "tcp1 {:.2} Gbit/s, tcp4 {:.2} Gbit/s, udp64 {:.0} kpps",
                        r.tcp1 / 1e9,
                        r.tcp4 / 1e9,
                        r.udp_pps / 1e3
                    );
                    runs[i].1.push(r);
                }
                Err(e) => eprintln!("failed: {e}"),
            }
            // Veths in the root namespace (OVS) go with their peers' namespaces.
            drop((c, s, sw));
            quiet("ip link del bovs1 2>/dev/null; ip link del bovs2 2>/dev/null");
        }
    }
    let results: Vec<(&str, Option<Result3>)> = runs
        .into_iter()
        .map(|(d, v)| {
            let n = v.len() as f64;
            let mean = (!v.is_empty()).then(|| Result3 {
                tcp1: v.iter().map(|r| r.tcp1).sum::<f64>() / n,
                tcp4: v.iter().map(|r| r.tcp4).sum::<f64>() / n,
                udp_pps: v.iter().map(|r| r.udp_pps).sum::<f64>() / n,
            });
            (d, mean)
        })
        .collect();
    print_table(&results);
    Ok(())
}

fn print_table(results: &[(&str, Option<Result3>)]) {
    let get = |n: &str| results.iter().find(|(d, _)| *d == n).and_then(|(_, r)| *r);
    let best = |names: &[&str], f: fn(&Result3) -> f64| {
        names
            .iter()
            .filter_map(|n| get(n))
            .map(|r| f(&r))
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    type Metric = (&'static str, fn(&Result3) -> f64, f64, &'static str);
    let metrics: [Metric; 3] = [
        ("TCP 1 stream", |r| r.tcp1, 1e9, "Gbit/s"),
        ("TCP 4 streams", |r| r.tcp4, 1e9, "Gbit/s"),
        ("UDP 64 B", |r| r.udp_pps, 1e3, "kpps"),
    ];
    println!();
    print!("{:<15}", "workload");
    for (d, _) in results {
        print!("{d:>13}");
    }
    println!("{:>14}{:>14}", "basalt/ovs", "basalt/bridge");
    for (name, f, scale, unit) in metrics {
        print!("{:<15}", name);
        for (_, r) in results {
            match r {
                Some(r) => print!("{:>13}", format!("{:.2}", f(r) / scale)),
                None => print!("{:>13}", "-"),
            }
        }
        let basalt = best(&["basalt-tap", "basalt-veth"], f);
        let ovs = best(&["ovs-txoff", "ovs-tso"], f);
        let bridge = best(&["bridge"], f);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".to_string(),
        };
        println!(
            "{:>14}{:>14}   ({unit})",
            ratio(basalt, ovs),
            ratio(basalt, bridge)
        );
    }
    println!();
    println!("Means over the rounds. Ratios compare Basalt's best datapath with OVS's best");
    println!("setting and with the Linux bridge.");
    println!("Goals: basalt/ovs >= 2.0, basalt/bridge >= 0.5.");
}

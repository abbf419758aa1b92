//! Network namespaces: a hub namespace with a bridge, where the target listens, and one
//! namespace per host, wired to the bridge by a veth pair. Everything is created inside
//! the new namespaces (the veth pair is created in the hub with its peer born in the
//! host's namespace), so the test never touches the root namespace's links, addresses
//! or routes. Names carry the test process's id; [`Net`]'s `Drop` deletes them, and
//! namespaces left by a test process that died are deleted by the next run.

use std::process::Command;

/// Address of the target (the bridge) in every test's hub namespace. Each test has its
/// own hub, so the same private subnet is reused without conflict.
pub const TARGET_IP: &str = "10.77.0.1";

const PREFIX: &str = "bslm-";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {}: {e} (needs iproute2)", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails (rather than passes unrun) without root and `ip netns`.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip_ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        root && ip_ok,
        "the multi-host tests need root and iproute2 (ip netns): run them as root"
    );
}

/// Deletes namespaces of ours whose creating process is gone.
fn reap_leftovers() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// The namespaces of one test.
pub struct Net {
    /// The hub (bridge + target).
    pub hub: String,
    /// One per host, index 0 = host 1.
    pub hosts: Vec<String>,
    created: Vec<String>,
}

impl Net {
    /// Creates the hub and `n` host namespaces, named after `tag`.
    pub fn new(tag: &str, n: usize) -> Net {
        reap_leftovers();
        let pid = std::process::id();
        let hub = format!("{PREFIX}{pid}-{tag}-hub");
        let mut net = Net {
            hub: hub.clone(),
            hosts: Vec::new(),
            created: Vec::new(),
        };
        ip(&["netns", "add", &hub]);
        net.created.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{TARGET_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 1..=n {
            let ns = format!("{PREFIX}{pid}-{tag}-{i}");
            ip(&["netns", "add", &ns]);
            net.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "e0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", 10 + i),
                "dev",
                "e0",
            ]);
            ip(&["-n", &ns, "link", "set", "e0", "up"]);
            net.hosts.push(ns);
        }
        net
    }

    /// Takes host `i`'s switch port down (or up): its storage path is gone, as if its
    /// cable were pulled; nothing on the host changes.
    pub fn set_port(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{}", i + 1),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a new thread that has entered namespace `ns`; threads it starts (the
/// iSCSI driver thread, a tokio runtime's workers) inherit the namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let p = path.clone();
    std::thread::spawn(move || {
        enter(&p);
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("thread in {path} panicked"))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a valid namespace descriptor affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

//! `nbd-vs-nbdkit`: Basalt's NBD server against nbdkit (file plugin) and qemu-nbd,
//! exporting the same file, measured with fio's nbd engine (libnbd) in one run.
//!
//! All three servers run at once on loopback ports and export one test file through
//! the page cache (nbdkit's file plugin has no O_DIRECT, so Basalt's `UringFile` is
//! opened buffered and qemu-nbd runs with `--cache=writeback`, its default): what is
//! compared is the servers' protocol path, not the disk. The file is written in full
//! with random data and read once before the runs so reads hit cached, allocated
//! blocks.
//!
//! For each workload (4 KiB random read and write at QD 32, 1 MiB sequential read and
//! write at QD 8) fio runs once against each server per round, the order rotating
//! between workloads and rounds to spread drift; the table gives the median over the
//! rounds of IOPS (4 KiB) or MiB/s (1 MiB) and Basalt's ratio to each. The goal is at
//! least 1.2x nbdkit.
//!
//! Beside throughput, the table gives each server process's CPU time (user + system,
//! all threads, from `/proc/PID/stat`) per request, over the whole fio run including
//! its ramp: on a small shared machine it varies far less than throughput does.
//! `--compare PATH` runs a second `nbd-serve` binary (say, a build from before a change)
//! as the server `basalt-b`, in the same rounds, for A/B measurements.

use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Basalt's NBD server against nbdkit and qemu-nbd, with fio's nbd engine.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the test file (created if missing).
    #[arg(long, default_value = "/var/tmp/basalt-bench")]
    dir: PathBuf,
    /// Test file size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Tokio worker threads of the Basalt server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Path of the `nbd-serve` binary (default: next to this one).
    #[arg(long)]
    nbd_serve: Option<PathBuf>,
    /// Delete the test file at the end.
    #[arg(long)]
    remove: bool,
    /// Rounds (every server runs every workload once per round; medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A second `nbd-serve` binary to run as the server `basalt-b` (A/B comparisons).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Servers to run, comma-separated (basalt is always run).
    #[arg(long, default_value = "nbdkit,qemu-nbd")]
    servers: String,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
    /// Report MiB/s rather than IOPS.
    bandwidth: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread 4k qd32",
        rw: "randread",
        bs: "4k",
        qd: 32,
        bandwidth: false,
    },
    Workload {
        name: "randwrite 4k qd32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
        bandwidth: false,
    },
    Workload {
        name: "seqread 1m qd8",
        rw: "read",
        bs: "1m",
        qd: 8,
        bandwidth: true,
    },
    Workload {
        name: "seqwrite 1m qd8",
        rw: "write",
        bs: "1m",
        qd: 8,
        bandwidth: true,
    },
];

struct Server {
    name: &'static str,
    uri: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn wait_port(port: u16) -> Result<(), BoxError> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on port {port}").into())
}

fn start_basalt(
    name: &'static str,
    bin: &Path,
    file: &Path,
    workers: usize,
) -> Result<Server, BoxError> {
    let port = free_port()?;
    let mut child = Command::new(bin)
        .arg(file)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--name", "bench", "--direct", "off"])
        .args(["--workers", &workers.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if let Some(out) = child.stdout.take() {
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.starts_with("listening on") {
            return Err(format!("nbd-serve said {line:?}").into());
        }
    }
    wait_port(port)?;
    Ok(Server {
        name,
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        child,
    })
}

fn start_nbdkit(file: &Path) -> Result<Server, BoxError> {
    let port = free_port()?;
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exportname=bench", "-i", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .arg("file")
        .arg(format!("file={}", file.display()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run nbdkit: {e}"))?;
    wait_port(port)?;
    Ok(Server {
        name: "nbdkit",
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        child,
    })
}

fn start_qemu_nbd(file: &Path) -> Result<Server, BoxError> {
    let port = free_port()?;
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-x",
            "bench",
            "--persistent",
        ])
        .args(["--shared=8", "--cache=writeback", "--aio=threads"])
        .args(["-p", &port.to_string()])
        .arg(file)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run qemu-nbd: {e}"))?;
    wait_port(port)?;
    Ok(Server {
        name: "qemu-nbd",
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        child,
    })
}

/// User + system CPU seconds of a process, all threads (dead ones included).
fn cpu_seconds(pid: u32) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, that is 11 and 12 after the name and state.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

/// One fio run: the rate (IOPS or MiB/s) and the server's CPU microseconds per request.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rate: f64,
    cpu_us: f64,
}

/// Runs fio once against `s` and measures the server's CPU time meanwhile.
fn measure(s: &Server, w: &Workload, size: u64, runtime: u64) -> Result<Sample, BoxError> {
    let pid = s.child.id();
    let c0 = cpu_seconds(pid)?;
    let (rate, iops) = fio(&s.uri, w, size, runtime)?;
    let c1 = cpu_seconds(pid)?;
    // The CPU time covers the ramp second too, at about the same rate.
    let ops = iops * (runtime + RAMP_SECS) as f64;
    let cpu_us = if ops > 0.0 {
        (c1 - c0) * 1e6 / ops
    } else {
        f64::NAN
    };
    Ok(Sample { rate, cpu_us })
}

const RAMP_SECS: u64 = 1;

/// Runs fio once and returns IOPS or MiB/s, and IOPS.
fn fio(uri: &str, w: &Workload, size: u64, runtime: u64) -> Result<(f64, f64), BoxError> {
    let out = Command::new("fio")
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", w.rw),
            &format!("--bs={}", w.bs),
            &format!("--iodepth={}", w.qd),
            &format!("--size={size}"),
            "--time_based",
            &format!("--runtime={runtime}"),
            &format!("--ramp_time={RAMP_SECS}"),
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = &text[text.find('{').ok_or("no JSON from fio")?..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let job = &v["jobs"][0];
    let side = if w.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let iops = job[side]["iops"].as_f64().unwrap_or(0.0);
    let r = if w.bandwidth {
        job[side]["bw_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
    } else {
        iops
    };
    Ok((r, iops))
}

/// Writes the test file in full with random data unless a fully allocated file of the
/// right size is there; then reads it once into the page cache.
fn prepare(path: &Path, size: u64) -> Result<(), BoxError> {
    use std::os::unix::fs::MetadataExt;
    let ok = std::fs::metadata(path)
        .map(|m| m.len() == size && m.blocks() * 512 >= size)
        .unwrap_or(false);
    if !ok {
        eprintln!("writing {} MiB test file {}", size >> 20, path.display());
        let mut f = std::fs::File::create(path)?;
        let mut x = 0x243F_6A88_85A3_08D3u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf)?;
        }
        f.sync_all()?;
    }
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let file = args.dir.join("nbd-bench.img");
    let size = args.size_mib << 20;
    prepare(&file, size)?;
    let serve_bin = match &args.nbd_serve {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no parent directory")?
            .join("nbd-serve"),
    };
    let wanted: Vec<&str> = args.servers.split(',').map(str::trim).collect();
    let mut servers = vec![start_basalt("basalt", &serve_bin, &file, args.workers)?];
    if let Some(b) = &args.compare {
        servers.push(start_basalt("basalt-b", b, &file, args.workers)?);
    }
    if wanted.contains(&"nbdkit") {
        servers.push(start_nbdkit(&file)?);
    }
    if wanted.contains(&"qemu-nbd") {
        servers.push(start_qemu_nbd(&file)?);
    }
    let names: Vec<&str> = servers.iter().map(|s| s.name).collect();
    let workloads: Vec<Workload> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| {
            args.only
                .as_ref()
                .is_none_or(|o| w.name.contains(o.as_str()))
        })
        .collect();
    let n = servers.len();
    // samples[workload][server] = one sample per round
    let mut samples = vec![vec![Vec::<Sample>::new(); n]; workloads.len()];
    for round in 0..args.rounds.max(1) {
        for (i, w) in workloads.iter().enumerate() {
            for k in 0..n {
                let idx = (i + round + k) % n;
                let s = &servers[idx];
                let r = measure(s, w, size, args.runtime)?;
                eprintln!(
                    "round {round} {:<18} {:<9} {:>10.1} {:>8.1} us/req",
                    w.name, s.name, r.rate, r.cpu_us
                );
                samples[i][idx].push(r);
            }
        }
    }
    drop(servers);

    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            l if l % 2 == 1 => v[l / 2],
            l => (v[l / 2 - 1] + v[l / 2]) / 2.0,
        }
    };
    println!();
    println!(
        "median of {} round(s), {} s each (CPU: server user+sys per request)",
        args.rounds.max(1),
        args.runtime
    );
    print!("{:<18} {:>5}", "workload", "unit");
    for name in &names {
        print!(" {name:>10}");
    }
    for name in &names[1..] {
        print!(" {:>12}", format!("b/{name}"));
    }
    for name in &names {
        print!(" {:>10}", format!("us:{name}"));
    }
    println!();
    for (i, w) in workloads.iter().enumerate() {
        let unit = if w.bandwidth { "MiB/s" } else { "IOPS" };
        let rates: Vec<f64> = (0..n)
            .map(|k| median(&mut samples[i][k].iter().map(|s| s.rate).collect()))
            .collect();
        let cpus: Vec<f64> = (0..n)
            .map(|k| median(&mut samples[i][k].iter().map(|s| s.cpu_us).collect()))
            .collect();
        print!("{:<18} {:>5}", w.name, unit);
        for r in &rates {
            print!(" {r:>10.0}");
        }
        for r in &rates[1..] {
            let ratio = if *r > 0.0 { rates[0] / r } else { f64::NAN };
            print!(" {:>11.2}x", ratio);
        }
        for c in &cpus {
            print!(" {c:>10.1}");
        }
        println!();
    }
    if args.remove {
        std::fs::remove_file(&file)?;
    }
    Ok(())
}

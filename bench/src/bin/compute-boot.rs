//! `compute-boot`: how fast VMs start and how much the VMM costs, against Firecracker's
//! published targets (<= 125 ms to guest init, <= 5 MiB VMM memory overhead) and QEMU
//! on this machine.
//!
//! 1. QEMU runner (TCG here): from spawning `qemu-system-x86_64` (through
//!    `basalt_compute::qemu`, QMP included) to the test guest's `BASALT-GUEST-READY`
//!    marker on the serial console: kernel boot, module loading, disk and NIC checks.
//! 2. Built-in runner, in process: `Vm::new` for a 128 MiB VM (memory, irqchip, devices,
//!    vCPU, loading a vmlinux-style ELF) to the guest's first instruction that exits to
//!    the VMM, and to the whole run ending.
//! 3. Built-in runner, as a process (`--vmm-bin`): `basalt vmm` spawned to the first
//!    guest exit (as the VMM measures it from its own start) and to its exit, and the
//!    VMM's RSS overhead for a 128 MiB VM (process RSS minus the resident part of the
//!    guest-memory mapping), against QEMU's RSS for the same VM size, paused (`-S`).
//!
//! Firecracker's 125 ms covers a Linux boot to init; this host's nested KVM (PVM) cannot
//! boot a stock kernel quickly (see compute/PVM.md), so for the built-in runner the
//! start-to-first-guest-instruction time is what can be compared.

use basalt_compute::definition::VmDefinition;
use basalt_compute::qemu::{Accel, Qemu, QemuCommand};
use basalt_compute::vmm::boot::flat_elf;
use basalt_compute::vmm::console::ConsoleOut;
use basalt_compute::vmm::{BootSpec, Vm, VmConfig, VmExit};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "VM start time and VMM overhead: built-in runner, QEMU, Firecracker's targets")]
struct Args {
    /// The VMM binary (`basalt-compute-vmm` or `basalt`; with `basalt`, pass --vmm-prefix vmm).
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Arguments before the VMM's own (`vmm` for the basalt binary).
    #[arg(long)]
    vmm_prefix: Vec<String>,
    /// The test guest (vmlinuz, initrd.gz) from deploy/guest/build.sh.
    #[arg(long, default_value_t = default_guest())]
    guest_dir: String,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest memory for the built-in runner and the QEMU RSS baseline, MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u32,
}

fn default_guest() -> String {
    std::env::var("HOME")
        .map(|h| format!("{h}/.cache/basalt-guest"))
        .unwrap_or_else(|_| "/root/.cache/basalt-guest".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// `out 0x501, 0` straight away: the first guest instruction exits.
const EXIT_NOW: [u8; 7] = [0x66, 0xba, 0x01, 0x05, 0xb0, 0x00, 0xee];
/// Power off through the ACPI sleep register (S5): the first instruction that exits.
const POWER_OFF: [u8; 7] = [0x66, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee];

fn builtin_in_process(memory_mib: u32, runs: usize) -> (f64, f64) {
    let mut first = Vec::new();
    let mut total = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let vm = Vm::new(VmConfig {
            vcpus: 1,
            memory_mib,
            mergeable: true,
            boot: BootSpec::LongMode {
                code: EXIT_NOW.to_vec(),
                load_addr: 0x10_0000,
            },
            hide_features: Vec::new(),
            console: ConsoleOut::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            balloon: true,
            io: None,
        })
        .expect("built-in VM (needs /dev/kvm)");
        let probe = vm.first_exit_probe();
        let exit = vm.run().expect("run");
        assert_eq!(exit, VmExit::Exit(0));
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        if let Some(t) = probe.get() {
            first.push(t.duration_since(t0).as_secs_f64() * 1e3);
        }
    }
    (median(first), median(total))
}

fn write_vm(dir: &Path, name: &str, memory_mib: u32, code: &[u8]) {
    std::fs::create_dir_all(dir).expect("vm dir");
    std::fs::write(dir.join("kernel.elf"), flat_elf(code, 0x20_0000)).expect("kernel");
    let def = VmDefinition::from_json(&format!(
        r#"{{"name":"{name}","vcpus":1,"memory_mib":{memory_mib},"runner":"builtin",
            "boot":{{"kind":"kernel","kernel":"kernel.elf","cmdline":"console=ttyS0"}}}}"#
    ))
    .expect("definition");
    std::fs::write(dir.join("vm.json"), def.to_json()).expect("vm.json");
}

fn vmm_process(bin: &Path, prefix: &[String], memory_mib: u32, runs: usize) -> (f64, f64) {
    let tmp = std::env::temp_dir().join(format!("compute-boot-{}", std::process::id()));
    let dir = tmp.join("bench-vm");
    write_vm(&dir, "bench-vm", memory_mib, &POWER_OFF);
    let mut first = Vec::new();
    let mut total = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = Command::new(bin)
            .args(prefix)
            .args(["--vm-dir".as_ref(), dir.as_os_str()])
            .output()
            .expect("spawn the VMM");
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "VMM failed: {err}");
        if let Some(us) = err
            .lines()
            .find_map(|l| l.strip_prefix("vmm: first guest exit "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
        {
            first.push(us / 1e3);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    (median(first), median(total))
}

/// Total RSS and the resident part of the largest anonymous mapping (guest memory), KiB.
fn rss_split(pid: u32, guest_kib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut guest = 0;
    let mut size = 0;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total += rss;
                if size >= guest_kib {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    (total, guest)
}

fn vmm_rss(bin: &Path, prefix: &[String], memory_mib: u32) -> (u64, u64) {
    let tmp = std::env::temp_dir().join(format!("compute-rss-{}", std::process::id()));
    let dir = tmp.join("rss-vm");
    // Spin: `jmp $`.
    write_vm(&dir, "rss-vm", memory_mib, &[0xeb, 0xfe]);
    let mut child = Command::new(bin)
        .args(prefix)
        .args(["--vm-dir".as_ref(), dir.as_os_str()])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the VMM");
    std::thread::sleep(Duration::from_millis(500));
    let r = rss_split(child.id(), u64::from(memory_mib) * 1024);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

fn qemu_rss(memory_mib: u32) -> Option<(u64, u64)> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-S", "-nodefaults", "-nographic", "-accel", "tcg", "-m"])
        .arg(memory_mib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(1500));
    let r = rss_split(child.id(), u64::from(memory_mib) * 1024);
    let _ = child.kill();
    let _ = child.wait();
    Some(r)
}

fn qemu_boot(guest: &Path, runs: usize) -> Option<f64> {
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initrd.gz");
    if !kernel.exists() || !initrd.exists() {
        eprintln!(
            "no test guest in {} (run deploy/guest/build.sh)",
            guest.display()
        );
        return None;
    }
    let mut times = Vec::new();
    for i in 0..runs {
        let dir = std::env::temp_dir().join(format!("compute-qemu-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let def = VmDefinition::from_json(&format!(
            r#"{{"name":"qb","vcpus":1,"memory_mib":256,"runner":"qemu",
                "boot":{{"kind":"kernel","kernel":"{}","initrd":"{}",
                         "cmdline":"console=ttyS0 panic=-1 quiet basalt.end=poweroff"}}}}"#,
            kernel.display(),
            initrd.display()
        ))
        .ok()?;
        let cmd = QemuCommand::build(&def, &dir, &[], &[], Accel::detect());
        let t0 = Instant::now();
        let mut q = Qemu::spawn(&cmd, &dir).ok()?;
        let log = dir.join("console.log");
        let deadline = t0 + Duration::from_secs(120);
        loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("BASALT-GUEST-READY")
            {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline || q.try_wait().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        q.kill();
        let _ = std::fs::remove_dir_all(&dir);
    }
    Some(median(times))
}

fn main() {
    let args = Args::parse();
    let mib = args.memory_mib;
    println!(
        "compute-boot: {} runs each, medians; guest memory {mib} MiB",
        args.runs
    );
    println!();
    println!(
        "{:<58} {:>12} {:>14} {:>8}",
        "measurement", "value", "Firecracker", "ratio"
    );
    let row = |what: &str, v: f64, unit: &str, target: Option<f64>| {
        let t = target
            .map(|t| format!("<= {t} {unit}"))
            .unwrap_or_else(|| "-".into());
        let r = target
            .map(|t| format!("{:.2}", v / t))
            .unwrap_or_else(|| "-".into());
        println!("{what:<58} {:>9.2} {unit:<2} {t:>14} {r:>8}", v);
    };

    let (first, total) = builtin_in_process(mib, args.runs);
    row(
        "built-in, in process: Vm::new -> first guest exit",
        first,
        "ms",
        Some(125.0),
    );
    row(
        "built-in, in process: Vm::new -> guest done, torn down",
        total,
        "ms",
        None,
    );

    if let Some(bin) = &args.vmm_bin {
        let (first, total) = vmm_process(bin, &args.vmm_prefix, mib, args.runs);
        row(
            "built-in, `basalt vmm` process: start -> first guest exit",
            first,
            "ms",
            Some(125.0),
        );
        row(
            "built-in, `basalt vmm` process: spawn -> exit (power-off)",
            total,
            "ms",
            None,
        );
        let (rss, guest) = vmm_rss(bin, &args.vmm_prefix, mib);
        let overhead = (rss - guest) as f64 / 1024.0;
        row(
            "built-in VMM RSS overhead (RSS - resident guest memory)",
            overhead,
            "MiB",
            Some(5.0),
        );
        println!(
            "  (VMM process RSS {:.2} MiB, of which guest memory {:.2} MiB)",
            rss as f64 / 1024.0,
            guest as f64 / 1024.0
        );
        if let Some((qrss, qguest)) = qemu_rss(mib) {
            let q = (qrss - qguest) as f64 / 1024.0;
            row(
                "QEMU (TCG, paused -S) RSS overhead, same memory size",
                q,
                "MiB",
                Some(5.0),
            );
            println!("  built-in / QEMU overhead: {:.2}", overhead / q);
        }
    } else {
        println!("(pass --vmm-bin to measure the VMM process and its RSS)");
    }

    match qemu_boot(Path::new(&args.guest_dir), args.runs.min(3)) {
        Some(ms) => row(
            &format!(
                "QEMU runner ({:?}): spawn -> test guest marker",
                Accel::detect()
            ),
            ms,
            "ms",
            Some(125.0),
        ),
        None => println!("QEMU runner: skipped (no qemu-system-x86_64 or no test guest)"),
    }
}

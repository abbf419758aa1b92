//! `basalt vmm`: one process per VM.
//!
//! The daemon (through [`crate::supervisor`]) starts `basalt vmm --vm-dir DIR ...` for a
//! VM folder; [`vmm_main`] is the whole body of that subcommand. It reads `vm.json`,
//! picks the runner, connects the disks and NICs the daemon handed over, runs the VM
//! until it stops, and exits with a code that says why ([`EXIT_OK`] and friends); its
//! last stderr line, `vmm: exit: REASON`, says it in words.
//!
//! Arguments (all but `--vm-dir` optional; [`VmmArgs::to_args`] writes them):
//!
//! ```text
//! --vm-dir DIR                 the VM folder (vm.json, console.log, console.sock)
//! --runner builtin|qemu        override the definition's runner
//! --disk ID=URI                nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT,
//!                              or file:PATH; required for LUN disks (the daemon exports
//!                              the LUN over NBD), optional for file and NBD disks
//! --nic ID=tap:NAME | ID=fd:N  the NIC's TAP, by name or as an inherited fd; required
//!                              (port groups are the vSwitch's business)
//! --user UID:GID               drop to this user once the VM is built
//! --stop-grace-secs N          on SIGTERM: ask the guest to power off, kill after N s
//! --nbd-reconnect-secs N       how long requests to an NBD disk wait for a lost
//!                              connection to come back before they fail (default 60;
//!                              see `crate::nbd`)
//! ```
//!
//! Signals: SIGTERM/SIGINT ask for a stop (the QEMU runner presses the ACPI power
//! button and quits QEMU after the grace period; the built-in runner stops the vCPUs
//! and exits, since its guests have no ACPI power button yet). SIGKILL is `kill`.

use crate::definition::{Boot, DiskSource, RunnerKind, VmDefinition};
use crate::nbd::{NbdAddress, NbdDev, NbdOptions, DEFAULT_RECONNECT_WINDOW};
use crate::qemu::{Accel, ConsoleLogCap, Qemu, QemuCommand};
use crate::vmm::console::{self, ConsoleOut};
use crate::vmm::virtio::net::Tap;
use crate::vmm::{BootSpec, DiskConfig, NicConfig, Vm, VmConfig, VmError, VmExit};
use basalt_blockdev::{BlockDev, UringFile, UringOptions};
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The guest powered off, or the VM was stopped on request.
pub const EXIT_OK: i32 = 0;
/// The VM could not be set up (bad definition, missing kernel, disk unreachable...):
/// restarting will not help.
pub const EXIT_SETUP: i32 = 1;
/// The guest or the VMM crashed (triple fault, emulation failure, QEMU died).
pub const EXIT_CRASH: i32 = 2;
/// The guest asked for a reboot; the supervisor starts it again.
pub const EXIT_RESET: i32 = 3;

/// The prefix of the VMM's last stderr line.
pub const EXIT_LINE_PREFIX: &str = "vmm: exit: ";

/// How a disk is reached from the VMM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEndpoint {
    /// An NBD export (the daemon's LUN export, or any NBD server).
    Nbd(NbdAddress),
    /// A file or block device opened directly.
    File(PathBuf),
}

impl DiskEndpoint {
    /// Parses `nbd...` URIs and `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err("file: needs a path".into());
            }
            return Ok(DiskEndpoint::File(PathBuf::from(p)));
        }
        NbdAddress::parse(s)
            .map(DiskEndpoint::Nbd)
            .map_err(|e| e.to_string())
    }

    /// The form [`DiskEndpoint::parse`] reads.
    pub fn to_arg(&self) -> String {
        match self {
            DiskEndpoint::Nbd(a) => a.to_uri(),
            DiskEndpoint::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// How a NIC's TAP reaches the VMM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicEndpoint {
    /// Open the TAP by name (needs CAP_NET_ADMIN unless it is a persistent TAP owned by
    /// the VMM's user).
    TapName(String),
    /// A TAP fd inherited from the daemon (the vSwitch helper opened it).
    TapFd(RawFd),
}

impl NicEndpoint {
    /// Parses `tap:NAME` or `fd:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(n) = s.strip_prefix("tap:") {
            if n.is_empty() || n.len() > 15 {
                return Err(format!("bad TAP name {n:?}"));
            }
            return Ok(NicEndpoint::TapName(n.to_string()));
        }
        if let Some(n) = s.strip_prefix("fd:") {
            return n
                .parse::<RawFd>()
                .ok()
                .filter(|&fd| fd > 2)
                .map(NicEndpoint::TapFd)
                .ok_or_else(|| format!("bad fd {n:?}"));
        }
        Err(format!("{s:?}: expected tap:NAME or fd:N"))
    }

    /// The form [`NicEndpoint::parse`] reads.
    pub fn to_arg(&self) -> String {
        match self {
            NicEndpoint::TapName(n) => format!("tap:{n}"),
            NicEndpoint::TapFd(fd) => format!("fd:{fd}"),
        }
    }
}

/// The arguments of `basalt vmm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmArgs {
    /// The VM folder.
    pub vm_dir: PathBuf,
    /// Runner override.
    pub runner: Option<RunnerKind>,
    /// Disk endpoints by disk id.
    pub disks: Vec<(String, DiskEndpoint)>,
    /// NIC endpoints by NIC id.
    pub nics: Vec<(String, NicEndpoint)>,
    /// Drop to this uid/gid once built.
    pub user: Option<(u32, u32)>,
    /// How long a stop waits for the guest before killing it.
    pub stop_grace: Duration,
    /// How long requests to an NBD disk wait for a lost connection to be restored.
    pub nbd_reconnect: Duration,
}

impl VmmArgs {
    /// Arguments for the VM folder `dir`, with nothing handed over.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmmArgs {
            vm_dir: dir.into(),
            runner: None,
            disks: Vec::new(),
            nics: Vec::new(),
            user: None,
            stop_grace: Duration::from_secs(10),
            nbd_reconnect: DEFAULT_RECONNECT_WINDOW,
        }
    }

    /// Parses the arguments that follow `basalt vmm`.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut it = args.into_iter().map(|a| a.to_string_lossy().into_owned());
        let mut out = VmmArgs::new("");
        let mut dir = None;
        while let Some(a) = it.next() {
            let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            match a.as_str() {
                "--vm-dir" => dir = Some(PathBuf::from(val("--vm-dir")?)),
                "--runner" => {
                    out.runner = Some(match val("--runner")?.as_str() {
                        "builtin" => RunnerKind::Builtin,
                        "qemu" => RunnerKind::Qemu,
                        "auto" => RunnerKind::Auto,
                        other => {
                            return Err(format!("--runner {other}: expected builtin, qemu or auto"))
                        }
                    })
                }
                "--disk" => {
                    let v = val("--disk")?;
                    let (id, uri) = v.split_once('=').ok_or("--disk takes ID=URI")?;
                    out.disks.push((id.to_string(), DiskEndpoint::parse(uri)?));
                }
                "--nic" => {
                    let v = val("--nic")?;
                    let (id, ep) = v
                        .split_once('=')
                        .ok_or("--nic takes ID=tap:NAME or ID=fd:N")?;
                    out.nics.push((id.to_string(), NicEndpoint::parse(ep)?));
                }
                "--user" => {
                    let v = val("--user")?;
                    let parsed = v
                        .split_once(':')
                        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
                    out.user = Some(parsed.ok_or("--user takes UID:GID")?);
                }
                "--stop-grace-secs" => {
                    let v = val("--stop-grace-secs")?;
                    out.stop_grace = Duration::from_secs(
                        v.parse().map_err(|_| format!("--stop-grace-secs {v}"))?,
                    );
                }
                "--nbd-reconnect-secs" => {
                    let v = val("--nbd-reconnect-secs")?;
                    out.nbd_reconnect = Duration::from_secs(
                        v.parse().map_err(|_| format!("--nbd-reconnect-secs {v}"))?,
                    );
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        out.vm_dir = dir.ok_or("--vm-dir is required")?;
        Ok(out)
    }

    /// The argument list [`VmmArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--vm-dir".into(), self.vm_dir.clone().into_os_string()];
        if let Some(r) = self.runner {
            a.push("--runner".into());
            a.push(
                match r {
                    RunnerKind::Auto => "auto",
                    RunnerKind::Builtin => "builtin",
                    RunnerKind::Qemu => "qemu",
                }
                .into(),
            );
        }
        for (id, d) in &self.disks {
            a.push("--disk".into());
            a.push(format!("{id}={}", d.to_arg()).into());
        }
        for (id, n) in &self.nics {
            a.push("--nic".into());
            a.push(format!("{id}={}", n.to_arg()).into());
        }
        if let Some((u, g)) = self.user {
            a.push("--user".into());
            a.push(format!("{u}:{g}").into());
        }
        a.push("--stop-grace-secs".into());
        a.push(self.stop_grace.as_secs().to_string().into());
        if self.nbd_reconnect != DEFAULT_RECONNECT_WINDOW {
            a.push("--nbd-reconnect-secs".into());
            a.push(self.nbd_reconnect.as_secs().to_string().into());
        }
        a
    }
}

/// Whether `/dev/kvm` can run a stock Linux kernel: it opens, and it is not the nested
/// PVM module (`/sys/module/kvm_pvm`), on which only small programs run (PVM.md).
pub fn kvm_runs_stock_linux() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    opens && !Path::new("/sys/module/kvm_pvm").exists()
}

/// The runner a VM gets: the definition's, unless `auto`, which means the built-in
/// runner for kernel boots where KVM runs stock Linux, QEMU otherwise.
pub fn choose_runner(def: &VmDefinition, overridden: Option<RunnerKind>) -> RunnerKind {
    match overridden.unwrap_or(def.runner) {
        RunnerKind::Auto => {
            if matches!(def.boot, Boot::Kernel { .. }) && kvm_runs_stock_linux() {
                RunnerKind::Builtin
            } else {
                RunnerKind::Qemu
            }
        }
        r => r,
    }
}

/// Where each disk of `def` is reached: the handed-over endpoint, or for file and NBD
/// disks the definition's own source.
pub fn disk_endpoints(
    def: &VmDefinition,
    dir: &Path,
    given: &[(String, DiskEndpoint)],
) -> Result<Vec<DiskEndpoint>, String> {
    def.disks
        .iter()
        .map(|d| {
            if let Some((_, ep)) = given.iter().find(|(id, _)| *id == d.id) {
                return Ok(ep.clone());
            }
            match &d.source {
                DiskSource::File(p) => Ok(DiskEndpoint::File(VmDefinition::resolve(dir, p))),
                DiskSource::Nbd(uri) => NbdAddress::parse(uri)
                    .map(DiskEndpoint::Nbd)
                    .map_err(|e| format!("disk {}: {e}", d.id)),
                DiskSource::Lun(lun) => Err(format!(
                    "disk {}: LUN {lun} must be handed over as --disk {}=nbd+unix:///EXPORT?socket=PATH",
                    d.id, d.id
                )),
            }
        })
        .collect()
}

/// Where each NIC's TAP comes from.
pub fn nic_endpoints(
    def: &VmDefinition,
    given: &[(String, NicEndpoint)],
) -> Result<Vec<NicEndpoint>, String> {
    def.nics
        .iter()
        .map(|n| {
            given
                .iter()
                .find(|(id, _)| *id == n.id)
                .map(|(_, ep)| ep.clone())
                .ok_or_else(|| {
                    format!(
                        "NIC {} (port group {}) needs a TAP: --nic {}=tap:NAME or fd:N",
                        n.id, n.port_group, n.id
                    )
                })
        })
        .collect()
}

type StopFn = Box<dyn Fn() + Send>;

/// Blocks SIGTERM/SIGINT/SIGHUP in this thread (and so in every thread started after)
/// and handles them on a thread of their own, which calls the installed stop function.
fn install_signal_thread() -> Arc<Mutex<Option<StopFn>>> {
    let slot: Arc<Mutex<Option<StopFn>>> = Arc::default();
    // SAFETY: sigset manipulation on a local, zero-initialised sigset_t, and
    // pthread_sigmask on the calling thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let s = slot.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset_t owned by this closure; sig is a valid out
            // pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if let Some(f) = s.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                    f();
                }
            }
        });
    slot
}

fn finish(code: i32, reason: &str) -> i32 {
    eprintln!("{EXIT_LINE_PREFIX}{reason}");
    code
}

/// The body of `basalt vmm`: returns the process exit code. See the [module docs](self).
pub fn vmm_main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let started = Instant::now();
    let args = match VmmArgs::parse(args) {
        Ok(a) => a,
        Err(e) => return finish(EXIT_SETUP, &format!("bad arguments: {e}")),
    };
    let stop_slot = install_signal_thread();
    let dir = args.vm_dir.clone();
    let text = match std::fs::read_to_string(dir.join("vm.json")) {
        Ok(t) => t,
        Err(e) => {
            return finish(
                EXIT_SETUP,
                &format!("cannot read {}: {e}", dir.join("vm.json").display()),
            )
        }
    };
    let def = match VmDefinition::from_json(&text) {
        Ok(d) => d,
        Err(e) => return finish(EXIT_SETUP, &format!("invalid vm.json: {e}")),
    };
    let disks = match disk_endpoints(&def, &dir, &args.disks) {
        Ok(d) => d,
        Err(e) => return finish(EXIT_SETUP, &e),
    };
    let nics = match nic_endpoints(&def, &args.nics) {
        Ok(n) => n,
        Err(e) => return finish(EXIT_SETUP, &e),
    };
    match choose_runner(&def, args.runner) {
        RunnerKind::Qemu => run_qemu(&def, &dir, &disks, &nics, &args, &stop_slot),
        _ => run_builtin(&def, &dir, &disks, nics, &args, &stop_slot, started),
    }
}

/// How often the QEMU runner checks the size of `console.log` (a guest writing its
/// serial console flat out adds well under a MiB a second).
const CONSOLE_LOG_CHECK: Duration = Duration::from_secs(1);

fn run_qemu(
    def: &VmDefinition,
    dir: &Path,
    disks: &[DiskEndpoint],
    nics: &[NicEndpoint],
    args: &VmmArgs,
    stop_slot: &Arc<Mutex<Option<StopFn>>>,
) -> i32 {
    let accel = Accel::detect();
    let cmd = QemuCommand::build_with(def, dir, disks, nics, accel, args.nbd_reconnect);
    let mut log_cap = match ConsoleLogCap::open(&dir.join("console.log")) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("vmm: console.log cannot be size-checked: {e}");
            None
        }
    };
    let mut q = match Qemu::spawn(&cmd, dir) {
        Ok(q) => q,
        Err(e) => return finish(EXIT_SETUP, &format!("QEMU did not start: {e}")),
    };
    eprintln!("vmm: QEMU pid {} ({accel:?})", q.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    *stop_slot.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(Box::new(move || s.store(true, Ordering::SeqCst)));
    let mut deadline: Option<Instant> = None;
    let mut next_log_check = Instant::now();
    let status = loop {
        if let Some(st) = q.try_wait() {
            break st;
        }
        if let Some(cap) = log_cap
            .as_mut()
            .filter(|_| Instant::now() >= next_log_check)
        {
            next_log_check = Instant::now() + CONSOLE_LOG_CHECK;
            match cap.check() {
                Ok(true) => eprintln!("vmm: console.log reached its limit and was restarted"),
                Ok(false) => {}
                Err(e) => {
                    eprintln!("vmm: console.log size check failed, no longer checked: {e}");
                    log_cap = None;
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            match deadline {
                None => {
                    let _ = q.powerdown();
                    deadline = Some(Instant::now() + args.stop_grace);
                }
                Some(d) if Instant::now() >= d => {
                    if q.quit().is_err() {
                        q.kill();
                    }
                    deadline = Some(Instant::now() + Duration::from_secs(3600));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let reason = q.qmp.shutdown_reason();
    if stop.load(Ordering::SeqCst) {
        return finish(
            EXIT_OK,
            &format!(
                "stopped on request ({})",
                reason.as_deref().unwrap_or("killed")
            ),
        );
    }
    match reason.as_deref() {
        Some("guest-shutdown") => finish(EXIT_OK, "guest powered off"),
        Some("guest-reset") => finish(EXIT_RESET, "guest asked for a reboot"),
        Some("guest-panic") => finish(EXIT_CRASH, "guest kernel panicked"),
        Some(r) if status.success() => finish(EXIT_OK, &format!("QEMU exited ({r})")),
        _ if status.success() => finish(EXIT_OK, "QEMU exited"),
        _ => finish(
            EXIT_CRASH,
            &format!("QEMU died ({status}): {}", q.stderr_tail()),
        ),
    }
}

fn run_builtin(
    def: &VmDefinition,
    dir: &Path,
    disks: &[DiskEndpoint],
    nics: Vec<NicEndpoint>,
    args: &VmmArgs,
    stop_slot: &Arc<Mutex<Option<StopFn>>>,
    started: Instant,
) -> i32 {
    let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &def.boot
    else {
        return finish(EXIT_SETUP, "the built-in runner boots kernels only");
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vmm-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return finish(EXIT_SETUP, &format!("cannot start the I/O runtime: {e}")),
    };
    let mut disk_cfgs = Vec::new();
    for (d, ep) in def.disks.iter().zip(disks) {
        let dev: Arc<dyn BlockDev> = match ep {
            DiskEndpoint::Nbd(addr) => match rt.block_on(NbdDev::connect_with(
                addr,
                NbdOptions {
                    reconnect_window: args.nbd_reconnect,
                    on_event: Some(Arc::new(|line: &str| eprintln!("vmm: {line}"))),
                    ..NbdOptions::default()
                },
            )) {
                Ok(dev) => Arc::new(dev),
                Err(e) => return finish(EXIT_SETUP, &format!("disk {}: {e}", d.id)),
            },
            DiskEndpoint::File(p) => {
                let opts = UringOptions {
                    read_only: d.read_only,
                    ..UringOptions::default()
                };
                let _guard = rt.enter();
                match UringFile::open(p, &opts) {
                    Ok(f) => Arc::new(f),
                    Err(e) => return finish(EXIT_SETUP, &format!("disk {}: {e}", d.id)),
                }
            }
        };
        disk_cfgs.push(DiskConfig {
            id: d.id.clone(),
            dev,
            read_only: d.read_only,
        });
    }
    let mut nic_cfgs = Vec::new();
    for (i, (n, ep)) in def.nics.iter().zip(nics).enumerate() {
        let tap = match ep {
            NicEndpoint::TapName(name) => Tap::open(&name),
            // SAFETY: the daemon handed this fd over for this NIC; nothing else in this
            // process owns it.
            NicEndpoint::TapFd(fd) => Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }),
        };
        let tap = match tap {
            Ok(t) => t,
            Err(e) => {
                return finish(
                    EXIT_SETUP,
                    &format!("NIC {}: cannot open its TAP: {e}", n.id),
                )
            }
        };
        let mac = def.nic_mac(i).unwrap_or([2, 0xba, 0, 0, 0, i as u8]);
        nic_cfgs.push(NicConfig {
            id: n.id.clone(),
            tap,
            mac,
        });
    }
    let out = ConsoleOut::new();
    if let Err(e) = out.log_to(&dir.join("console.log")) {
        return finish(EXIT_SETUP, &format!("console log: {e}"));
    }
    let cfg = VmConfig {
        vcpus: def.vcpus,
        memory_mib: def.memory_mib,
        mergeable: def.memory.mergeable,
        boot: BootSpec::Linux {
            kernel: VmDefinition::resolve(dir, kernel),
            initrd: initrd.as_ref().map(|i| VmDefinition::resolve(dir, i)),
            cmdline: cmdline.clone(),
        },
        hide_features: def.cpu.hide_features.clone(),
        console: out.clone(),
        disks: disk_cfgs,
        nics: nic_cfgs,
        balloon: def.memory.balloon,
        io: Some(rt.handle().clone()),
    };
    let vm = match Vm::new(cfg) {
        Ok(vm) => vm,
        Err(e) => return finish(EXIT_SETUP, &format!("cannot build the VM: {e}")),
    };
    if let Err(e) = console::serve(&dir.join("console.sock"), out, vm.serial_input()) {
        return finish(EXIT_SETUP, &format!("console socket: {e}"));
    }
    let stopper = vm.stopper();
    *stop_slot.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(Box::new(move || stopper.stop()));
    if let Some((uid, gid)) = args.user {
        if let Err(e) = crate::sandbox::drop_privileges(uid, gid) {
            return finish(EXIT_SETUP, &e.to_string());
        }
    }
    match crate::sandbox::apply_seccomp() {
        Ok(true) => eprintln!("vmm: seccomp filter installed"),
        Ok(false) => eprintln!("vmm: seccomp disabled by BASALT_VMM_SECCOMP=off"),
        Err(e) => return finish(EXIT_SETUP, &e.to_string()),
    }
    let probe = vm.first_exit_probe();
    let result = vm.run();
    if let Some(t) = probe.get() {
        eprintln!(
            "vmm: first guest exit {} us after start",
            t.saturating_duration_since(started).as_micros()
        );
    }
    drop(rt);
    match result {
        Ok(VmExit::PowerOff) | Ok(VmExit::Exit(0)) | Ok(VmExit::Halted) => {
            finish(EXIT_OK, "guest powered off")
        }
        Ok(VmExit::Stopped) => finish(EXIT_OK, "stopped on request"),
        Ok(VmExit::Reset) => finish(EXIT_RESET, "guest asked for a reboot"),
        Ok(VmExit::TripleFault) => finish(EXIT_CRASH, "guest triple-faulted"),
        Ok(VmExit::Exit(c)) => finish(EXIT_CRASH, &format!("guest program exited with {c}")),
        Err(e @ VmError::Vcpu { .. }) => finish(EXIT_CRASH, &e.to_string()),
        Err(e) => finish(EXIT_CRASH, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let mut a = VmmArgs::new("/data/vms/web");
        a.runner = Some(RunnerKind::Qemu);
        a.disks.push((
            "root".into(),
            DiskEndpoint::parse("nbd+unix:///pool0/root?socket=/run/basalt/nbd.sock").expect("nbd"),
        ));
        a.disks
            .push(("scratch".into(), DiskEndpoint::File("/tmp/s.img".into())));
        a.nics.push(("eth0".into(), NicEndpoint::TapFd(9)));
        a.nics
            .push(("eth1".into(), NicEndpoint::TapName("bt0".into())));
        a.user = Some((65534, 65534));
        assert_eq!(VmmArgs::parse(a.to_args()).expect("parse"), a);
        a.nbd_reconnect = Duration::from_secs(5);
        assert_eq!(VmmArgs::parse(a.to_args()).expect("parse"), a);
        assert!(VmmArgs::parse(vec!["--runner".into(), "x".into()]).is_err());
        assert!(VmmArgs::parse(Vec::<OsString>::new()).is_err());
        assert!(NicEndpoint::parse("fd:1").is_err());
    }

    #[test]
    fn lun_disks_must_be_handed_over() {
        let def = VmDefinition::from_json(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"boot":{"kind":"kernel","kernel":"k"},
                "disks":[{"id":"root","source":{"lun":"p/l"}},{"id":"f","source":{"file":"f.img"}}],
                "nics":[{"id":"eth0","port_group":"pg"}]}"#,
        )
        .expect("def");
        let err = disk_endpoints(&def, Path::new("/v"), &[]).expect_err("lun");
        assert!(err.contains("--disk root="), "{err}");
        let given = [(
            "root".to_string(),
            DiskEndpoint::parse("nbd+unix:///x?socket=/s").expect("ep"),
        )];
        let eps = disk_endpoints(&def, Path::new("/v"), &given).expect("eps");
        assert_eq!(eps[1], DiskEndpoint::File("/v/f.img".into()));
        assert!(nic_endpoints(&def, &[])
            .expect_err("nic")
            .contains("port group pg"));
    }
}

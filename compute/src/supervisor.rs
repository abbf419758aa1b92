//! The supervisor the daemon holds: one `basalt vmm` process per running VM.
//!
//! [`Supervisor::start`] asks the daemon's [`Resolver`] how this host reaches the VM's
//! disks and NICs (it exports LUNs over NBD on a unix socket and makes TAPs in the
//! right port groups), then spawns `PROGRAM vmm --vm-dir DIR --disk ... --nic ...` with
//! the TAP fds inherited, stderr appended to `vmm.log`, and its own session (so a
//! signal to the daemon's process group does not reach it). A task per VM waits for the
//! process and records how it ended in `status.json` ([`ExitRecord`]: code or signal,
//! the VMM's own last words, whether it was asked). Then, by exit code:
//!
//! - [`EXIT_OK`] or a requested stop: `stopped`.
//! - [`EXIT_RESET`] (guest reboot): started again at once.
//! - [`EXIT_SETUP`]: `failed` (restarting cannot help).
//! - anything else (crash, signal): `crashed`, and restarted per the VM's
//!   [`CrashPolicy`](crate::definition::CrashPolicy) with exponential backoff, up to
//!   `max_restarts` in a row; a run longer than `stable_after_secs` resets the count.
//!
//! A VMM crash touches nothing else: storage stays in the daemon, other VMs are other
//! processes. VMM processes also outlive a daemon restart: [`Supervisor::recover`]
//! re-adopts the live ones (through a pidfd, since they are no longer its children; by
//! polling `/proc` where no pidfd can be had) and marks the dead ones crashed.

use crate::definition::VmDefinition;
use crate::launch::{VmmArgs, EXIT_LINE_PREFIX, EXIT_OK, EXIT_RESET, EXIT_SETUP};
use crate::store::{now_ms, ExitRecord, StoreError, VmState, VmStatus, VmStore};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

/// Why a supervisor operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM runs already.
    #[error("VM {0:?} is already running")]
    AlreadyRunning(String),
    /// The VM does not run.
    #[error("VM {0:?} is not running")]
    NotRunning(String),
    /// The VM is starting (or about to restart after a crash).
    #[error("VM {0:?} is starting; stop it first")]
    Starting(String),
    /// The daemon could not provide the VM's disks or NICs.
    #[error("VM {name:?}: {reason}")]
    Resolve {
        /// The VM.
        name: String,
        /// Why.
        reason: String,
    },
    /// The VMM process could not be spawned.
    #[error("cannot start the VMM for {name:?}: {source}")]
    Spawn {
        /// The VM.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A VMM process runs for the VM that this supervisor does not supervise (one that
    /// could not be adopted, or started by hand): starting another would make two.
    #[error("VM {name:?}: a VMM process (pid {pid}) runs for it unsupervised; stop it first")]
    Unsupervised {
        /// The VM.
        name: String,
        /// The process.
        pid: u32,
    },
    /// `/proc` cannot be read, so whether a VMM runs for the VM is unknown.
    #[error("cannot look for VMM processes in /proc: {0}")]
    Proc(#[source] std::io::Error),
    /// A background task of the supervisor failed (panicked).
    #[error("VM {name:?}: {what} failed: {reason}")]
    Task {
        /// The VM.
        name: String,
        /// What was being done.
        what: String,
        /// Why.
        reason: String,
    },
    /// Waiting timed out.
    #[error("VM {name:?}: timed out waiting for {what}")]
    Timeout {
        /// The VM.
        name: String,
        /// For what.
        what: String,
    },
}

/// A VM as [`Supervisor::list`] gives it: its name, and its status or why that cannot
/// be read.
pub type ListedVm = (String, Result<VmStatus, String>);

/// How to start VMM processes.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The program (the `basalt` binary; tests use the crate's `basalt-compute-vmm`).
    pub program: PathBuf,
    /// Arguments before the VMM's own (`["vmm"]` for `basalt vmm`).
    pub args_prefix: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(OsString, OsString)>,
    /// How long a stop waits for the VMM to end (after which it is killed).
    pub stop_timeout: Duration,
    /// Passed to the VMM as `--stop-grace-secs`: how long it waits for the guest.
    pub guest_grace: Duration,
}

impl SupervisorConfig {
    /// `program vmm ...` with a 10 s guest grace and a 20 s stop timeout.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            program: program.into(),
            args_prefix: vec!["vmm".into()],
            env: Vec::new(),
            stop_timeout: Duration::from_secs(20),
            guest_grace: Duration::from_secs(10),
        }
    }
}

/// What the daemon hands a VMM: its arguments (disk and NIC endpoints, user) and the fds
/// the child inherits (TAPs; `NicEndpoint::TapFd` names their numbers in this process).
#[derive(Debug)]
pub struct Launch {
    /// Arguments (`vm_dir` is filled in by the supervisor).
    pub args: VmmArgs,
    /// fds the child keeps; closed in the daemon after the spawn.
    pub fds: Vec<OwnedFd>,
}

/// The daemon's side of a start: turn LUNs into NBD exports and port groups into TAPs.
/// Called before every (re)start.
pub trait Resolver: Send + Sync {
    /// Endpoints for `def` in folder `dir`.
    fn resolve(&self, def: &VmDefinition, dir: &Path) -> Result<Launch, String>;
}

/// A resolver that hands nothing over: file and NBD disks only, no NICs.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHandover;

impl Resolver for NoHandover {
    fn resolve(&self, _def: &VmDefinition, dir: &Path) -> Result<Launch, String> {
        Ok(Launch {
            args: VmmArgs::new(dir),
            fds: Vec::new(),
        })
    }
}

enum Control {
    Stop,
    Kill,
}

struct VmHandle {
    status: watch::Sender<VmStatus>,
    ctl: mpsc::UnboundedSender<Control>,
}

/// Per VM name, the lock that starts, crash restarts and deletes of that VM hold (see
/// [`Supervisor::hold`]); an entry lives while someone holds or waits for it.
type Holds = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// VM `name` held against other starts, crash restarts and deletes until dropped.
struct VmHold {
    holds: Holds,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for VmHold {
    fn drop(&mut self) {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Nobody else holds or waits for it (they clone it under this lock): forgotten,
        // so that the map does not keep every VM name ever used.
        if holds
            .get(&self.name)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            holds.remove(&self.name);
        }
    }
}

/// See the [module docs](self).
pub struct Supervisor {
    store: VmStore,
    cfg: SupervisorConfig,
    resolver: Arc<dyn Resolver>,
    vms: Mutex<HashMap<String, Arc<VmHandle>>>,
    holds: Holds,
}

/// How often a VMM watched without a pidfd ([`Proc::Polled`]) is looked for in /proc.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A VMM process: our child, or one adopted after a daemon restart.
enum Proc {
    Child(tokio::process::Child),
    Adopted {
        pid: u32,
        pidfd: AsyncFd<OwnedFd>,
    },
    /// Adopted, but no pidfd could be had (ENOSYS, EMFILE...): watched by polling
    /// `/proc/PID`, and taken for gone once its command line no longer names `dir`
    /// (it ended, or is a zombie, or the pid is another process's now).
    Polled {
        pid: u32,
        dir: PathBuf,
    },
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } | Proc::Polled { pid, .. } => Some(*pid),
        }
    }

    /// What [`signal`] needs to signal this process later, without borrowing it.
    fn target(&self) -> SignalTarget {
        SignalTarget {
            pid: self.pid(),
            check_dir: match self {
                Proc::Polled { dir, .. } => Some(dir.clone()),
                _ => None,
            },
        }
    }

    /// Waits for the end: (exit code, signal).
    async fn wait(&mut self) -> (Option<i32>, Option<i32>) {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            },
            Proc::Adopted { pidfd, .. } => {
                // A pidfd becomes readable when the process exits; the status belongs to
                // its real parent (gone), so only the VMM's last words tell why.
                let _ = pidfd.readable().await;
                (None, None)
            }
            Proc::Polled { pid, dir } => loop {
                // Reading a command line can wait on a process stuck in the kernel.
                let (p, d) = (*pid, dir.clone());
                let alive = tokio::task::spawn_blocking(move || is_vmm_of(p, &d))
                    .await
                    .unwrap_or(true);
                if !alive {
                    break (None, None);
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            },
        }
    }
}

/// A process to signal: its pid, and for a polled one the VM folder its command line
/// must still name (it is not ours to reap, so its pid may be another's by now).
struct SignalTarget {
    pid: Option<u32>,
    check_dir: Option<PathBuf>,
}

fn signal(target: &SignalTarget, sig: i32) {
    if let Some(dir) = &target.check_dir {
        if !target.pid.is_some_and(|pid| is_vmm_of(pid, dir)) {
            return;
        }
    }
    signal_pid(target.pid, sig);
}

/// Whether process `pid` is a VMM serving folder `dir` (by its command line).
fn is_vmm_of(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| vmm_dir(&c))
        .is_some_and(|d| d == dir)
}

fn signal_pid(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on a VMM we started or adopted. A child is reaped only by
        // `Proc::wait`, after which no more signals are sent to this pid; an adopted
        // one is checked by its pidfd or, polled, by its command line just before.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The VMM's own account of its end: the last `vmm: exit:` line written to `vmm.log`
/// after `offset`.
fn last_words(log: &Path, offset: u64) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(EXIT_LINE_PREFIX).map(str::to_string))
}

/// The VM folder a VMM command line (`/proc/PID/cmdline`) serves: the argument after
/// `--vm-dir`, compared whole (a substring test would take `vms/a` for `vms/ab`).
fn vmm_dir(cmdline: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut args = cmdline.split(|&b| b == 0);
    args.by_ref().find(|a| *a == b"--vm-dir")?;
    let dir = args.next()?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir)))
}

/// Every VMM process on this host by the VM folder it serves (the lowest pid first
/// when there are several). Found by their command lines, so it does not depend on
/// `status.json`, which may be stale or unreadable. Zombies have no command line and
/// do not count.
fn vmm_processes() -> std::io::Result<HashMap<PathBuf, Vec<u32>>> {
    let mut out: HashMap<PathBuf, Vec<u32>> = HashMap::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process that ended meanwhile (or a kernel thread) has nothing to read.
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if let Some(dir) = vmm_dir(&cmdline) {
            out.entry(dir).or_default().push(pid);
        }
    }
    for pids in out.values_mut() {
        pids.sort_unstable();
    }
    Ok(out)
}

/// The VMM processes on this host at one moment, by the VM folder they serve (see
/// [`scan_vmms`]).
#[derive(Debug, Default, Clone)]
pub struct VmmScan(HashMap<PathBuf, Vec<u32>>);

impl VmmScan {
    /// A VMM process serving folder `dir` (the lowest pid when there are several).
    pub fn pid_of(&self, dir: &Path) -> Option<u32> {
        self.0.get(dir).and_then(|p| p.first().copied())
    }
}

/// Every VMM process on this host, found by its command line (`--vm-dir DIR`): also
/// those that no supervisor watches, which `status.json` may call stopped. Reads every
/// process's command line, which can wait on a process stuck in the kernel.
pub fn scan_vmms() -> Result<VmmScan, SupervisorError> {
    vmm_processes().map(VmmScan).map_err(SupervisorError::Proc)
}

/// A VMM process serving folder `dir`, if one runs.
fn vmm_process(dir: &Path) -> Result<Option<u32>, SupervisorError> {
    Ok(scan_vmms()?.pid_of(dir))
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT (panic or abort)".into(),
        libc::SIGSYS => "SIGSYS (seccomp violation)".into(),
        libc::SIGBUS => "SIGBUS".into(),
        other => format!("signal {other}"),
    }
}

impl Supervisor {
    /// A supervisor over `store`.
    pub fn new(store: VmStore, cfg: SupervisorConfig, resolver: Arc<dyn Resolver>) -> Arc<Self> {
        Arc::new(Supervisor {
            store,
            cfg,
            resolver,
            vms: Mutex::default(),
            holds: Holds::default(),
        })
    }

    /// Holds VM `name` (waiting for whoever holds it now): a start holds it from its
    /// checks to the VMM's pid on record, a crash restart likewise, a delete from its
    /// checks to the folder's removal. So a delete never removes the folder of a VMM
    /// that a start launched after the delete's checks, nor a start launches one into a
    /// folder going away.
    async fn hold(&self, name: &str) -> VmHold {
        let lock = self
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        VmHold {
            holds: self.holds.clone(),
            name: name.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// The store.
    pub fn store(&self) -> &VmStore {
        &self.store
    }

    /// The console log and attach socket of VM `name`.
    pub fn console_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.store.dir(name);
        (dir.join("console.log"), dir.join("console.sock"))
    }

    fn handle(&self, name: &str) -> Option<Arc<VmHandle>> {
        self.vms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn update(&self, name: &str, h: &VmHandle, f: impl FnOnce(&mut VmStatus)) -> VmStatus {
        let mut out = h.status.borrow().clone();
        f(&mut out);
        // The file first, then the watchers: whoever sees the new state (a stop() that
        // returns, say) also finds it on disk. A failed write does not fail a VM that
        // runs (recover() finds VMMs by their command lines, not by the file alone), but
        // it is not silent either: the live status says so, and the API shows it.
        out.not_recorded = self
            .store
            .set_status(name, &out)
            .err()
            .map(|e| format!("this status could not be recorded: {e}"));
        h.status.send_replace(out.clone());
        out
    }

    /// The status: live when supervised, else as recorded. The definition need not be
    /// readable. An unreadable `status.json` of an unsupervised VM is an error (see
    /// [`VmStore::status`]): the VM may run.
    pub fn status(&self, name: &str) -> Result<VmStatus, SupervisorError> {
        if let Some(h) = self.handle(name) {
            return Ok(h.status.borrow().clone());
        }
        if !self.store.exists(name)? {
            return Err(StoreError::NotFound(name.to_string()).into());
        }
        Ok(self.store.status(name)?)
    }

    /// Every VM with its status, or why that cannot be read.
    pub fn list(&self) -> Result<Vec<ListedVm>, SupervisorError> {
        let mut out = Vec::new();
        for e in self.store.list()? {
            let st = match self.handle(&e.name) {
                Some(h) => Ok(h.status.borrow().clone()),
                None => e.status,
            };
            out.push((e.name, st));
        }
        Ok(out)
    }

    /// Runs [`Self::update`] only if `handle` is still the current one of VM `name`, under
    /// the lock [`Self::start`] checks and replaces handles under: a start either sees
    /// the new state or has replaced the handle first (then `None`, nothing written).
    fn update_if_current(
        &self,
        name: &str,
        handle: &Arc<VmHandle>,
        f: impl FnOnce(&mut VmStatus),
    ) -> Option<VmStatus> {
        let vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
        if !vms.get(name).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            return None;
        }
        let st = self.update(name, handle, f);
        drop(vms);
        Some(st)
    }

    fn is_current(&self, name: &str, handle: &Arc<VmHandle>) -> bool {
        self.vms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|h| Arc::ptr_eq(h, handle))
    }

    /// Forgets `handle` of VM `name` if it is still the current one.
    fn drop_handle(&self, name: &str, handle: &Arc<VmHandle>) {
        let mut vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
        if vms.get(name).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            vms.remove(name);
        }
    }

    fn spawn_vmm(&self, def: &VmDefinition) -> Result<(Proc, u64), SupervisorError> {
        let dir = self.store.dir(&def.name);
        let launch =
            self.resolver
                .resolve(def, &dir)
                .map_err(|reason| SupervisorError::Resolve {
                    name: def.name.clone(),
                    reason,
                })?;
        let mut args = launch.args;
        args.vm_dir = dir.clone();
        args.stop_grace = self.cfg.guest_grace;
        let log_path = dir.join("vmm.log");
        let spawn_err = |source| SupervisorError::Spawn {
            name: def.name.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(spawn_err)?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = tokio::process::Command::new(&self.cfg.program);
        cmd.args(&self.cfg.args_prefix)
            .args(args.to_args())
            .envs(self.cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(false);
        let keep: Vec<i32> = launch.fds.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe calls (setsid, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                for &fd in &keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        drop(launch.fds);
        Ok((Proc::Child(child), offset))
    }

    /// Starts VM `name`; returns the VMM's pid once it is spawned.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<u32, SupervisorError> {
        // Until the VMM runs and is on record (or the start failed): a delete waits, then
        // finds it running.
        let _hold = self.hold(name).await;
        let def = self.store.get(name)?;
        // The old record only carries the last exit over; an unreadable one is replaced,
        // once the process scan below has shown that no VMM runs for the VM.
        let starting = VmStatus {
            state: VmState::Starting,
            restarts: 0,
            not_recorded: None,
            ..self.store.status(name).unwrap_or_default()
        };
        let (status_tx, _) = watch::channel(starting.clone());
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let handle = Arc::new(VmHandle {
            status: status_tx,
            ctl: ctl_tx,
        });
        {
            let mut vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = vms.get(name) {
                if h.status.borrow().state.is_active() {
                    return Err(SupervisorError::AlreadyRunning(name.to_string()));
                }
            }
            vms.insert(name.to_string(), handle.clone());
        }
        // No handle (or a stopped one) does not prove that no VMM runs: one that could not
        // be adopted after a daemon restart still would, and a second one on the same
        // disks would corrupt them. Our handle is in place first, so no start of ours
        // can slip in between.
        // The scan reads every process's command line (which can wait on a process
        // stuck in the kernel): off the runtime's threads.
        let dir = self.store.dir(name);
        let scan = tokio::task::spawn_blocking(move || vmm_process(&dir))
            .await
            .unwrap_or_else(|e| {
                Err(SupervisorError::Proc(std::io::Error::other(format!(
                    "process scan failed: {e}"
                ))))
            });
        match scan {
            Ok(None) => {}
            Ok(Some(pid)) => {
                self.drop_handle(name, &handle);
                return Err(SupervisorError::Unsupervised {
                    name: name.to_string(),
                    pid,
                });
            }
            Err(e) => {
                self.drop_handle(name, &handle);
                return Err(e);
            }
        }
        // Recorded before the VMM exists: a VMM that runs while `status.json` says
        // stopped is what the LUN checks must never see, so a start that cannot write
        // the record does not happen.
        if let Err(e) = self.store.set_status(name, &starting) {
            self.drop_handle(name, &handle);
            return Err(e.into());
        }
        let runner = crate::launch::choose_runner(&def, None);
        let (mut proc, offset) = match self.spawn_vmm(&def) {
            Ok(p) => p,
            Err(e) => {
                self.update(name, &handle, |s| {
                    s.state = VmState::Failed;
                    s.pid = None;
                    s.last_exit = Some(ExitRecord {
                        at_ms: now_ms(),
                        reason: e.to_string(),
                        ..ExitRecord::default()
                    });
                });
                return Err(e);
            }
        };
        let pid = proc.pid().unwrap_or(0);
        let st = self.update(name, &handle, |s| {
            s.state = VmState::Running;
            s.pid = Some(pid);
            s.runner = Some(format!("{runner:?}").to_lowercase());
            s.started_at_ms = now_ms();
        });
        if let Some(why) = st.not_recorded {
            // Without its pid on record the VMM would run unrecorded; a start that
            // fails is better. It is our child: killed and reaped here.
            signal_pid(Some(pid), libc::SIGKILL);
            let _ = proc.wait().await;
            self.update(name, &handle, |s| {
                s.state = VmState::Failed;
                s.pid = None;
                s.last_exit = Some(ExitRecord {
                    at_ms: now_ms(),
                    reason: format!("killed at start: {why}"),
                    requested: true,
                    ..ExitRecord::default()
                });
            });
            return Err(SupervisorError::Spawn {
                name: name.to_string(),
                source: std::io::Error::other(why),
            });
        }
        let me = self.clone();
        let n = name.to_string();
        tokio::spawn(async move { me.monitor(n, handle, proc, offset, ctl_rx).await });
        Ok(pid)
    }

    async fn monitor(
        self: Arc<Self>,
        name: String,
        handle: Arc<VmHandle>,
        mut proc: Proc,
        mut offset: u64,
        mut ctl: mpsc::UnboundedReceiver<Control>,
    ) {
        let log = self.store.dir(&name).join("vmm.log");
        loop {
            let started = Instant::now();
            let mut requested = false;
            let mut kill_at: Option<tokio::time::Instant> = None;
            let target = proc.target();
            let (code, signal) = loop {
                let sleep_until = kill_at
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    r = proc.wait() => break r,
                    c = ctl.recv() => match c {
                        Some(Control::Stop) => {
                            requested = true;
                            self.update(&name, &handle, |s| s.state = VmState::Stopping);
                            signal(&target, libc::SIGTERM);
                            kill_at = Some(tokio::time::Instant::now() + self.cfg.stop_timeout);
                        }
                        Some(Control::Kill) => {
                            requested = true;
                            self.update(&name, &handle, |s| s.state = VmState::Stopping);
                            signal(&target, libc::SIGKILL);
                        }
                        None => {}
                    },
                    _ = tokio::time::sleep_until(sleep_until) => {
                        signal(&target, libc::SIGKILL);
                        kill_at = None;
                    }
                }
            };
            let words = last_words(&log, offset);
            let reason = match (code, signal, words) {
                (_, Some(sig), _) => format!("killed by {}", signal_name(sig)),
                (_, _, Some(w)) => w,
                (Some(c), _, None) => format!("exited with code {c}"),
                (None, None, None) => "the VMM ended (adopted process; no status)".into(),
            };
            let record = ExitRecord {
                at_ms: now_ms(),
                code,
                signal,
                reason,
                requested,
            };
            let def = self.store.get(&name).ok();
            let policy = def.as_ref().map(|d| d.on_crash.clone()).unwrap_or_default();
            let crashed = !requested
                && code != Some(EXIT_OK)
                && code != Some(EXIT_RESET)
                && code != Some(EXIT_SETUP);
            let stable = started.elapsed() >= Duration::from_secs(policy.stable_after_secs);
            let st = self.update(&name, &handle, |s| {
                s.pid = None;
                s.last_exit = Some(record.clone());
                if stable {
                    s.restarts = 0;
                }
                s.state = if requested || code == Some(EXIT_OK) {
                    VmState::Stopped
                } else if code == Some(EXIT_SETUP) {
                    VmState::Failed
                } else if code == Some(EXIT_RESET) {
                    VmState::Starting
                } else {
                    VmState::Crashed
                };
            });
            let restart = match (code, def.as_ref()) {
                (_, None) => false,
                _ if requested => false,
                (Some(EXIT_RESET), _) => true,
                _ => crashed && policy.restart && st.restarts < policy.max_restarts,
            };
            if !restart {
                return;
            }
            if crashed {
                let backoff = Duration::from_millis(policy.backoff_ms)
                    .saturating_mul(1 << st.restarts.min(16))
                    .min(Duration::from_secs(60));
                // Crashed is not active: a start() may have taken the VM over since (and
                // spawned its own VMM, or be about to). Starting again only if not, and
                // under the map lock, so that a later start() sees Starting (active) and
                // refuses. Under the VM's hold too: a delete that checked while the VM
                // was Crashed has finished (and dropped the handle, so this is `None`)
                // or checks after this and finds it Starting.
                let resumed = {
                    let _hold = self.hold(&name).await;
                    self.update_if_current(&name, &handle, |s| {
                        s.restarts += 1;
                        s.state = VmState::Starting;
                    })
                };
                if resumed.is_none() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    c = ctl.recv() => {
                        if matches!(c, Some(Control::Stop) | Some(Control::Kill)) {
                            self.update(&name, &handle, |s| s.state = VmState::Stopped);
                            return;
                        }
                    }
                }
            }
            let Some(def) = def else { return };
            // As a start does: a delete that checked while the VM had crashed (inactive)
            // is waited for, and has then dropped the handle.
            let _hold = self.hold(&name).await;
            // Starting is active, so nobody should have replaced the handle; but a
            // second VMM on the same disks is the one thing never to risk.
            if !self.is_current(&name, &handle) {
                return;
            }
            match self.spawn_vmm(&def) {
                Ok((p, o)) => {
                    proc = p;
                    offset = o;
                    let pid = proc.pid();
                    self.update(&name, &handle, |s| {
                        s.state = VmState::Running;
                        s.pid = pid;
                        s.started_at_ms = now_ms();
                    });
                }
                Err(e) => {
                    self.update(&name, &handle, |s| {
                        s.state = VmState::Failed;
                        s.last_exit = Some(ExitRecord {
                            at_ms: now_ms(),
                            reason: e.to_string(),
                            ..ExitRecord::default()
                        });
                    });
                    return;
                }
            }
        }
    }

    /// Waits until the status of `name` satisfies `pred`.
    pub async fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&VmStatus) -> bool,
    ) -> Result<VmStatus, SupervisorError> {
        let Some(h) = self.handle(name) else {
            return Err(SupervisorError::NotRunning(name.to_string()));
        };
        let mut rx = h.status.subscribe();
        let res = tokio::time::timeout(timeout, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return s.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    return rx.borrow().clone();
                }
            }
        })
        .await;
        res.map_err(|_| SupervisorError::Timeout {
            name: name.to_string(),
            what: "a status change".into(),
        })
    }

    async fn control(&self, name: &str, c: Control) -> Result<VmStatus, SupervisorError> {
        let h = self
            .handle(name)
            .filter(|h| h.status.borrow().state.is_active())
            .ok_or_else(|| SupervisorError::NotRunning(name.to_string()))?;
        let _ = h.ctl.send(c);
        self.wait_for(name, self.cfg.stop_timeout + Duration::from_secs(10), |s| {
            !s.state.is_active()
        })
        .await
    }

    /// Stops VM `name`: SIGTERM to the VMM (the guest gets the ACPI power button on the
    /// QEMU runner), SIGKILL after the stop timeout. Returns the final status.
    pub async fn stop(&self, name: &str) -> Result<VmStatus, SupervisorError> {
        self.control(name, Control::Stop).await
    }

    /// Kills VM `name` at once (SIGKILL to the VMM).
    pub async fn kill(&self, name: &str) -> Result<VmStatus, SupervisorError> {
        self.control(name, Control::Kill).await
    }

    /// Deletes a stopped VM's folder. Neither its definition nor its `status.json` need
    /// be readable (so that a broken VM never locks the admin out): a supervised VM is
    /// stopped by its live status, an unsupervised one when no VMM process runs for it.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), SupervisorError> {
        self.delete_with(name, || ()).await
    }

    /// [`Self::delete`], calling `before_removal` (blocking is fine) once the checks have
    /// passed and before the folder goes: for whoever must undo things that need the
    /// folder (the daemon's NIC ports) and must not undo them under a VM that still
    /// runs. No start of the VM can come in between.
    pub async fn delete_with(
        self: &Arc<Self>,
        name: &str,
        before_removal: impl FnOnce() + Send + 'static,
    ) -> Result<(), SupervisorError> {
        let hold = self.hold(name).await;
        let (me, n) = (self.clone(), name.to_string());
        // The check scans /proc, and the removal walks the folder: off the runtime.
        tokio::task::spawn_blocking(move || {
            let _hold = hold;
            me.check_delete(&n)?;
            before_removal();
            me.store.remove(&n)?;
            me.vms
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&n);
            Ok(())
        })
        .await
        .unwrap_or_else(|e| {
            Err(SupervisorError::Task {
                name: name.to_string(),
                what: "the delete".into(),
                reason: e.to_string(),
            })
        })
    }

    /// Whether [`Self::delete`] would go ahead now: the VM exists and no VMM runs for
    /// it, supervised or not. Only [`Self::delete_with`]'s own check holds against a
    /// start that comes after it.
    pub fn check_delete(&self, name: &str) -> Result<(), SupervisorError> {
        match self.handle(name) {
            Some(h) if h.status.borrow().state == VmState::Starting => {
                return Err(SupervisorError::Starting(name.to_string()));
            }
            Some(h) if h.status.borrow().state.is_active() => {
                return Err(StoreError::Running(name.to_string()).into());
            }
            Some(_) => {}
            None => {
                if !self.store.exists(name)? {
                    return Err(StoreError::NotFound(name.to_string()).into());
                }
                if let Some(pid) = vmm_process(&self.store.dir(name))? {
                    return Err(SupervisorError::Unsupervised {
                        name: name.to_string(),
                        pid,
                    });
                }
            }
        }
        Ok(())
    }

    /// Puts VMM `pid` of VM `name` (folder `dir`, current handle `handle`) under a
    /// monitor: through `pidfd` (from `pidfd_open(pid)`), or by polling /proc when no
    /// pidfd can be had, so that it can be stopped, killed and seen to end either way.
    /// False when the process is not (or no longer) a VMM of `dir`: then nothing watches
    /// it and the caller records the VM as crashed.
    fn watch_adopted(
        self: &Arc<Self>,
        name: &str,
        dir: &Path,
        handle: &Arc<VmHandle>,
        ctl_rx: mpsc::UnboundedReceiver<Control>,
        pid: u32,
        pidfd: std::io::Result<OwnedFd>,
    ) -> bool {
        let (proc, unwatchable) = match pidfd {
            // The pid was a VMM of `dir` at the scan; it may have ended and been reused
            // before pidfd_open. Checked now that the pidfd pins the process it names.
            Ok(_) if !is_vmm_of(pid, dir) => return false,
            // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it (and so keeps
            // it open and unchanged) until it is dropped.
            Ok(fd) => match unsafe { AsyncFd::register(fd) } {
                Ok(pidfd) => (Proc::Adopted { pid, pidfd }, None),
                Err(err) => (
                    Proc::Polled {
                        pid,
                        dir: dir.to_path_buf(),
                    },
                    Some(err.to_string()),
                ),
            },
            Err(err) if is_vmm_of(pid, dir) => (
                Proc::Polled {
                    pid,
                    dir: dir.to_path_buf(),
                },
                Some(err.to_string()),
            ),
            Err(_) => return false,
        };
        let offset = std::fs::metadata(dir.join("vmm.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        self.update(name, handle, |s| {
            s.state = VmState::Running;
            s.pid = Some(pid);
            if let Some(err) = &unwatchable {
                // Not an exit; the only place the status has for the reason.
                s.last_exit = Some(ExitRecord {
                    at_ms: now_ms(),
                    reason: format!(
                        "the VMM runs but no pidfd could be had for it ({err}): \
                         watched by polling /proc"
                    ),
                    ..ExitRecord::default()
                });
            }
        });
        let me = self.clone();
        let (name, handle) = (name.to_string(), handle.clone());
        tokio::spawn(async move { me.monitor(name, handle, proc, offset, ctl_rx).await });
        true
    }

    /// After a daemon restart: re-adopts the VMM processes that still run and records
    /// the ones that died meanwhile as crashed. Returns the names of adopted VMs.
    ///
    /// VMMs are found by their command lines (`--vm-dir DIR`), not by `status.json`
    /// alone: a VM whose record is unreadable, or says stopped because a write failed,
    /// may still run, and would otherwise count as stopped to every check. Every such
    /// VM gets a handle, so that its status is known from here on.
    pub async fn recover(self: &Arc<Self>) -> Result<Vec<String>, SupervisorError> {
        let running = vmm_processes().map_err(SupervisorError::Proc)?;
        let mut adopted = Vec::new();
        for e in self.store.list()? {
            if self.handle(&e.name).is_some() {
                continue;
            }
            let pids = running.get(&e.dir).map(Vec::as_slice).unwrap_or_default();
            // The recorded pid if it is one of them (several VMMs for one folder cannot
            // come from a supervisor that checks before it starts one).
            let recorded = e.status.as_ref().ok().and_then(|s| s.pid);
            let alive = recorded
                .filter(|p| pids.contains(p))
                .or_else(|| pids.first().copied());
            let (status, unreadable) = match (&e.status, alive) {
                (Ok(s), None) if !s.state.is_active() => continue,
                (Ok(s), _) => (s.clone(), None),
                (Err(why), _) => (VmStatus::default(), Some(why.clone())),
            };
            let (status_tx, _) = watch::channel(status);
            let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
            let handle = Arc::new(VmHandle {
                status: status_tx,
                ctl: ctl_tx,
            });
            self.vms
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(e.name.clone(), handle.clone());
            let watched = match alive {
                Some(pid) => {
                    self.watch_adopted(&e.name, &e.dir, &handle, ctl_rx, pid, pidfd_open(pid))
                }
                None => false,
            };
            if watched {
                adopted.push(e.name);
                continue;
            }
            self.update(&e.name, &handle, |s| {
                s.state = VmState::Crashed;
                s.pid = None;
                s.last_exit = Some(ExitRecord {
                    at_ms: now_ms(),
                    reason: match &unreadable {
                        Some(why) => format!(
                            "status.json was unreadable when the daemon restarted \
                             ({why}), and no VMM ran for the VM"
                        ),
                        None => "the VMM was gone when the daemon restarted".into(),
                    },
                    ..ExitRecord::default()
                });
            });
        }
        Ok(adopted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A supervisor over a fresh store with one VM (never started by it), the VM's
    /// folder, and the temporary directory that holds both.
    fn rig() -> (Arc<Supervisor>, PathBuf, tempfile::TempDir) {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path().join("vms")).expect("store");
        let def = VmDefinition::from_json(
            r#"{"name":"vm","vcpus":1,"memory_mib":64,
                "boot":{"kind":"kernel","kernel":"kernel.elf"}}"#,
        )
        .expect("def");
        let dir = store.create(&def).expect("create");
        let mut cfg = SupervisorConfig::new("/nonexistent");
        cfg.stop_timeout = Duration::from_secs(5);
        (Supervisor::new(store, cfg, Arc::new(NoHandover)), dir, tmp)
    }

    /// A stand-in VMM of `dir` that is not its supervisor's child in any way that
    /// matters (it is watched through /proc only): a shell blocked reading the pipe
    /// on its stdin, whose command line names `--vm-dir dir`. It ends on SIGTERM, and
    /// by itself when the pipe closes. Returned once it runs: spawn() returns as soon
    /// as exec has replaced the memory, before the new command line is in place.
    fn fake_vmm(dir: &Path) -> Child {
        use std::io::BufRead;
        let mut child = Command::new("/bin/sh")
            .args(["-c", "echo ready; read x", "fake-vmm", "--vm-dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready");
        assert_eq!(line, "ready\n");
        child
    }

    /// As recover() does for a VMM it found, with the pidfd given.
    fn adopt(sup: &Arc<Supervisor>, dir: &Path, pid: u32, pidfd: std::io::Result<OwnedFd>) -> bool {
        let (status_tx, _) = watch::channel(VmStatus::default());
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let handle = Arc::new(VmHandle {
            status: status_tx,
            ctl: ctl_tx,
        });
        sup.vms
            .lock()
            .expect("lock")
            .insert("vm".into(), handle.clone());
        sup.watch_adopted("vm", dir, &handle, ctl_rx, pid, pidfd)
    }

    fn no_pidfd() -> std::io::Result<OwnedFd> {
        Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vmm_without_a_pidfd_is_polled_and_can_be_stopped() {
        let (sup, dir, _tmp) = rig();
        let mut vmm = fake_vmm(&dir);
        assert!(adopt(&sup, &dir, vmm.id(), no_pidfd()));
        let st = sup.status("vm").expect("status");
        assert_eq!((st.state, st.pid), (VmState::Running, Some(vmm.id())));
        assert!(
            st.last_exit.expect("why").reason.contains("polling"),
            "the reason is shown"
        );
        assert!(
            sup.start("vm").await.is_err(),
            "no second VMM beside a polled one"
        );
        let st = sup.stop("vm").await.expect("stop");
        assert_eq!(st.state, VmState::Stopped);
        assert!(st.last_exit.expect("exit").requested);
        let end = vmm.wait().expect("wait");
        assert_eq!(end.signal(), Some(libc::SIGTERM));
        assert_eq!(
            sup.store().status("vm").expect("record").state,
            VmState::Stopped
        );
        sup.delete("vm").await.expect("delete once stopped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_polled_vmm_can_be_killed() {
        let (sup, dir, _tmp) = rig();
        let mut vmm = fake_vmm(&dir);
        assert!(adopt(&sup, &dir, vmm.id(), no_pidfd()));
        let st = sup.kill("vm").await.expect("kill");
        assert_eq!(st.state, VmState::Stopped);
        assert_eq!(vmm.wait().expect("wait").signal(), Some(libc::SIGKILL));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_polled_vmm_that_ends_by_itself_is_recorded() {
        let (sup, dir, _tmp) = rig();
        let mut vmm = fake_vmm(&dir);
        assert!(adopt(&sup, &dir, vmm.id(), no_pidfd()));
        // EOF on its stdin: the shell exits (and is a zombie until reaped below, which
        // the poll must take for gone too).
        drop(vmm.stdin.take());
        let st = sup
            .wait_for("vm", Duration::from_secs(30), |s| !s.state.is_active())
            .await
            .expect("wait");
        assert_eq!(st.state, VmState::Crashed);
        let exit = st.last_exit.expect("exit");
        assert!(!exit.requested, "{exit:?}");
        assert_eq!(st.pid, None);
        vmm.wait().expect("reap");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_is_refused_before_anything_goes_while_an_unsupervised_vmm_runs() {
        let (sup, dir, _tmp) = rig();
        let mut vmm = fake_vmm(&dir);
        let e = sup
            .check_delete("vm")
            .expect_err("an unsupervised VMM runs");
        assert!(
            matches!(e, SupervisorError::Unsupervised { pid, .. } if pid == vmm.id()),
            "{e}"
        );
        assert!(sup.delete("vm").await.is_err());
        assert!(dir.join("vm.json").exists());
        drop(vmm.stdin.take());
        vmm.wait().expect("reap");
        sup.check_delete("vm").expect("nothing runs now");
        sup.delete("vm").await.expect("delete");
        assert!(!dir.exists());
    }

    /// A start and a delete of one VM, raced many times, leave it consistent: deleted
    /// with no VMM left, or running with its folder intact (and the delete refused,
    /// saying why). The delete's `before_removal` takes a while, as the daemon's port
    /// release does, so that a start unheld by the delete's checks gets in every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_racing_a_start_never_removes_a_running_vm() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path().join("vms")).expect("store");
        // A stand-in VMM that runs until stopped (and takes its sleep along).
        let mut cfg = SupervisorConfig::new("/bin/sh");
        cfg.args_prefix = vec![
            "-c".into(),
            "trap 'kill $! 2>/dev/null; exit 0' TERM; sleep 60 & wait".into(),
            "fake-vmm".into(),
        ];
        cfg.stop_timeout = Duration::from_secs(5);
        let sup = Supervisor::new(store, cfg, Arc::new(NoHandover));
        let def = VmDefinition::from_json(
            r#"{"name":"vm","vcpus":1,"memory_mib":64,
                "boot":{"kind":"kernel","kernel":"kernel.elf"}}"#,
        )
        .expect("def");
        let dir = sup.store().dir("vm");
        let (mut deleted, mut ran) = (0, 0);
        for round in 0..20 {
            sup.store().create(&def).expect("create");
            let (a, b) = (sup.clone(), sup.clone());
            let delete = async move {
                b.delete_with("vm", || std::thread::sleep(Duration::from_millis(30)))
                    .await
            };
            let start = async move { a.start("vm").await };
            // Each goes first in turn: the other comes while it is under way.
            let head_start = Duration::from_millis(5);
            let (start, delete) = if round % 2 == 0 {
                let d = tokio::spawn(delete);
                tokio::time::sleep(head_start).await;
                let s = tokio::spawn(start);
                (s.await.expect("join"), d.await.expect("join"))
            } else {
                let s = tokio::spawn(start);
                tokio::time::sleep(head_start).await;
                let d = tokio::spawn(delete);
                (s.await.expect("join"), d.await.expect("join"))
            };
            match (start, delete) {
                (Err(e), Ok(())) => {
                    assert!(
                        matches!(e, SupervisorError::Store(StoreError::NotFound(_))),
                        "round {round}: {e}"
                    );
                    assert!(!dir.exists(), "round {round}");
                    let pid = scan_vmms().expect("scan").pid_of(&dir);
                    assert_eq!(pid, None, "round {round}: a VMM runs for a deleted VM");
                    deleted += 1;
                }
                (Ok(pid), Err(e)) => {
                    let why = e.to_string();
                    assert!(
                        why.contains("is running") || why.contains("is starting"),
                        "round {round}: {why}"
                    );
                    assert!(dir.join("vm.json").exists(), "round {round}: folder gone");
                    let st = sup.status("vm").expect("status");
                    assert_eq!((st.state, st.pid), (VmState::Running, Some(pid)));
                    let st = sup.stop("vm").await.expect("stop");
                    assert_eq!(st.state, VmState::Stopped);
                    sup.delete("vm").await.expect("delete once stopped");
                    ran += 1;
                }
                (start, delete) => {
                    // Whatever runs goes before the test fails: it may have no handle left.
                    if let Ok(pid) = &start {
                        signal_pid(Some(*pid), libc::SIGTERM);
                    }
                    panic!(
                        "round {round}: start {start:?}, delete {delete:?}, folder there: {}",
                        dir.exists()
                    );
                }
            }
        }
        assert!(deleted > 0 && ran > 0, "deleted {deleted}, ran {ran}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pidfd_of_a_process_that_is_not_the_vmm_is_not_adopted() {
        let (sup, dir, _tmp) = rig();
        // As if the VMM's pid had been reused by the time of pidfd_open: this test
        // process does not name the folder.
        let me = std::process::id();
        let fd = pidfd_open(me).expect("pidfd_open");
        assert!(!adopt(&sup, &dir, me, Ok(fd)));
        // Nor is a process that is gone, pidfd or not.
        let mut gone = fake_vmm(&dir);
        let pid = gone.id();
        drop(gone.stdin.take());
        gone.wait().expect("reap");
        assert!(!adopt(&sup, &dir, pid, no_pidfd()));
    }
}

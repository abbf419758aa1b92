//! The QEMU runner: `qemu-system-x86_64` behind the same VM definition, driven over QMP.
//!
//! It starts the guests the built-in runner cannot: on hosts whose KVM cannot run a
//! stock kernel (this one's nested PVM) it uses TCG, and it boots guests that need
//! firmware (SeaBIOS, `boot: disk`). Disks come from Basalt over NBD (QEMU's own NBD
//! client on the daemon's unix socket) or are files; NICs are TAPs from the vSwitch,
//! by fd or by name. The console is a QEMU socket chardev at `console.sock` with
//! `logfile=console.log`, the same two paths the built-in runner serves, so attaching
//! works the same way. QEMU runs with its own seccomp sandbox (`-sandbox on,...`).
//!
//! [`QemuCommand`] turns a definition plus the host-side endpoints into an argument list
//! (tested without QEMU); [`Qemu`] spawns it and holds the QMP connection; [`Qmp`] is a
//! small synchronous QMP client that keeps the events it sees (SHUTDOWN carries the
//! reason: guest-shutdown, guest-reset, guest-panic, host-qmp-quit...).

use crate::definition::{Boot, CpuFeature, VmDefinition};
use crate::launch::{DiskEndpoint, NicEndpoint};
use crate::nbd::{NbdAddress, DEFAULT_RECONNECT_WINDOW};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Keeps QEMU's `console.log` within [`MAX_CONSOLE_LOG`](crate::vmm::console::MAX_CONSOLE_LOG):
/// QEMU appends to it without a limit, so a guest that floods its serial console
/// would fill the appliance's disk. The runner checks it while QEMU runs; past the limit
/// the file is emptied and restarts with a line saying so (QEMU's descriptor is
/// `O_APPEND`, so its next write lands at the new end). The recent output is what an
/// admin debugging a guest needs; the built-in runner, which writes the log itself,
/// stops logging at the same limit instead.
#[derive(Debug)]
pub struct ConsoleLogCap {
    file: std::fs::File,
    limit: u64,
}

impl ConsoleLogCap {
    /// Opens (creating) `path` for the checks; held from before QEMU starts, so that
    /// no file needs opening later (the runner may be sandboxed by then).
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limit(path, crate::vmm::console::MAX_CONSOLE_LOG)
    }

    fn with_limit(path: &Path, limit: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(ConsoleLogCap { file, limit })
    }

    /// Empties the log if it grew past the limit; true if it did.
    pub fn check(&mut self) -> io::Result<bool> {
        let len = self.file.metadata()?.len();
        if len <= self.limit {
            return Ok(false);
        }
        self.file.set_len(0)?;
        writeln!(
            self.file,
            "[basalt: console.log passed {} bytes; the output before this line was discarded]",
            self.limit
        )?;
        Ok(true)
    }
}

/// The binary, unless `BASALT_QEMU` names another.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Why QEMU could not be started or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// QEMU is not installed.
    #[error("{binary} not found: install qemu-system-x86 (from bookworm-backports, to match qemu-utils)")]
    NotInstalled {
        /// What was looked for.
        binary: String,
    },
    /// Spawning or talking to QEMU failed.
    #[error("QEMU {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QMP answered with an error, or not in time.
    #[error("QMP {command}: {message}")]
    Qmp {
        /// The command.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// QEMU exited before QMP came up.
    #[error("QEMU exited during startup ({status}); its last words: {stderr}")]
    EarlyExit {
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Binary translation.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens and is not the nested PVM module (on which a stock
    /// kernel does not boot, see `compute/PVM.md`), TCG otherwise.
    pub fn detect() -> Self {
        if crate::launch::kvm_runs_stock_linux() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

/// A QEMU command line for one VM.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    /// The binary.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// fds to keep open in the child (TAPs handed over by fd).
    pub keep_fds: Vec<i32>,
    /// Where QMP listens.
    pub qmp_socket: PathBuf,
}

/// QEMU's option syntax doubles commas inside values.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

/// QEMU's NBD client options for a disk the daemon serves: spelled out (not a URI) so
/// that `reconnect-delay` can be given, which lets QEMU ride out a daemon restart as the
/// built-in runner's client does (requests pause, then resume on the new connection;
/// past the delay they fail). `reconnect` is `--nbd-reconnect-secs` (QEMU takes whole
/// seconds).
fn nbd_drive_options(addr: &NbdAddress, reconnect: Duration) -> String {
    let server = match addr {
        NbdAddress::Unix { socket, .. } => format!(
            "file.server.type=unix,file.server.path={}",
            esc(&socket.display().to_string())
        ),
        NbdAddress::Tcp { host, port, .. } => format!(
            "file.server.type=inet,file.server.host={},file.server.port={port}",
            esc(host)
        ),
    };
    let export = match addr {
        NbdAddress::Unix { export, .. } | NbdAddress::Tcp { export, .. } => export,
    };
    format!(
        "file.driver=nbd,{server},file.export={},file.reconnect-delay={}",
        esc(export),
        reconnect.as_secs()
    )
}

fn feature_name(f: CpuFeature) -> &'static [&'static str] {
    match f {
        CpuFeature::Cx16 => &["cx16"],
        CpuFeature::Xsave => &["xsave", "avx", "avx2"],
        CpuFeature::Avx => &["avx", "avx2"],
        CpuFeature::Rdrand => &["rdrand", "rdseed"],
        CpuFeature::TscDeadline => &["tsc-deadline"],
        CpuFeature::X2apic => &["x2apic"],
        CpuFeature::Pcid => &["pcid"],
    }
}

impl QemuCommand {
    /// The command for `def` in folder `dir`, with disks and NICs resolved to host-side
    /// endpoints (one per disk and NIC, in the definition's order); NBD disks wait
    /// [`DEFAULT_RECONNECT_WINDOW`] for a lost connection (see [`QemuCommand::build_with`]).
    pub fn build(
        def: &VmDefinition,
        dir: &Path,
        disks: &[DiskEndpoint],
        nics: &[NicEndpoint],
        accel: Accel,
    ) -> Self {
        Self::build_with(def, dir, disks, nics, accel, DEFAULT_RECONNECT_WINDOW)
    }

    /// [`QemuCommand::build`] with NBD disks waiting `nbd_reconnect` for a lost
    /// connection (`--nbd-reconnect-secs`) before their requests fail.
    pub fn build_with(
        def: &VmDefinition,
        dir: &Path,
        disks: &[DiskEndpoint],
        nics: &[NicEndpoint],
        accel: Accel,
        nbd_reconnect: Duration,
    ) -> Self {
        let binary = std::env::var_os("BASALT_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(QEMU_BINARY));
        let qmp_socket = dir.join("qmp.sock");
        let console_sock = dir.join("console.sock");
        let console_log = dir.join("console.log");
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", esc(&def.name)),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-machine".into(),
            "pc".into(),
        ];
        let mut cpu = match accel {
            Accel::Kvm => {
                a.extend(["-accel".into(), "kvm".into()]);
                "host".to_string()
            }
            Accel::Tcg => {
                a.extend(["-accel".into(), "tcg".into()]);
                "max".to_string()
            }
        };
        for f in &def.cpu.hide_features {
            for n in feature_name(*f) {
                cpu.push_str(&format!(",-{n}"));
            }
        }
        a.extend(["-cpu".into(), cpu]);
        a.extend(["-smp".into(), def.vcpus.to_string()]);
        a.extend(["-m".into(), def.memory_mib.to_string()]);
        match &def.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                a.extend([
                    "-kernel".into(),
                    VmDefinition::resolve(dir, kernel).display().to_string(),
                ]);
                if let Some(i) = initrd {
                    a.extend([
                        "-initrd".into(),
                        VmDefinition::resolve(dir, i).display().to_string(),
                    ]);
                }
                a.extend(["-append".into(), cmdline.clone()]);
            }
            Boot::Disk => a.extend(["-boot".into(), "c".into()]),
        }
        a.extend([
            "-chardev".into(),
            format!(
                "socket,id=con0,path={},server=on,wait=off,logfile={},logappend=on",
                esc(&console_sock.display().to_string()),
                esc(&console_log.display().to_string())
            ),
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                esc(&qmp_socket.display().to_string())
            ),
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        ]);
        for (i, (disk, ep)) in def.disks.iter().zip(disks).enumerate() {
            let ro = if disk.read_only { ",readonly=on" } else { "" };
            let file = match ep {
                DiskEndpoint::Nbd(addr) => nbd_drive_options(addr, nbd_reconnect),
                DiskEndpoint::File(p) => format!("file={}", esc(&p.display().to_string())),
            };
            a.extend([
                "-drive".into(),
                format!("{file},format=raw,if=none,id=d{i},cache=none,aio=threads{ro}"),
                "-device".into(),
                format!("virtio-blk-pci,drive=d{i},serial={}", esc(&disk.id)),
            ]);
        }
        let mut keep_fds = Vec::new();
        for (i, ep) in nics.iter().enumerate() {
            let mac = def.nic_mac(i).unwrap_or([2, 0xba, 0, 0, 0, i as u8]);
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            let netdev = match ep {
                NicEndpoint::TapName(name) => {
                    format!("tap,id=n{i},ifname={},script=no,downscript=no", esc(name))
                }
                NicEndpoint::TapFd(fd) => {
                    keep_fds.push(*fd);
                    format!("tap,id=n{i},fd={fd}")
                }
            };
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("virtio-net-pci,netdev=n{i},mac={mac},romfile="),
            ]);
        }
        if def.memory.balloon {
            a.extend(["-device".into(), "virtio-balloon-pci,id=balloon0".into()]);
        }
        QemuCommand {
            binary,
            args: a.into_iter().map(OsString::from).collect(),
            keep_fds,
            qmp_socket,
        }
    }
}

/// A QMP connection. Events seen while waiting for replies are kept.
pub struct Qmp {
    writer: UnixStream,
    replies: mpsc::Receiver<Value>,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout`, and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QemuError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QemuError::Io {
                        what: format!("connect QMP at {}", path.display()),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let reader = stream.try_clone().map_err(|source| QemuError::Io {
            what: "clone QMP socket".into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let ev = events.clone();
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if v.get("event").is_some() {
                        ev.lock().unwrap_or_else(PoisonError::into_inner).push(v);
                    } else if tx.send(v).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| QemuError::Io {
                what: "start QMP reader".into(),
                source,
            })?;
        let mut qmp = Qmp {
            writer: stream,
            replies: rx,
            events,
        };
        // The greeting, then capabilities negotiation.
        let greeting = qmp
            .replies
            .recv_timeout(timeout)
            .map_err(|_| QemuError::Qmp {
                command: "greeting".into(),
                message: "no greeting".into(),
            })?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Qmp {
                command: "greeting".into(),
                message: format!("unexpected {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs a command; returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QemuError::Io {
                what: format!("send QMP {command}"),
                source,
            })?;
        let reply = self
            .replies
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| QemuError::Qmp {
                command: command.into(),
                message: "no reply within 10 s".into(),
            })?;
        if let Some(err) = reply.get("error") {
            return Err(QemuError::Qmp {
                command: command.into(),
                message: err.to_string(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Events seen so far.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The reason of the last SHUTDOWN event, if any (`guest-shutdown`,
    /// `guest-reset`, `guest-panic`, `host-qmp-quit`, `host-signal`...).
    pub fn shutdown_reason(&self) -> Option<String> {
        self.events()
            .iter()
            .rev()
            .find(|e| e["event"] == "SHUTDOWN")
            .and_then(|e| e["data"]["reason"].as_str().map(String::from))
    }
}

/// A running QEMU.
pub struct Qemu {
    child: Child,
    /// Its QMP connection.
    pub qmp: Qmp,
    stderr_path: PathBuf,
}

impl Qemu {
    /// Spawns QEMU (dying with this process: PR_SET_PDEATHSIG) and connects QMP.
    /// QEMU's stderr goes to `qemu.log` in the VM folder.
    pub fn spawn(cmd: &QemuCommand, dir: &Path) -> Result<Self, QemuError> {
        let _ = std::fs::remove_file(&cmd.qmp_socket);
        let stderr_path = dir.join("qemu.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| QemuError::Io {
            what: format!("create {}", stderr_path.display()),
            source,
        })?;
        let mut c = Command::new(&cmd.binary);
        c.args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let keep = cmd.keep_fds.clone();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (prctl, fcntl).
        unsafe {
            c.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                for &fd in &keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    }
                }
                Ok(())
            });
        }
        let mut child = c.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                QemuError::NotInstalled {
                    binary: cmd.binary.display().to_string(),
                }
            } else {
                QemuError::Io {
                    what: "spawn".into(),
                    source,
                }
            }
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(QemuError::EarlyExit {
                    status: status.to_string(),
                    stderr: tail(&stderr_path),
                });
            }
            if cmd.qmp_socket.exists() {
                match Qmp::connect(&cmd.qmp_socket, Duration::from_secs(5)) {
                    Ok(q) => break q,
                    Err(e) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        return Err(e);
                    }
                    Err(_) => {}
                }
            } else if Instant::now() >= deadline {
                let _ = child.kill();
                return Err(QemuError::Qmp {
                    command: "startup".into(),
                    message: format!("no QMP socket after 10 s; stderr: {}", tail(&stderr_path)),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Qemu {
            child,
            qmp,
            stderr_path,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the guest to power off (ACPI power button).
    pub fn powerdown(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("system_powerdown", None).map(|_| ())
    }

    /// Tells QEMU to exit now.
    pub fn quit(&mut self) -> Result<(), QemuError> {
        self.qmp.execute("quit", None).map(|_| ())
    }

    /// Exit status, if QEMU has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for QEMU to exit.
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Kills QEMU.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr_path)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_disks_nics_console_and_qmp() {
        let def = VmDefinition::from_json(
            r#"{"name":"t1","vcpus":2,"memory_mib":256,
                "boot":{"kind":"kernel","kernel":"vmlinuz","initrd":"/abs/initrd.gz","cmdline":"console=ttyS0"},
                "disks":[{"id":"root","source":{"lun":"p/l"}},{"id":"ro","source":{"file":"x,y.img"},"read_only":true}],
                "nics":[{"id":"eth0","port_group":"pg","mac":"02:00:00:00:00:01"}],
                "cpu":{"hide_features":["cx16"]}}"#,
        )
        .expect("def");
        let disks = [
            DiskEndpoint::Nbd(NbdAddress::parse("nbd+unix:///l?socket=/run/b.sock").expect("addr")),
            DiskEndpoint::File("/vms/t1/x,y.img".into()),
        ];
        let nics = [NicEndpoint::TapFd(7)];
        let cmd = QemuCommand::build(&def, Path::new("/vms/t1"), &disks, &nics, Accel::Tcg);
        let args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("-accel tcg -cpu max,-cx16 -smp 2 -m 256"),
            "{joined}"
        );
        assert!(
            joined.contains("-kernel /vms/t1/vmlinuz -initrd /abs/initrd.gz"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "file.driver=nbd,file.server.type=unix,file.server.path=/run/b.sock,\
                 file.export=l,file.reconnect-delay=60,format=raw"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("file=/vms/t1/x,,y.img,format=raw"),
            "{joined}"
        );
        assert!(joined.contains("readonly=on"), "{joined}");
        assert!(joined.contains("tap,id=n0,fd=7"), "{joined}");
        assert!(joined.contains("mac=02:00:00:00:00:01"), "{joined}");
        assert!(joined.contains("path=/vms/t1/console.sock"), "{joined}");
        assert!(joined.contains("logfile=/vms/t1/console.log"), "{joined}");
        assert_eq!(cmd.keep_fds, vec![7]);
        assert_eq!(cmd.qmp_socket, Path::new("/vms/t1/qmp.sock"));
    }

    #[test]
    fn the_console_log_is_restarted_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut cap = ConsoleLogCap::with_limit(&path, 100).unwrap();
        // QEMU's side: another descriptor, appending.
        let mut qemu = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        qemu.write_all(&[b'a'; 100]).unwrap();
        assert!(!cap.check().unwrap(), "at the limit: kept");
        qemu.write_all(b"b").unwrap();
        assert!(cap.check().unwrap());
        qemu.write_all(b"after\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("[basalt: console.log passed 100 bytes"),
            "{text}"
        );
        assert!(text.ends_with("was discarded]\nafter\n"), "{text}");
    }

    #[test]
    fn nbd_disks_get_the_configured_reconnect_delay() {
        let def = VmDefinition::from_json(
            r#"{"name":"t2","vcpus":1,"memory_mib":128,
                "boot":{"kind":"kernel","kernel":"vmlinuz","cmdline":"console=ttyS0"},
                "disks":[{"id":"root","source":{"lun":"p/l"}}]}"#,
        )
        .expect("def");
        let disks = [DiskEndpoint::Nbd(
            NbdAddress::parse("nbd://10.0.0.5:10809/l").expect("addr"),
        )];
        let cmd = QemuCommand::build_with(
            &def,
            Path::new("/vms/t2"),
            &disks,
            &[],
            Accel::Tcg,
            Duration::from_secs(7),
        );
        let joined = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains(
                "file.server.type=inet,file.server.host=10.0.0.5,file.server.port=10809,\
                 file.export=l,file.reconnect-delay=7,"
            ),
            "{joined}"
        );
        assert!(!joined.contains("reconnect-delay=60"), "{joined}");
    }
}

//! A VM's LUN disk across a daemon restart: the VMM (`basalt vmm`) outlives
//! `basalt serve`, its `NbdDev` reconnects to the VM NBD server the restarted daemon
//! serves again on the same socket, and the guest's disk I/O carries on without an
//! error.
//!
//! The guest is a small 64-bit program (as in `tests/vms.rs`, booted as an ELF
//! "kernel"): a virtio-blk driver in a loop that writes a block with its iteration
//! number, reads it back, compares, and prints `.` every 256 rounds (`!` and halts on a
//! device error or a wrong read-back). Needs `/dev/kvm` and root.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step is a failed test

mod common;
use basalt_compute::vmm::boot::flat_elf;
use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

// The guest, assembled with GNU as (`as --64`, `objcopy -O binary -j .text`) from:
//
// .intel_syntax noprefix
// .code64
// .set DESC, 0x300000
// .set AVAIL, 0x301000
// .set USED, 0x302000
// .set HDR, 0x303000
// .set DATA, 0x304000
// .set STAT, 0x305000
// .macro submit
//     mov byte ptr [STAT], 0xff
//     movzx eax, r13w
//     and eax, 7
//     mov word ptr [AVAIL+4+rax*2], 0
//     inc r13d
//     mov word ptr [AVAIL+2], r13w
//     mov dword ptr [rbx+0x50], 0
// 1:
//     pause
//     movzx eax, word ptr [USED+2]
//     cmp ax, r13w
//     jne 1b
//     cmp byte ptr [STAT], 0
//     jne fail
// .endm
// start:
//     movabs rbx, 0xd0000000
//     mov dword ptr [rbx+0x70], 0
//     mov dword ptr [rbx+0x70], 1
//     mov dword ptr [rbx+0x70], 3
//     mov dword ptr [rbx+0x24], 1
//     mov dword ptr [rbx+0x20], 1
//     mov dword ptr [rbx+0x24], 0
//     mov dword ptr [rbx+0x20], 0
//     mov dword ptr [rbx+0x70], 11
//     mov dword ptr [rbx+0x30], 0
//     mov dword ptr [rbx+0x38], 8
//     mov dword ptr [rbx+0x80], DESC
//     mov dword ptr [rbx+0x84], 0
//     mov dword ptr [rbx+0x90], AVAIL
//     mov dword ptr [rbx+0x94], 0
//     mov dword ptr [rbx+0xa0], USED
//     mov dword ptr [rbx+0xa4], 0
//     mov dword ptr [rbx+0x44], 1
//     mov dword ptr [rbx+0x70], 15
//     mov qword ptr [DESC], HDR
//     mov dword ptr [DESC+8], 16
//     mov word ptr [DESC+12], 1
//     mov word ptr [DESC+14], 1
//     mov qword ptr [DESC+16], DATA
//     mov dword ptr [DESC+24], 4096
//     mov word ptr [DESC+28], 1
//     mov word ptr [DESC+30], 2
//     mov qword ptr [DESC+32], STAT
//     mov dword ptr [DESC+40], 1
//     mov word ptr [DESC+44], 2
//     mov word ptr [DESC+46], 0
//     xor r12, r12
//     xor r13d, r13d
//     mov dx, 0x3f8
//     mov al, 'G'
//     out dx, al
// next:
//     inc r12
//     mov dword ptr [HDR], 1
//     mov dword ptr [HDR+4], 0
//     mov rax, r12
//     and rax, 63
//     shl rax, 3
//     mov qword ptr [HDR+8], rax
//     mov qword ptr [DATA], r12
//     mov word ptr [DESC+28], 1
//     submit
//     mov dword ptr [HDR], 0
//     mov qword ptr [DATA], 0
//     mov word ptr [DESC+28], 3
//     submit
//     cmp qword ptr [DATA], r12
//     jne fail
//     test r12, 255
//     jnz next
//     mov al, '.'
//     out dx, al
//     jmp next
// fail:
//     mov al, '!'
//     out dx, al
// 2:
//     hlt
//     jmp 2b
const DISK_LOOP: [u8; 572] = [
    0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x70, 0x00, 0x00, 0x00,
    0x00, 0xc7, 0x43, 0x70, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x70, 0x03, 0x00, 0x00, 0x00, 0xc7,
    0x43, 0x24, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x20, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x24,
    0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x20, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x70, 0x0b, 0x00,
    0x00, 0x00, 0xc7, 0x43, 0x30, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x38, 0x08, 0x00, 0x00, 0x00,
    0xc7, 0x83, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00, 0xc7, 0x83, 0x84, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xc7, 0x83, 0x90, 0x00, 0x00, 0x00, 0x00, 0x10, 0x30, 0x00, 0xc7, 0x83,
    0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x83, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x20,
    0x30, 0x00, 0xc7, 0x83, 0xa4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x44, 0x01,
    0x00, 0x00, 0x00, 0xc7, 0x43, 0x70, 0x0f, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x00, 0x00,
    0x30, 0x00, 0x00, 0x30, 0x30, 0x00, 0xc7, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00, 0x10, 0x00, 0x00,
    0x00, 0x66, 0xc7, 0x04, 0x25, 0x0c, 0x00, 0x30, 0x00, 0x01, 0x00, 0x66, 0xc7, 0x04, 0x25, 0x0e,
    0x00, 0x30, 0x00, 0x01, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x10, 0x00, 0x30, 0x00, 0x00, 0x40, 0x30,
    0x00, 0xc7, 0x04, 0x25, 0x18, 0x00, 0x30, 0x00, 0x00, 0x10, 0x00, 0x00, 0x66, 0xc7, 0x04, 0x25,
    0x1c, 0x00, 0x30, 0x00, 0x01, 0x00, 0x66, 0xc7, 0x04, 0x25, 0x1e, 0x00, 0x30, 0x00, 0x02, 0x00,
    0x48, 0xc7, 0x04, 0x25, 0x20, 0x00, 0x30, 0x00, 0x00, 0x50, 0x30, 0x00, 0xc7, 0x04, 0x25, 0x28,
    0x00, 0x30, 0x00, 0x01, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x04, 0x25, 0x2c, 0x00, 0x30, 0x00, 0x02,
    0x00, 0x66, 0xc7, 0x04, 0x25, 0x2e, 0x00, 0x30, 0x00, 0x00, 0x00, 0x4d, 0x31, 0xe4, 0x45, 0x31,
    0xed, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x47, 0xee, 0x49, 0xff, 0xc4, 0xc7, 0x04, 0x25, 0x00, 0x30,
    0x30, 0x00, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x04, 0x25, 0x04, 0x30, 0x30, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x4c, 0x89, 0xe0, 0x48, 0x83, 0xe0, 0x3f, 0x48, 0xc1, 0xe0, 0x03, 0x48, 0x89, 0x04, 0x25,
    0x08, 0x30, 0x30, 0x00, 0x4c, 0x89, 0x24, 0x25, 0x00, 0x40, 0x30, 0x00, 0x66, 0xc7, 0x04, 0x25,
    0x1c, 0x00, 0x30, 0x00, 0x01, 0x00, 0xc6, 0x04, 0x25, 0x00, 0x50, 0x30, 0x00, 0xff, 0x41, 0x0f,
    0xb7, 0xc5, 0x83, 0xe0, 0x07, 0x66, 0xc7, 0x04, 0x45, 0x04, 0x10, 0x30, 0x00, 0x00, 0x00, 0x41,
    0xff, 0xc5, 0x66, 0x44, 0x89, 0x2c, 0x25, 0x02, 0x10, 0x30, 0x00, 0xc7, 0x43, 0x50, 0x00, 0x00,
    0x00, 0x00, 0xf3, 0x90, 0x0f, 0xb7, 0x04, 0x25, 0x02, 0x20, 0x30, 0x00, 0x66, 0x44, 0x39, 0xe8,
    0x75, 0xf0, 0x80, 0x3c, 0x25, 0x00, 0x50, 0x30, 0x00, 0x00, 0x0f, 0x85, 0x86, 0x00, 0x00, 0x00,
    0xc7, 0x04, 0x25, 0x00, 0x30, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x00,
    0x40, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x04, 0x25, 0x1c, 0x00, 0x30, 0x00, 0x03,
    0x00, 0xc6, 0x04, 0x25, 0x00, 0x50, 0x30, 0x00, 0xff, 0x41, 0x0f, 0xb7, 0xc5, 0x83, 0xe0, 0x07,
    0x66, 0xc7, 0x04, 0x45, 0x04, 0x10, 0x30, 0x00, 0x00, 0x00, 0x41, 0xff, 0xc5, 0x66, 0x44, 0x89,
    0x2c, 0x25, 0x02, 0x10, 0x30, 0x00, 0xc7, 0x43, 0x50, 0x00, 0x00, 0x00, 0x00, 0xf3, 0x90, 0x0f,
    0xb7, 0x04, 0x25, 0x02, 0x20, 0x30, 0x00, 0x66, 0x44, 0x39, 0xe8, 0x75, 0xf0, 0x80, 0x3c, 0x25,
    0x00, 0x50, 0x30, 0x00, 0x00, 0x75, 0x1f, 0x4c, 0x39, 0x24, 0x25, 0x00, 0x40, 0x30, 0x00, 0x75,
    0x15, 0x49, 0xf7, 0xc4, 0xff, 0x00, 0x00, 0x00, 0x0f, 0x85, 0xfa, 0xfe, 0xff, 0xff, 0xb0, 0x2e,
    0xee, 0xe9, 0xf2, 0xfe, 0xff, 0xff, 0xb0, 0x21, 0xee, 0xf4, 0xeb, 0xfd,
];

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs a usable /dev/kvm (as root, or in group kvm): {e}");
    }
}

/// Kills (SIGKILL) every VMM process the daemon recorded, however the test ends: VMMs
/// run in their own sessions and would outlive the test's daemon.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("status.json")) else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if let Some(pid) = v["pid"].as_u64() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

// Fields drop in order: the VMMs first, then the daemon, then the directories.
struct Rig {
    _reaper: Reaper,
    d: Daemon,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let token = self.d.token();
        let text;
        let mut extra = vec!["-X", method];
        if let Some(b) = body {
            text = b.to_string();
            extra.extend([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &text,
            ]);
        }
        let (code, out) = self.d.curl(path, Some(&token), &extra);
        (code, serde_json::from_str(&out).unwrap_or(Value::Null))
    }

    fn vm(&self, name: &str) -> Value {
        let (code, v) = self.api("GET", &format!("/api/v1/vms/{name}"), None);
        assert_eq!(code, 200, "{v}");
        v
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.d.data_dir.join("vms").join(name)
    }

    fn vmm_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.vm_dir(name).join("vmm.log")).unwrap_or_default()
    }

    /// The console log, read from the VM folder (works while the daemon is down).
    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.vm_dir(name).join("console.log")).unwrap_or_default()
    }

    /// Waits until the console holds `dots` more progress dots than `since` (no `!`).
    fn wait_progress(&self, name: &str, since: usize, dots: usize, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.console(name);
            assert!(
                !text.contains('!'),
                "the guest saw a disk error {what}: {text:?}\nvmm.log:\n{}\ndaemon:\n{}",
                self.vmm_log(name),
                self.d.log_text()
            );
            if text.matches('.').count() >= since + dots {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no disk progress {what} after 30 s: {text:?}\nvmm.log:\n{}\ndaemon:\n{}",
                self.vmm_log(name),
                self.d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether process `pid` runs (a zombie whose parent is gone does not).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("?")
}

#[test]
fn a_vm_lun_disk_keeps_working_across_a_daemon_restart() {
    require_kvm();
    let dir = tempdir();
    let root = dir.path().to_path_buf();
    let data = root.join("var");
    let mut doc = String::from(EPHEMERAL);
    for i in 0..2 {
        doc += &format!(
            "\n[[disk]]\nname = \"d{i}\"\npath = \"{}\"\nkind = \"file\"\nsize = \"256M\"\n",
            root.join(format!("d{i}.img")).display()
        );
    }
    let d = Daemon::start(&data, Some(&doc));
    let mut r = Rig {
        _reaper: Reaper(data.clone()),
        d,
        root,
        _dir: dir,
    };
    r.d.cli(&["pool", "create", "p0", "--raid", "1", "d0", "d1"])
        .ok();
    r.d.cli(&["lun", "create", "root1", "--pool", "p0", "--size", "16M"])
        .ok();
    let kernel = r.root.join("disk-loop.elf");
    std::fs::write(&kernel, flat_elf(&DISK_LOOP, 0x20_0000)).unwrap();
    let def = json!({
        "name": "busy", "vcpus": 1, "memory_mib": 64, "runner": "builtin",
        "boot": {"kind": "kernel", "kernel": kernel, "cmdline": "console=ttyS0"},
        "disks": [{"id": "root", "source": {"lun": "p0/root1"}}],
    });
    assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    assert_eq!(r.api("POST", "/api/v1/vms/busy/start", None).0, 200);
    let text = r.wait_progress("busy", 0, 4, "before the restart");
    assert!(text.starts_with('G'), "{text:?}");
    let v = r.vm("busy");
    assert_eq!(state(&v), "running", "{v:#}");
    let pid = v["status"]["pid"].as_u64().unwrap();

    // The daemon goes, and with it the VM NBD server: the guest's I/O waits (no
    // progress, no error) while the VMM lives on.
    assert_eq!(r.d.stop(), 0);
    assert!(alive(pid), "the VMM died with the daemon");
    std::thread::sleep(Duration::from_millis(300));
    let during = r.console("busy");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        r.console("busy"),
        during,
        "the guest's disk I/O went on without the daemon?"
    );
    assert!(!during.contains('!'), "{during:?}\n{}", r.vmm_log("busy"));
    assert!(alive(pid), "the VMM died without its disk");
    assert!(
        r.vmm_log("busy")
            .contains("NBD connection to nbd+unix:///root1"),
        "{}",
        r.vmm_log("busy")
    );

    // The daemon is back (its stored state: same pool, LUN, VM NBD socket): it
    // re-adopts the VMM, the VMM reconnects, and the guest carries on.
    r.d = Daemon::start(&data, None);
    let v = r.vm("busy");
    assert_eq!(state(&v), "running", "{v:#}");
    assert_eq!(v["status"]["pid"], pid, "{v:#}");
    let before = during.matches('.').count();
    r.wait_progress("busy", before, 8, "after the restart");
    let log = r.vmm_log("busy");
    assert!(
        log.contains("NBD connection to nbd+unix:///root1?socket=")
            && log.contains(" restored after "),
        "{log}"
    );
    assert!(alive(pid));

    let out = r.d.cli(&["--json", "vm", "stop", "busy"]).ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(state(&v), "stopped", "{v:#}");
    assert_eq!(
        v["status"]["last_exit"]["reason"],
        "stopped on request",
        "{v:#}\nvmm.log:\n{}",
        r.vmm_log("busy")
    );
}

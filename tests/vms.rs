//! VMs end to end through the daemon: `basalt vm` and `/api/v1/vms` drive real
//! `basalt vmm` processes (the built-in KVM runner) supervised by `basalt serve`.
//!
//! The guests are the compute crate's small 64-bit programs wrapped as ELF "kernels"
//! (`vmm::boot::flat_elf`): they boot in milliseconds under this host's nested KVM, where
//! a stock Linux kernel cannot (compute/PVM.md). Needs `/dev/kvm` and root.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step is a failed test

mod common;
use basalt_compute::vmm::boot::flat_elf;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need a usable /dev/kvm (as root, or in group kvm): {e}");
    }
}

/// `print text; then jmp $`: runs until stopped.
fn spinning(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]);
    }
    c.extend_from_slice(&[0xeb, 0xfe]);
    c
}

/// Prints the DeviceID of virtio-mmio slots 0, 1, 2 as digits, then powers off.
const DEVICE_IDS: [u8; 46] = [
    0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0x8b, 0x43,
    0x08, 0x04, 0x30, 0xee, 0x8b, 0x83, 0x08, 0x10, 0x00, 0x00, 0x04, 0x30, 0xee, 0x8b, 0x83, 0x08,
    0x20, 0x00, 0x00, 0x04, 0x30, 0xee, 0x66, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee, 0xf4,
];

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

/// Kills (SIGKILL) every VMM process the daemon recorded, when the test ends however it
/// ends: VMMs run in their own sessions and would outlive the test's daemon.
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

// Fields drop in order: the VMMs first, then the daemon, then the directory.
struct Rig {
    _reaper: Reaper,
    d: Daemon,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

fn rig(config: Option<String>) -> Rig {
    require_kvm();
    let dir = tempdir();
    let root = dir.path().to_path_buf();
    let data = root.join("var");
    let d = Daemon::start(&data, Some(config.as_deref().unwrap_or(EPHEMERAL)));
    Rig {
        _dir: dir,
        root,
        _reaper: Reaper(data),
        d,
    }
}

impl Rig {
    /// A kernel file for `program` in the test directory.
    fn kernel(&self, name: &str, program: &[u8]) -> PathBuf {
        let path = self.root.join(format!("{name}.elf"));
        std::fs::write(&path, flat_elf(program, 0x20_0000)).unwrap();
        path
    }

    /// A VM definition booting `kernel` on the built-in runner, with `extra` fields.
    fn definition(&self, name: &str, kernel: &Path, extra: Value) -> Value {
        let mut def = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "runner": "builtin",
            "boot": {"kind": "kernel", "kernel": kernel, "cmdline": "console=ttyS0"},
        });
        for (k, v) in extra.as_object().unwrap() {
            def[k] = v.clone();
        }
        def
    }

    /// An API call with the token: (status, JSON body or Null).
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

    /// Polls the VM until `pred` holds on its JSON.
    fn wait(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.vm(name);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name}: no {what} after 30 s: {v:#}\nvmm.log:\n{}\ndaemon:\n{}",
                self.vmm_log(name),
                self.d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn vmm_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.d.data_dir.join("vms").join(name).join("vmm.log"))
            .unwrap_or_default()
    }

    /// The console log through the API, from offset 0.
    fn console(&self, name: &str) -> String {
        let (code, v) = self.api("GET", &format!("/api/v1/vms/{name}/console"), None);
        assert_eq!(code, 200, "{v}");
        v["text"].as_str().unwrap().to_string()
    }

    /// The console log read from the VM folder (works while the daemon is down).
    fn console_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.d.data_dir.join("vms").join(name).join("console.log"))
            .unwrap_or_default()
    }

    /// Waits until the console holds `dots` more progress dots than `since` (no `!`).
    fn wait_progress(&self, name: &str, since: usize, dots: usize, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.console_file(name);
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
fn vm_lifecycle_through_the_cli_and_the_api() {
    let r = rig(None);
    let kernel = r.kernel("spin", &spinning(b"hello from vm1\n"));
    // A file disk the VMM opens itself (it becomes virtio-blk in the guest).
    let scratch = r.root.join("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    let def = r.definition(
        "vm1",
        &kernel,
        json!({"disks": [{"id": "scratch", "source": {"file": scratch}}]}),
    );
    let file = r.root.join("vm1.json");
    std::fs::write(&file, def.to_string()).unwrap();
    let out =
        r.d.cli(&["vm", "create", "--file", file.to_str().unwrap()])
            .ok();
    assert!(out.stdout.contains("Created VM vm1"), "{}", out.stdout);
    assert_eq!(
        r.d.cli(&["vm", "create", "--file", file.to_str().unwrap()])
            .code,
        1
    );

    let v = r.vm("vm1");
    assert_eq!(state(&v), "stopped");
    assert_eq!(v["definition"]["vcpus"], 1);

    let out = r.d.cli(&["vm", "start", "vm1"]).ok();
    assert!(out.stdout.contains("Started VM vm1"), "{}", out.stdout);
    let v = r.wait("vm1", "console output", |_| {
        r.console("vm1").contains("hello from vm1")
    });
    assert_eq!(state(&v), "running", "{v:#}");
    assert_eq!(v["status"]["runner"], "builtin");
    let pid = v["status"]["pid"].as_u64().expect("a pid while running");
    // The VMM is this very binary, started as `basalt vmm --vm-dir ...`.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(" vmm --vm-dir "), "{cmdline}");
    assert!(r.vmm_log("vm1").contains("seccomp filter installed"));

    // A second start and a delete are refused while it runs.
    assert_eq!(r.api("POST", "/api/v1/vms/vm1/start", None).0, 409);
    let (code, body) = r.api("DELETE", "/api/v1/vms/vm1", None);
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("running"),
        "{body}"
    );

    let list = r.d.cli(&["vm", "list"]).ok().stdout;
    assert!(list.contains("vm1") && list.contains("running"), "{list}");
    assert!(list.contains(&pid.to_string()), "{list}");

    // The console: whole, then followed from an offset.
    let out = r.d.cli(&["vm", "console", "vm1"]).ok();
    assert_eq!(out.stdout, "hello from vm1\n");
    let (_, chunk) = r.api("GET", "/api/v1/vms/vm1/console?offset=6", None);
    assert_eq!(chunk["text"], "from vm1\n");
    assert_eq!(chunk["next_offset"], 15);
    let (_, chunk) = r.api("GET", "/api/v1/vms/vm1/console?offset=15", None);
    assert_eq!(chunk["text"], "");

    // Metrics while it runs, checked by promtool.
    let (code, scrape) = r.d.curl("/metrics", None, &[]);
    assert_eq!(code, 200);
    for line in [
        "basalt_vm_info{vm=\"vm1\",runner=\"builtin\"} 1",
        "basalt_vm_state{vm=\"vm1\",state=\"running\"} 1",
        "basalt_vm_state{vm=\"vm1\",state=\"stopped\"} 0",
        "basalt_vm_restarts_total{vm=\"vm1\"} 0",
    ] {
        assert!(scrape.contains(line), "{line} missing:\n{scrape}");
    }
    promtool_check(&scrape);

    // Stop: the exit record says it was asked, and the process is gone.
    let out = r.d.cli(&["--json", "vm", "stop", "vm1"]).ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(state(&v), "stopped", "{v:#}");
    let exit = &v["status"]["last_exit"];
    assert_eq!(exit["requested"], true, "{v:#}");
    assert_eq!(exit["code"], 0, "{v:#}");
    assert_eq!(exit["reason"], "stopped on request");
    assert!(v["status"]["pid"].is_null());
    assert!(!alive(pid), "VMM {pid} still runs");
    let list = r.d.cli(&["vm", "list"]).ok().stdout;
    assert!(list.contains("stopped on request"), "{list}");
    assert_eq!(r.d.cli(&["vm", "stop", "vm1"]).code, 1, "nothing to stop");

    // Start again, kill, delete.
    r.d.cli(&["vm", "start", "vm1"]).ok();
    r.wait("vm1", "a second boot", |_| {
        r.console("vm1").matches("hello from vm1").count() == 2
    });
    let out = r.d.cli(&["--json", "vm", "kill", "vm1"]).ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["status"]["last_exit"]["signal"], 9, "{v:#}");
    r.d.cli(&["vm", "delete", "vm1"]).ok();
    assert_eq!(r.api("GET", "/api/v1/vms/vm1", None).0, 404);
    assert!(!r.d.data_dir.join("vms/vm1").exists());
    let (_, list) = r.api("GET", "/api/v1/vms", None);
    assert_eq!(list, json!([]));
}

#[test]
fn a_bad_definition_is_refused_naming_the_field() {
    let r = rig(None);
    let kernel = r.kernel("k", &spinning(b""));
    let mut def = r.definition("bad", &kernel, json!({}));
    def["vcpus"] = json!(0);
    let (code, body) = r.api("POST", "/api/v1/vms", Some(&def));
    assert_eq!(code, 400, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("vcpus"), "{msg}");

    let mut def = r.definition("bad", &kernel, json!({}));
    def["disks"] = json!([{"id": "a b", "source": {"file": "x.img"}}]);
    let (code, body) = r.api("POST", "/api/v1/vms", Some(&def));
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("disks[0].id"),
        "{body}"
    );

    let mut def = r.definition("bad", &kernel, json!({}));
    def["cpus"] = json!(2);
    let (code, body) = r.api("POST", "/api/v1/vms", Some(&def));
    assert_eq!(code, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cpus"), "{body}");

    let (code, _) = r.api("POST", "/api/v1/vms", Some(&json!("not an object")));
    assert_eq!(code, 400);
    // Nothing was created; unknown VMs are 404s.
    assert_eq!(r.api("GET", "/api/v1/vms", None).1, json!([]));
    assert_eq!(r.api("POST", "/api/v1/vms/bad/start", None).0, 404);
    assert_eq!(r.api("GET", "/api/v1/vms/bad/console", None).0, 404);
    // The CLI shows the daemon's reason.
    let out =
        r.d.cli(&["vm", "create", "tiny", "--memory", "1", "--kernel", "k.elf"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("memory_mib"), "{}", out.stderr);
}

#[test]
fn a_killed_vmm_is_recorded_as_a_crash_and_restarted() {
    let r = rig(None);
    let kernel = r.kernel("spin", &spinning(b"up\n"));
    for (name, restart) in [("once", false), ("again", true)] {
        let def = r.definition(
            name,
            &kernel,
            json!({"on_crash": {"restart": restart, "max_restarts": 3, "backoff_ms": 10,
                                "stable_after_secs": 60}}),
        );
        assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
        assert_eq!(
            r.api("POST", &format!("/api/v1/vms/{name}/start"), None).0,
            200
        );
    }
    for name in ["once", "again"] {
        let v = r.wait(name, "a boot", |_| r.console(name) == "up\n");
        let pid = v["status"]["pid"].as_u64().unwrap();
        // Not through the daemon: the VMM dies as if the OOM killer took it.
        assert!(std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        if name == "once" {
            let v = r.wait(name, "the crash", |v| state(v) == "crashed");
            let exit = &v["status"]["last_exit"];
            assert_eq!(exit["signal"], 9, "{v:#}");
            assert_eq!(exit["requested"], false, "{v:#}");
            assert_eq!(exit["reason"], "killed by SIGKILL", "{v:#}");
            assert!(v["status"]["pid"].is_null());
            let list = r.d.cli(&["vm", "list"]).ok().stdout;
            assert!(
                list.contains("crashed") && list.contains("killed by SIGKILL"),
                "{list}"
            );
        } else {
            let v = r.wait(name, "a restart", |v| {
                state(v) == "running"
                    && v["status"]["restarts"] == 1
                    && v["status"]["pid"].as_u64().is_some_and(|p| p != pid)
            });
            assert_eq!(
                v["status"]["last_exit"]["reason"], "killed by SIGKILL",
                "{v:#}"
            );
            r.wait(name, "the second boot", |_| r.console(name) == "up\nup\n");
            let (_, scrape) = r.d.curl("/metrics", None, &[]);
            assert!(
                scrape.contains("basalt_vm_restarts_total{vm=\"again\"} 1"),
                "{scrape}"
            );
            r.d.cli(&["vm", "kill", name]).ok();
        }
    }
}

/// A rig with two 256 MiB file disks (d0, d1, in `disks`) and a RAID 1 pool `p0` on them.
fn rig_with_pool(disks: &tempfile::TempDir) -> Rig {
    let mut doc = String::from(EPHEMERAL);
    for i in 0..2 {
        doc += &format!(
            "\n[[disk]]\nname = \"d{i}\"\npath = \"{}\"\nkind = \"file\"\nsize = \"256M\"\n",
            disks.path().join(format!("d{i}.img")).display()
        );
    }
    let r = rig(Some(doc));
    r.d.cli(&["pool", "create", "p0", "--raid", "1", "d0", "d1"])
        .ok();
    r
}

/// The switch port (TAP) of a VM's NIC: the daemon names it after a hash of VM and NIC
/// (FNV-1a of "VM/NIC"), which the tests cannot call (the daemon is a binary crate).
fn tap_name(vm: &str, nic: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{vm}/{nic}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("bvm-{h:08x}")
}

#[test]
fn a_vm_disk_can_be_a_daemon_lun() {
    let dir_disks = tempdir();
    let r = rig_with_pool(&dir_disks);
    r.d.cli(&["lun", "create", "root1", "--pool", "p0", "--size", "16M"])
        .ok();
    let kernel = r.kernel("ids", &DEVICE_IDS);

    // A LUN that does not exist: the start is refused with the reason.
    let def = r.definition(
        "nolun",
        &kernel,
        json!({"disks": [{"id": "root", "source": {"lun": "p0/missing"}}]}),
    );
    assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    let (code, body) = r.api("POST", "/api/v1/vms/nolun/start", None);
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("missing"),
        "{body}"
    );

    let def = r.definition(
        "onlun",
        &kernel,
        json!({"disks": [{"id": "root", "source": {"lun": "p0/root1"}}]}),
    );
    assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    assert_eq!(r.api("POST", "/api/v1/vms/onlun/start", None).0, 200);
    // The VMM reached the LUN over NBD (else it fails setup with exit code 1), and the
    // guest sees virtio-blk (2) then the balloon (5), and no third device (an empty
    // slot reads all ones: '0' + 0xff is '/').
    let v = r.wait("onlun", "the power-off", |v| state(v) == "stopped");
    assert_eq!(
        v["status"]["last_exit"]["code"],
        0,
        "{v:#}\n{}",
        r.vmm_log("onlun")
    );
    assert_eq!(r.console("onlun"), "25/");

    // The export is the LUN, on the daemon's VM socket only: not in the admin's NBD
    // configuration.
    let socket = r.d.data_dir.join("vm-nbd.sock");
    let out = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///root1?socket={}", socket.display()))
        .output()
        .expect("nbdinfo (libnbd-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (16u64 << 20).to_string()
    );
    let config = r.d.cli(&["config", "export"]).ok().stdout;
    assert!(
        !config.contains("root1\"]") && !config.contains("[nbd"),
        "{config}"
    );
    // A LUN a VM names is neither deleted nor renamed under it.
    for args in [
        &["lun", "delete", "root1"][..],
        &["lun", "rename", "root1", "root2"][..],
    ] {
        let out = r.d.cli(args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stdout);
        assert!(
            out.stderr.contains("in use by VM \"onlun\""),
            "{}",
            out.stderr
        );
    }

    // `pool check` exports and re-imports the pool: the LUN's old handle is dead, and
    // the VM NBD server serves the new one (else reading the export fails).
    r.d.cli(&["pool", "check", "p0"]).ok();
    let copy = r.root.join("root1.copy");
    let out = std::process::Command::new("nbdcopy")
        .arg(format!("nbd+unix:///root1?socket={}", socket.display()))
        .arg(&copy)
        .output()
        .expect("nbdcopy (libnbd-bin)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.d.log_text()
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 16 << 20);
}

#[test]
fn a_vm_nic_is_a_tap_on_its_port_group() {
    let r = rig(None);
    r.d.cli(&["switch", "create", "vsvm"]).ok();
    r.d.cli(&["switch", "portgroup", "add", "vsvm", "vm-net"])
        .ok();
    let ids = r.kernel("ids", &DEVICE_IDS);
    let spin = r.kernel("spin", &spinning(b"net\n"));
    let nic = json!({"nics": [{"id": "eth0", "port_group": "vm-net", "mac": "02:ba:00:00:00:07"}]});

    // A port group no switch has: the start is refused with the reason.
    let mut def = r.definition("nopg", &spin, json!({}));
    def["nics"] = json!([{"id": "eth0", "port_group": "elsewhere"}]);
    assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    let (code, body) = r.api("POST", "/api/v1/vms/nopg/start", None);
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no switch has a port group \"elsewhere\""),
        "{body}"
    );

    // The guest sees virtio-net (1), then the balloon (5).
    assert_eq!(
        r.api(
            "POST",
            "/api/v1/vms",
            Some(&r.definition("ids", &ids, nic.clone()))
        )
        .0,
        201
    );
    assert_eq!(r.api("POST", "/api/v1/vms/ids/start", None).0, 200);
    let v = r.wait("ids", "the power-off", |v| state(v) == "stopped");
    assert_eq!(
        v["status"]["last_exit"]["code"],
        0,
        "{v:#}\n{}",
        r.vmm_log("ids")
    );
    assert_eq!(r.console("ids"), "15/");

    // While a VM runs, its TAP is a port of the switch in the port group, with the
    // NIC's MAC, and the VMM holds the TAP.
    let mut nic2 = nic.clone();
    nic2["nics"][0]["mac"] = json!("02:ba:00:00:00:08");
    assert_eq!(
        r.api(
            "POST",
            "/api/v1/vms",
            Some(&r.definition("spin", &spin, nic2))
        )
        .0,
        201
    );
    let (code, body) = r.api("POST", "/api/v1/vms/spin/start", None);
    assert_eq!(code, 200, "{body}");
    let v = r.wait("spin", "a boot", |_| r.console("spin") == "net\n");
    let pid = v["status"]["pid"].as_u64().unwrap();
    let list: Value =
        serde_json::from_str(&r.d.cli(&["--json", "switch", "list"]).ok().stdout).unwrap();
    let ports = list[0]["status"]["ports"].as_array().unwrap().clone();
    let tap = tap_name("spin", "eth0");
    let port = ports
        .iter()
        .find(|p| p["name"] == tap.as_str())
        .unwrap_or_else(|| panic!("no port {tap}: {ports:#?}"));
    assert_eq!(port["portgroup"], "vm-net", "{port}");
    assert_eq!(port["device"], tap.as_str(), "{port}");
    assert_eq!(port["link_up"], true, "{port}");
    let mac = std::fs::read_to_string(format!("/sys/class/net/{tap}/address")).unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap();
    let holds_tun = fds.flatten().any(|f| {
        std::fs::read_to_string(f.path())
            .map(|t| t.contains(&format!("iff:\t{tap}")))
            .unwrap_or(false)
    });
    assert!(holds_tun, "VMM {pid} does not hold TAP {tap}");
    // The host side of the TAP has its own address; the guest's (the NIC's) is the
    // port's, which the switch forwards to.
    assert_ne!(mac.trim(), "02:ba:00:00:00:08");
    assert!(port.to_string().contains("02:ba:00:00:00:08"), "{port}");
    r.d.cli(&["vm", "kill", "spin"]).ok();
    // The port leaves the switch, and the TAP goes away with the VMM.
    let list: Value =
        serde_json::from_str(&r.d.cli(&["--json", "switch", "list"]).ok().stdout).unwrap();
    let ports = &list[0]["status"]["ports"];
    assert!(
        !ports.to_string().contains(&tap),
        "port {tap} outlived its VM: {ports:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/sys/class/net/{tap}")).exists() {
        assert!(Instant::now() < deadline, "TAP {tap} outlived its VMM");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A restart gets a fresh TAP in the same port.
    r.d.cli(&["vm", "start", "spin"]).ok();
    r.wait("spin", "a second boot", |_| {
        r.console("spin") == "net\nnet\n"
    });
    assert!(Path::new(&format!("/sys/class/net/{tap}")).exists());
    r.d.cli(&["vm", "kill", "spin"]).ok();
}

#[test]
fn running_vms_outlive_a_daemon_restart() {
    let mut r = rig(None);
    let kernel = r.kernel("spin", &spinning(b"still here\n"));
    assert_eq!(
        r.api(
            "POST",
            "/api/v1/vms",
            Some(&r.definition("keep", &kernel, json!({})))
        )
        .0,
        201
    );
    assert_eq!(r.api("POST", "/api/v1/vms/keep/start", None).0, 200);
    let v = r.wait("keep", "a boot", |_| r.console("keep") == "still here\n");
    let pid = v["status"]["pid"].as_u64().unwrap();
    assert_eq!(r.d.stop(), 0);
    assert!(alive(pid), "the VMM died with the daemon");
    r.d = Daemon::start(&r.d.data_dir.clone(), Some(EPHEMERAL));
    let v = r.vm("keep");
    assert_eq!(state(&v), "running", "{v:#}");
    assert_eq!(v["status"]["pid"], pid, "{v:#}");
    let out = r.d.cli(&["--json", "vm", "stop", "keep"]).ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(state(&v), "stopped", "{v:#}");
    assert_eq!(
        v["status"]["last_exit"]["reason"], "stopped on request",
        "{v:#}"
    );
    assert!(!alive(pid), "VMM {pid} still runs");
}

/// A VM's LUN disk across a daemon restart: the VMM outlives `basalt serve`, its
/// `NbdDev` reconnects to the VM NBD server the restarted daemon serves again on the same
/// socket, and the guest's disk I/O (DISK_LOOP) carries on without an error.
#[test]
fn a_vm_lun_disk_keeps_working_across_a_daemon_restart() {
    let disks = tempdir();
    let mut r = rig_with_pool(&disks);
    let data = r.d.data_dir.clone();
    r.d.cli(&["lun", "create", "root1", "--pool", "p0", "--size", "16M"])
        .ok();
    let kernel = r.kernel("disk-loop", &DISK_LOOP);
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
    let during = r.console_file("busy");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        r.console_file("busy"),
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

/// A LUN a running VM uses stays its own: its pool is not exported under it, and a
/// second VM does not start on it (two writers of one LUN corrupt it) unless both disks
/// are read-only. Once the first VM stops, the second starts.
#[test]
fn a_lun_is_not_taken_from_a_running_vm() {
    let disks = tempdir();
    let r = rig_with_pool(&disks);
    for lun in ["x", "y"] {
        r.d.cli(&["lun", "create", lun, "--pool", "p0", "--size", "16M"])
            .ok();
    }
    let spin = r.kernel("spin", &spinning(b"up\n"));
    let on = |name: &str, lun: &str, ro: bool| {
        let def = r.definition(
            name,
            &spin,
            json!({"disks": [{"id": "root", "source": {"lun": lun}, "read_only": ro}]}),
        );
        assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    };
    on("a", "p0/x", false);
    on("b", "p0/x", false);
    assert_eq!(r.api("POST", "/api/v1/vms/a/start", None).0, 200);
    r.wait("a", "a boot", |_| r.console("a") == "up\n");

    // The pool of a running VM's LUN is not exported under it.
    let out = r.d.cli(&["pool", "export", "p0"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("VM \"a\""), "{}", out.stderr);
    assert!(r
        .d
        .cli(&["--json", "pool", "list"])
        .ok()
        .stdout
        .contains("p0"));

    // A second writer is refused, naming the first.
    let (code, body) = r.api("POST", "/api/v1/vms/b/start", None);
    assert_eq!(code, 409, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("in use by VM \"a\""), "{body}");
    assert_eq!(state(&r.vm("a")), "running");

    // Read-only disks on both sides share a LUN.
    on("c", "p0/y", true);
    on("d", "p0/y", true);
    for vm in ["c", "d"] {
        let (code, body) = r.api("POST", &format!("/api/v1/vms/{vm}/start"), None);
        assert_eq!(code, 200, "{body}");
    }

    // Once the first stops, the second starts.
    r.d.cli(&["vm", "stop", "a"]).ok();
    let (code, body) = r.api("POST", "/api/v1/vms/b/start", None);
    assert_eq!(code, 200, "{body}");
    r.wait("b", "a boot", |_| r.console("b") == "up\n");
    for vm in ["b", "c", "d"] {
        r.d.cli(&["vm", "kill", vm]).ok();
    }
}

/// A running VM's NIC across a daemon restart: the switches come back from their
/// declared definitions, and the re-adopted VM's port is put back on its TAP (which the
/// VMM still holds), with the NIC's MAC.
#[test]
fn a_vm_nic_port_is_back_after_a_daemon_restart() {
    let mut r = rig(None);
    r.d.cli(&["switch", "create", "vsvm"]).ok();
    r.d.cli(&["switch", "portgroup", "add", "vsvm", "vm-net"])
        .ok();
    let spin = r.kernel("spin", &spinning(b"net\n"));
    let def = r.definition(
        "spin",
        &spin,
        json!({"nics": [{"id": "eth0", "port_group": "vm-net", "mac": "02:ba:00:00:00:09"}]}),
    );
    assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    assert_eq!(r.api("POST", "/api/v1/vms/spin/start", None).0, 200);
    let v = r.wait("spin", "a boot", |_| r.console("spin") == "net\n");
    let pid = v["status"]["pid"].as_u64().unwrap();
    let tap = tap_name("spin", "eth0");
    let port = |r: &Rig| -> Option<Value> {
        let list: Value =
            serde_json::from_str(&r.d.cli(&["--json", "switch", "list"]).ok().stdout).unwrap();
        list[0]["status"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == tap.as_str())
            .cloned()
    };
    assert!(port(&r).is_some());

    let data = r.d.data_dir.clone();
    assert_eq!(r.d.stop(), 0);
    assert!(alive(pid), "the VMM died with the daemon");
    r.d = Daemon::start(&data, None);
    let v = r.vm("spin");
    assert_eq!(state(&v), "running", "{v:#}");
    assert_eq!(v["status"]["pid"], pid, "{v:#}");
    let p =
        port(&r).unwrap_or_else(|| panic!("no port {tap} after the restart\n{}", r.d.log_text()));
    assert_eq!(p["portgroup"], "vm-net", "{p}");
    assert_eq!(p["device"], tap.as_str(), "{p}");
    assert!(p.to_string().contains("02:ba:00:00:00:09"), "{p}");

    // It goes as before when the VM ends.
    r.d.cli(&["vm", "kill", "spin"]).ok();
    assert!(port(&r).is_none(), "port {tap} outlived its VM");
}

/// A VM whose files cannot be read never locks the admin out: one with an unreadable
/// `vm.json` (not UTF-8: an I/O error, not a parse error) is still shown, stopped and
/// deleted; one with a torn `status.json` is shown with the reason, and deleted.
#[test]
fn a_vm_with_unreadable_files_can_still_be_stopped_and_deleted() {
    let r = rig(None);
    let spin = r.kernel("spin", &spinning(b"up\n"));
    for name in ["broken", "torn"] {
        let def = r.definition(name, &spin, json!({}));
        assert_eq!(r.api("POST", "/api/v1/vms", Some(&def)).0, 201);
    }
    assert_eq!(r.api("POST", "/api/v1/vms/broken/start", None).0, 200);
    // The VMM has read its definition once the guest runs.
    r.wait("broken", "a boot", |_| r.console("broken") == "up\n");
    let vms = r.d.data_dir.join("vms");
    std::fs::write(vms.join("broken/vm.json"), [0xff, 0xfe]).unwrap();
    let v = r.vm("broken");
    assert!(v["error"].as_str().is_some(), "{v:#}");
    assert_eq!(state(&v), "running", "{v:#}");
    let (code, v) = r.api("POST", "/api/v1/vms/broken/stop", None);
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(state(&v), "stopped", "{v:#}");
    let (code, v) = r.api("DELETE", "/api/v1/vms/broken", None);
    assert!((200..300).contains(&code), "{code} {v:#}");
    assert!(!vms.join("broken").exists());

    std::fs::write(vms.join("torn/status.json"), "{\"state\":").unwrap();
    let v = r.vm("torn");
    assert!(
        v["status_error"].as_str().unwrap().contains("status.json"),
        "{v:#}"
    );
    let (code, v) = r.api("DELETE", "/api/v1/vms/torn", None);
    assert!((200..300).contains(&code), "{code} {v:#}");
    assert!(!vms.join("torn").exists());
}

//! VM definitions: the document that describes one VM.
//!
//! A definition is a JSON file (`vm.json`) in the VM's folder, beside its disks and its
//! kernel, so a host that can read the folder can run the VM (ESXi's `.vmx` in the VM's
//! datastore folder). It says what the VM is (vCPUs, memory, how it boots, its disks and
//! NICs, memory and CPU settings, what to do when it crashes), never how this host
//! reaches its storage: disks name a LUN or a file, NICs a port group, and the daemon
//! turns those into an NBD socket and a TAP at start (see [`crate::launch`]).
//!
//! [`VmDefinition::validate`] checks every field and names the first bad one in its
//! error (`disks[1].id: ...`), so the API and the CLI can show it as is.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The most vCPUs a VM may have (the built-in runner's MADT and APIC ids are 8-bit).
pub const MAX_VCPUS: u8 = 64;
/// The least memory a VM may have, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// The most memory a VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// The most disks a VM may have (one virtio-mmio slot each, see the layout).
pub const MAX_DISKS: usize = 16;
/// The most NICs a VM may have.
pub const MAX_NICS: usize = 8;
/// The longest kernel command line the built-in runner accepts, in bytes.
pub const MAX_CMDLINE: usize = 2047;

/// A VM definition. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    /// Name: 1 to 63 characters of `[a-zA-Z0-9._-]`, not starting with `.` or `-`; also
    /// the name of the VM's folder.
    pub name: String,
    /// Number of virtual CPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB, [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
    pub memory_mib: u32,
    /// Which runner starts the VM.
    #[serde(default)]
    pub runner: RunnerKind,
    /// How the VM boots.
    pub boot: Boot,
    /// Disks, in the order the guest sees them (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Network interfaces, in the order the guest sees them.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Memory settings.
    #[serde(default)]
    pub memory: MemorySettings,
    /// CPU settings.
    #[serde(default)]
    pub cpu: CpuSettings,
    /// What the supervisor does when the VMM process dies unasked.
    #[serde(default)]
    pub on_crash: CrashPolicy,
}

/// Which runner starts a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// The built-in runner where `/dev/kvm` works and the VM needs no firmware, QEMU
    /// otherwise.
    #[default]
    Auto,
    /// The built-in rust-vmm runner (KVM, direct kernel boot).
    Builtin,
    /// QEMU (`qemu-system-x86_64`), with KVM when it is usable and TCG otherwise.
    Qemu,
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot: the VMM loads the kernel and initrd into guest memory.
    Kernel {
        /// bzImage or vmlinux ELF; relative paths are relative to the VM's folder.
        kernel: PathBuf,
        /// Initial ramdisk (optional); relative to the VM's folder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<PathBuf>,
        /// Kernel command line. The runner adds what its devices need (the console).
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware boot from the first disk (QEMU runner only: SeaBIOS).
    Disk,
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Identifier within the VM (`[a-zA-Z0-9_-]`, 1 to 32 characters); also the disk's
    /// serial number as the guest sees it.
    pub id: String,
    /// Where the blocks live.
    pub source: DiskSource,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a disk's blocks live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum DiskSource {
    /// A Basalt LUN, `POOL/LUN`. The daemon exports it to the VMM over NBD on a unix
    /// socket.
    Lun(String),
    /// A file or block device; relative to the VM's folder.
    File(PathBuf),
    /// An NBD export elsewhere, as a URI (`nbd://host:port/export`,
    /// `nbd+unix:///export?socket=/path`).
    Nbd(String),
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Identifier within the VM (`[a-zA-Z0-9_-]`, 1 to 32 characters).
    pub id: String,
    /// The vSwitch port group the NIC is attached to.
    pub port_group: String,
    /// MAC address `xx:xx:xx:xx:xx:xx`, unicast. Derived from the VM and NIC names when
    /// absent (locally administered, stable across restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Memory settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySettings {
    /// Give the VM a virtio-balloon device (with statistics), through which the host
    /// reclaims memory.
    pub balloon: bool,
    /// Mark guest memory `MADV_MERGEABLE` so KSM may share identical pages.
    pub mergeable: bool,
}

impl Default for MemorySettings {
    fn default() -> Self {
        MemorySettings {
            balloon: true,
            mergeable: true,
        }
    }
}

/// CPU settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuSettings {
    /// CPU features to hide from the guest (built-in runner: cleared from CPUID; QEMU:
    /// `-cpu host,-feature` or `max,-feature`).
    pub hide_features: Vec<CpuFeature>,
}

/// A CPU feature that can be hidden from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuFeature {
    /// CMPXCHG16B (CPUID.1:ECX.13).
    Cx16,
    /// XSAVE and OSXSAVE (CPUID.1:ECX.26-27), and with them AVX and everything in leaf 0xd.
    Xsave,
    /// AVX (CPUID.1:ECX.28) and AVX2/AVX-512 (leaf 7).
    Avx,
    /// RDRAND (CPUID.1:ECX.30) and RDSEED (leaf 7).
    Rdrand,
    /// The TSC deadline timer (CPUID.1:ECX.24).
    TscDeadline,
    /// x2APIC (CPUID.1:ECX.21).
    X2apic,
    /// Process-context identifiers (CPUID.1:ECX.17).
    Pcid,
}

/// What the supervisor does when the VMM process dies without being asked to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashPolicy {
    /// Restart the VM.
    pub restart: bool,
    /// At most this many restarts in a row (a run that lasts `stable_after_secs`
    /// resets the count).
    pub max_restarts: u32,
    /// The first restart waits this long; each further one twice as long (at most 60 s).
    pub backoff_ms: u64,
    /// A run this long counts as healthy and resets the restart count.
    pub stable_after_secs: u64,
}

impl Default for CrashPolicy {
    fn default() -> Self {
        CrashPolicy {
            restart: false,
            max_restarts: 3,
            backoff_ms: 1000,
            stable_after_secs: 60,
        }
    }
}

/// Why a definition is invalid: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct DefinitionError {
    /// The path of the field (`disks[1].id`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> DefinitionError {
    DefinitionError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Checks a VM name (also used for folder names).
pub fn validate_name(name: &str) -> Result<(), DefinitionError> {
    if name.is_empty() || name.len() > 63 {
        return Err(bad(
            "name",
            format!("must be 1 to 63 characters, got {}", name.len()),
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad(
            "name",
            format!("{name:?} may not start with '.' or '-'"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(
            "name",
            format!("{name:?} has {c:?}; use letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

fn validate_id(field: &str, id: &str) -> Result<(), DefinitionError> {
    if id.is_empty() || id.len() > 32 {
        return Err(bad(
            field,
            format!("must be 1 to 32 characters, got {}", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(bad(
            field,
            format!("{id:?} has {c:?}; use letters, digits, '_' and '-'"),
        ));
    }
    Ok(())
}

/// Parses a MAC address `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn check_path(field: &str, p: &Path) -> Result<(), DefinitionError> {
    if p.as_os_str().is_empty() {
        return Err(bad(field, "is empty"));
    }
    Ok(())
}

impl VmDefinition {
    /// Parses a definition from JSON and validates it.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        let def: VmDefinition =
            serde_json::from_str(text).map_err(|e| bad("vm.json", e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// The definition as pretty JSON.
    pub fn to_json(&self) -> String {
        // A VmDefinition has only strings, numbers, paths from strings and enums, so
        // serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        validate_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(bad(
                "vcpus",
                format!("must be 1 to {MAX_VCPUS}, got {}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(bad(
                "memory_mib",
                format!(
                    "must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, got {}",
                    self.memory_mib
                ),
            ));
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                check_path("boot.kernel", kernel)?;
                if let Some(initrd) = initrd {
                    check_path("boot.initrd", initrd)?;
                }
                if cmdline.len() > MAX_CMDLINE {
                    return Err(bad(
                        "boot.cmdline",
                        format!("is {} bytes; at most {MAX_CMDLINE}", cmdline.len()),
                    ));
                }
                if cmdline.contains('\0') || cmdline.contains('\n') {
                    return Err(bad("boot.cmdline", "may not contain NUL or newline"));
                }
            }
            Boot::Disk => {
                if self.disks.is_empty() {
                    return Err(bad("boot", "boots from a disk but the VM has no disks"));
                }
                if self.runner == RunnerKind::Builtin {
                    return Err(bad(
                        "boot",
                        "the built-in runner boots kernels only; use runner \"qemu\" or \"auto\" for disk boot",
                    ));
                }
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(bad(
                "disks",
                format!("at most {MAX_DISKS} disks, got {}", self.disks.len()),
            ));
        }
        let mut ids = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            validate_id(&format!("{field}.id"), &d.id)?;
            if !ids.insert(d.id.as_str()) {
                return Err(bad(
                    format!("{field}.id"),
                    format!("{:?} is used twice", d.id),
                ));
            }
            match &d.source {
                DiskSource::Lun(lun) => {
                    let ok = lun
                        .split_once('/')
                        .is_some_and(|(p, l)| !p.is_empty() && !l.is_empty() && !l.contains('/'));
                    if !ok {
                        return Err(bad(
                            format!("{field}.source.lun"),
                            format!("{lun:?} must be POOL/LUN"),
                        ));
                    }
                }
                DiskSource::File(p) => check_path(&format!("{field}.source.file"), p)?,
                DiskSource::Nbd(uri) => {
                    crate::nbd::NbdAddress::parse(uri)
                        .map_err(|e| bad(format!("{field}.source.nbd"), e.to_string()))?;
                }
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(bad(
                "nics",
                format!("at most {MAX_NICS} NICs, got {}", self.nics.len()),
            ));
        }
        let mut ids = HashSet::new();
        let mut macs = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            let field = format!("nics[{i}]");
            validate_id(&format!("{field}.id"), &n.id)?;
            if !ids.insert(n.id.as_str()) {
                return Err(bad(
                    format!("{field}.id"),
                    format!("{:?} is used twice", n.id),
                ));
            }
            if n.port_group.is_empty() {
                return Err(bad(format!("{field}.port_group"), "is empty"));
            }
            if let Some(mac) = &n.mac {
                let Some(bytes) = parse_mac(mac) else {
                    return Err(bad(
                        format!("{field}.mac"),
                        format!("{mac:?} is not xx:xx:xx:xx:xx:xx"),
                    ));
                };
                if bytes[0] & 1 != 0 {
                    return Err(bad(
                        format!("{field}.mac"),
                        format!("{mac} is a multicast address"),
                    ));
                }
                if !macs.insert(bytes) {
                    return Err(bad(format!("{field}.mac"), format!("{mac} is used twice")));
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, f) in self.cpu.hide_features.iter().enumerate() {
            if !seen.insert(f) {
                return Err(bad(
                    format!("cpu.hide_features[{i}]"),
                    format!("{f:?} is listed twice"),
                ));
            }
        }
        if self.on_crash.restart && self.on_crash.max_restarts == 0 {
            return Err(bad(
                "on_crash.max_restarts",
                "must be at least 1 when restart is on",
            ));
        }
        Ok(())
    }

    /// The MAC address of NIC `index`: its own, or one derived from the VM and NIC
    /// names (locally administered unicast, `52:54:00` is QEMU's; we use `02:ba:...`).
    pub fn nic_mac(&self, index: usize) -> Option<[u8; 6]> {
        let nic = self.nics.get(index)?;
        if let Some(mac) = nic.mac.as_deref().and_then(parse_mac) {
            return Some(mac);
        }
        // FNV-1a over "vm/nic": stable across restarts and hosts.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.name.bytes().chain([b'/']).chain(nic.id.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Some([0x02, 0xba, b[0], b[1], b[2], b[3]])
    }

    /// `path` resolved against the VM folder `dir` when relative.
    pub fn resolve(dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmDefinition {
        VmDefinition::from_json(
            r#"{
              "name": "web-1",
              "vcpus": 2,
              "memory_mib": 256,
              "boot": {"kind": "kernel", "kernel": "vmlinuz", "initrd": "initrd.gz",
                       "cmdline": "console=ttyS0"},
              "disks": [{"id": "root", "source": {"lun": "pool0/web-1-root"}},
                        {"id": "data", "source": {"file": "data.img"}, "read_only": true}],
              "nics": [{"id": "eth0", "port_group": "vm-net"}]
            }"#,
        )
        .expect("valid")
    }

    #[test]
    fn parses_with_defaults_and_round_trips() {
        let def = sample();
        assert_eq!(def.runner, RunnerKind::Auto);
        assert!(def.memory.balloon && def.memory.mergeable);
        assert!(!def.on_crash.restart);
        assert_eq!(VmDefinition::from_json(&def.to_json()).expect("again"), def);
    }

    #[test]
    fn errors_name_the_field() {
        type Change = Box<dyn Fn(&mut VmDefinition)>;
        let cases: Vec<(&str, Change)> = vec![
            ("name", Box::new(|d| d.name = "bad name".into())),
            ("name", Box::new(|d| d.name = ".hidden".into())),
            ("vcpus", Box::new(|d| d.vcpus = 0)),
            ("memory_mib", Box::new(|d| d.memory_mib = 1)),
            ("disks[1].id", Box::new(|d| d.disks[1].id = "root".into())),
            (
                "disks[0].source.lun",
                Box::new(|d| d.disks[0].source = DiskSource::Lun("nopool".into())),
            ),
            (
                "disks[0].source.nbd",
                Box::new(|d| d.disks[0].source = DiskSource::Nbd("http://x".into())),
            ),
            (
                "nics[0].mac",
                Box::new(|d| d.nics[0].mac = Some("01:00:00:00:00:00".into())),
            ),
            (
                "nics[0].mac",
                Box::new(|d| d.nics[0].mac = Some("zz".into())),
            ),
            (
                "nics[0].port_group",
                Box::new(|d| d.nics[0].port_group.clear()),
            ),
            (
                "boot",
                Box::new(|d| {
                    d.boot = Boot::Disk;
                    d.runner = RunnerKind::Builtin;
                }),
            ),
            (
                "cpu.hide_features[1]",
                Box::new(|d| d.cpu.hide_features = vec![CpuFeature::Cx16, CpuFeature::Cx16]),
            ),
        ];
        for (field, change) in cases {
            let mut def = sample();
            change(&mut def);
            let err = def.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = VmDefinition::from_json(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"boot":{"kind":"disk"},"cpus":4}"#,
        )
        .expect_err("unknown field");
        assert!(err.problem.contains("cpus"), "{err}");
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_distinct() {
        let mut def = sample();
        def.nics.push(Nic {
            id: "eth1".into(),
            port_group: "vm-net".into(),
            mac: None,
        });
        let a = def.nic_mac(0).expect("mac");
        let b = def.nic_mac(1).expect("mac");
        assert_eq!(a, sample().nic_mac(0).expect("mac"));
        assert_ne!(a, b);
        assert_eq!(a[0] & 3, 2, "locally administered unicast");
        assert_eq!(
            parse_mac("02:ba:00:11:22:ff"),
            Some([2, 0xba, 0, 0x11, 0x22, 0xff])
        );
        assert_eq!(parse_mac("02:ba:00:11:22"), None);
    }
}

//! The subsystem sections of the desired state, parsed into typed specs.
//!
//! The `config` crate keeps these sections as TOML tables with their lines; here they
//! become pool and LUN specs, switch definitions and target configurations. Every
//! refusal names the section's line. Cross-references are checked here too (a pool's
//! disks are declared disks and belong to no other pool; a LUN's pool exists; exports
//! name LUNs), so that a document that passes can be applied.

use basalt_config::{ByteSize, ConfigError, DesiredState, Section, Sections};
use basalt_iscsi::IscsiConfig;
use basalt_nbd::NbdConfig;
use basalt_net::SwitchDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// RAID level of a pool, as written in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaidLevel {
    /// Striping, no redundancy.
    Raid0,
    /// Mirroring.
    Raid1,
    /// Striped mirrors.
    Raid10,
    /// Single parity.
    Raid5,
    /// Double parity.
    Raid6,
}

impl RaidLevel {
    /// The raid crate's level.
    pub fn level(self) -> basalt_raid::Level {
        match self {
            RaidLevel::Raid0 => basalt_raid::Level::Raid0,
            RaidLevel::Raid1 => basalt_raid::Level::Raid1,
            RaidLevel::Raid10 => basalt_raid::Level::Raid10,
            RaidLevel::Raid5 => basalt_raid::Level::Raid5,
            RaidLevel::Raid6 => basalt_raid::Level::Raid6,
        }
    }

    /// The fewest disks the level needs.
    pub fn min_disks(self) -> usize {
        match self {
            RaidLevel::Raid0 => 1,
            RaidLevel::Raid1 => 2,
            RaidLevel::Raid10 => 4,
            RaidLevel::Raid5 => 3,
            RaidLevel::Raid6 => 4,
        }
    }

    /// From the CLI's number (0, 1, 10, 5, 6).
    pub fn from_number(n: u32) -> Option<RaidLevel> {
        Some(match n {
            0 => RaidLevel::Raid0,
            1 => RaidLevel::Raid1,
            10 => RaidLevel::Raid10,
            5 => RaidLevel::Raid5,
            6 => RaidLevel::Raid6,
            _ => return None,
        })
    }
}

/// `[[pool]]`: a RAID array of disks with a thin pool on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Pool name (also the array's name on its disks).
    pub name: String,
    /// RAID level.
    pub raid: RaidLevel,
    /// Chunk (stripe unit) size; 64K when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<ByteSize>,
    /// Member disks, by name.
    pub disks: Vec<String>,
    /// Hot spares, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spares: Vec<String>,
    /// Journal stripe updates to close the write hole (default on for redundant levels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<bool>,
    /// Rebuild and scrub rate limit per second, e.g. "200M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ByteSize>,
    /// Data usage percent that raises a warning (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_pct: Option<u8>,
    /// Data usage percent that raises a critical alert (default 90).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_pct: Option<u8>,
}

impl PoolSpec {
    /// Every disk of the pool: members and spares.
    pub fn all_disks(&self) -> impl Iterator<Item = &String> {
        self.disks.iter().chain(&self.spares)
    }
}

/// How a LUN's space is provisioned, as written in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisioningSpec {
    /// Space taken on first write.
    #[default]
    Thin,
    /// Space reserved at create; chunks taken on first write.
    Thick,
    /// Space reserved and zeroed at create.
    ThickEager,
}

impl ProvisioningSpec {
    /// The lun crate's provisioning.
    pub fn provisioning(self) -> basalt_lun::Provisioning {
        match self {
            ProvisioningSpec::Thin => basalt_lun::Provisioning::Thin,
            ProvisioningSpec::Thick => basalt_lun::Provisioning::Thick { eager_zero: false },
            ProvisioningSpec::ThickEager => basalt_lun::Provisioning::Thick { eager_zero: true },
        }
    }

    /// From the lun crate's provisioning.
    pub fn from_provisioning(p: basalt_lun::Provisioning) -> Self {
        match p {
            basalt_lun::Provisioning::Thin => ProvisioningSpec::Thin,
            basalt_lun::Provisioning::Thick { eager_zero: false } => ProvisioningSpec::Thick,
            basalt_lun::Provisioning::Thick { eager_zero: true } => ProvisioningSpec::ThickEager,
        }
    }
}

/// `[[lun]]`: a LUN in a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunSpec {
    /// LUN name, unique on the appliance (NBD export names and iSCSI unit names are
    /// LUN names).
    pub name: String,
    /// The pool it is carved from.
    pub pool: String,
    /// Virtual size.
    pub size: ByteSize,
    /// Thin (default), thick or thick-eager.
    #[serde(default)]
    pub provisioning: ProvisioningSpec,
    /// Logical block size: 4096, the pools' block size (the default), or 512 on a pool
    /// whose array has 512-byte blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
}

/// The block size of LUNs that do not say: RAID arrays present 4 KiB blocks, and a LUN's
/// blocks cannot be smaller than its pool's.
pub const DEFAULT_LUN_BLOCK_SIZE: u32 = 4096;

impl LunSpec {
    /// The block size in force.
    pub fn block_size(&self) -> u32 {
        self.block_size.unwrap_or(DEFAULT_LUN_BLOCK_SIZE)
    }
}

/// `[[lockspace]]`: a cluster lockspace (`basalt-lockmgr`) this host joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockspaceSpec {
    /// Lockspace name on this appliance.
    pub name: String,
    /// Where it lives: `POOL/LUN` of this appliance, or `iscsi://host[:port]/iqn/lun`.
    pub device: String,
    /// This host's id in the lockspace: 32 hex digits (dashes allowed); default the
    /// appliance's UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// This host's name in the lockspace (display only, at most 64 bytes); default the
    /// appliance's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    /// Heartbeat period, e.g. "3s"; must equal the lockspace header's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// Dead-host timeout, e.g. "9s" (at least three heartbeats); must equal the header's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_after: Option<String>,
    /// Heartbeat slots when formatting (default 64); must equal the header's when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hosts: Option<u32>,
    /// Lock records when formatting (default 4096); must equal the header's when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_locks: Option<u32>,
    /// iSCSI initiator name for an `iscsi://` device (default derived from the host id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    /// Format the device when it holds no lockspace and the range it would take reads
    /// all zeroes (never over existing data). Default false: `basalt lockspace format`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub format: bool,
}

/// Where a lockspace lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockDevice {
    /// A LUN of this appliance.
    Lun {
        /// Its pool.
        pool: String,
        /// The LUN.
        lun: String,
    },
    /// A LUN of another host, through the iSCSI initiator.
    Iscsi(String),
}

/// Default heartbeat period of a lockspace formatted here.
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(3);

impl LockspaceSpec {
    /// The device, parsed.
    pub fn device(&self) -> Result<LockDevice, String> {
        if self.device.starts_with("iscsi://") {
            basalt_blockdev_iscsi::IscsiUrl::parse(&self.device).map_err(|e| e.to_string())?;
            return Ok(LockDevice::Iscsi(self.device.clone()));
        }
        match self.device.split_once('/') {
            Some((pool, lun)) if !pool.is_empty() && !lun.is_empty() && !lun.contains('/') => {
                Ok(LockDevice::Lun {
                    pool: pool.to_string(),
                    lun: lun.to_string(),
                })
            }
            _ => Err(format!(
                "device {:?} is neither POOL/LUN nor iscsi://host[:port]/iqn/lun",
                self.device
            )),
        }
    }

    fn duration(what: &str, v: &Option<String>) -> Result<Option<std::time::Duration>, String> {
        let Some(text) = v else { return Ok(None) };
        let d = humantime::parse_duration(text)
            .map_err(|e| format!("{what} {text:?}: {e} (e.g. \"3s\" or \"500ms\")"))?;
        if d.is_zero() || d.as_millis() > u128::from(u32::MAX) || d.subsec_nanos() % 1_000_000 != 0
        {
            return Err(format!(
                "{what} {text:?} must be a whole number of milliseconds, above zero"
            ));
        }
        Ok(Some(d))
    }

    /// The declared heartbeat period, if any.
    pub fn heartbeat(&self) -> Result<Option<std::time::Duration>, String> {
        Self::duration("heartbeat", &self.heartbeat)
    }

    /// The declared dead-host timeout, if any.
    pub fn dead_after(&self) -> Result<Option<std::time::Duration>, String> {
        Self::duration("dead_after", &self.dead_after)
    }

    /// Timings for formatting: the declared ones, else 3 s and three heartbeats.
    pub fn format_timings(&self) -> Result<(std::time::Duration, std::time::Duration), String> {
        let hb = self.heartbeat()?.unwrap_or(DEFAULT_HEARTBEAT);
        let dead = self.dead_after()?.unwrap_or(hb * 3);
        Ok((hb, dead))
    }

    /// The declared host id, if any.
    pub fn host_id(&self) -> Result<Option<[u8; 16]>, String> {
        self.host_id.as_deref().map(parse_host_id).transpose()
    }

    /// Every problem of the section alone (not its cross-references).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = self.device() {
            p.push(e);
        }
        let hb = self.heartbeat().map_err(|e| p.push(e)).ok().flatten();
        let dead = self.dead_after().map_err(|e| p.push(e)).ok().flatten();
        if let (Some(hb), Some(dead)) = (hb, dead) {
            if dead < hb * 3 {
                p.push(format!(
                    "dead_after {} must be at least three heartbeats ({})",
                    humantime::format_duration(dead),
                    humantime::format_duration(hb * 3)
                ));
            }
        }
        if let Err(e) = self.host_id() {
            p.push(e);
        }
        if let Some(n) = &self.host_name {
            if n.is_empty() || n.len() > 64 {
                p.push(format!("host_name {n:?} must be 1 to 64 bytes"));
            }
        }
        if self.max_hosts == Some(0) {
            p.push("max_hosts must be at least 1".into());
        }
        if self.max_locks.is_some_and(|n| n == 0 || n > 1 << 20) {
            p.push("max_locks must be 1 to 1048576".into());
        }
        if self.initiator.is_some() && !self.device.starts_with("iscsi://") {
            p.push("initiator applies only to an iscsi:// device".into());
        }
        p
    }
}

/// A host id: 32 hex digits, dashes ignored (a UUID).
pub fn parse_host_id(text: &str) -> Result<[u8; 16], String> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let bad = || format!("host id {text:?} is not 32 hex digits (a UUID)");
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

/// The sections, typed.
#[derive(Debug, Clone, Default)]
pub struct Typed {
    /// Pools, by name order.
    pub pools: Vec<PoolSpec>,
    /// LUNs, by name order.
    pub luns: Vec<LunSpec>,
    /// Switch definitions, by name order.
    pub switches: Vec<SwitchDefinition>,
    /// The NBD server, when declared.
    pub nbd: Option<NbdConfig>,
    /// The iSCSI target, when declared.
    pub iscsi: Option<IscsiConfig>,
    /// Lockspaces, by name order.
    pub lockspaces: Vec<LockspaceSpec>,
}

fn parse<T: DeserializeOwned>(kind: &str, section: &Section) -> Result<T, ConfigError> {
    T::deserialize(toml::Value::Table(section.table.clone())).map_err(|e| {
        let name = section
            .name()
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default();
        ConfigError::on_line(
            section.line,
            format!("{kind}{name}: {}", e.message().trim()),
        )
    })
}

/// A typed value back into a section.
pub fn to_section<T: Serialize>(value: &T) -> Result<Section, String> {
    match toml::Value::try_from(value) {
        Ok(toml::Value::Table(table)) => Ok(Section { table, line: None }),
        Ok(_) => Err("a section must serialize to a table".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Replaces (or adds) the named section of `kind` in `sections` with `value`.
pub fn put_named<T: Serialize>(
    sections: &mut Sections,
    kind: &str,
    name: &str,
    value: &T,
) -> Result<(), String> {
    let section = to_section(value)?;
    let list = sections
        .named_mut(kind)
        .ok_or_else(|| format!("{kind} is not a named section"))?;
    match list.iter_mut().find(|s| s.name() == Some(name)) {
        Some(slot) => *slot = section,
        None => list.push(section),
    }
    list.sort_by(|a, b| a.name().cmp(&b.name()));
    Ok(())
}

impl Typed {
    /// Parses and checks every section against the document; returns every problem.
    pub fn parse(desired: &DesiredState) -> Result<Typed, Vec<ConfigError>> {
        let sections = &desired.sections;
        let mut errors = Vec::new();
        let mut typed = Typed::default();
        for s in &sections.switch {
            match parse::<SwitchDefinition>("switch", s) {
                Ok(def) => match def.validate() {
                    Ok(()) => typed.switches.push(def),
                    Err(e) => errors.push(ConfigError::on_line(
                        s.line,
                        format!("switch {:?}: {e}", def.name),
                    )),
                },
                Err(e) => errors.push(e),
            }
        }

        let disks: BTreeSet<&str> = desired.disks.iter().map(|d| d.name.as_str()).collect();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for s in &sections.pool {
            let spec = match parse::<PoolSpec>("pool", s) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let err =
                |m: String| ConfigError::on_line(s.line, format!("pool {:?}: {m}", spec.name));
            if spec.disks.len() < spec.raid.min_disks() {
                errors.push(err(format!(
                    "{} needs at least {} disks, {} given",
                    spec.raid.level().name(),
                    spec.raid.min_disks(),
                    spec.disks.len()
                )));
            }
            if let Some(chunk) = spec.chunk {
                if !(4096..=16 << 20).contains(&chunk.0) || !chunk.0.is_power_of_two() {
                    errors.push(err(format!(
                        "chunk {chunk} must be a power of two from 4K to 16M"
                    )));
                }
            }
            for (pct, what) in [
                (spec.warn_pct, "warn_pct"),
                (spec.critical_pct, "critical_pct"),
            ] {
                if pct.is_some_and(|p| p == 0 || p > 100) {
                    errors.push(err(format!("{what} must be 1 to 100")));
                }
            }
            for d in spec.all_disks() {
                if !disks.contains(d.as_str()) {
                    errors.push(err(format!("disk {d:?} is not declared")));
                } else if let Some(other) = owner.insert(d.clone(), spec.name.clone()) {
                    errors.push(err(format!("disk {d:?} is already used by pool {other:?}")));
                }
            }
            typed.pools.push(spec);
        }

        let pools: BTreeSet<&str> = typed.pools.iter().map(|p| p.name.as_str()).collect();
        for s in &sections.lun {
            match parse::<LunSpec>("lun", s) {
                Ok(spec) => {
                    let err = |m: String| {
                        ConfigError::on_line(s.line, format!("lun {:?}: {m}", spec.name))
                    };
                    if !pools.contains(spec.pool.as_str()) {
                        errors.push(err(format!("pool {:?} is not declared", spec.pool)));
                    }
                    if ![512, 4096].contains(&spec.block_size()) {
                        errors.push(err(format!(
                            "block size {} is not 512 or 4096",
                            spec.block_size()
                        )));
                    }
                    if spec.size.0 == 0 || !spec.size.0.is_multiple_of(u64::from(spec.block_size()))
                    {
                        errors.push(err(format!(
                            "size {} must be a non-zero multiple of the block size {}",
                            spec.size.0,
                            spec.block_size()
                        )));
                    }
                    typed.luns.push(spec);
                }
                Err(e) => errors.push(e),
            }
        }

        if let Some(s) = &sections.nbd {
            match parse::<NbdConfig>("nbd", s) {
                Ok(cfg) => typed.nbd = Some(cfg),
                Err(e) => errors.push(e),
            }
        }
        if let Some(s) = &sections.iscsi {
            match parse::<IscsiConfig>("iscsi", s) {
                Ok(cfg) => typed.iscsi = Some(cfg),
                Err(e) => errors.push(e),
            }
        }
        let mut devices: BTreeMap<String, String> = BTreeMap::new();
        for s in &sections.lockspace {
            let spec = match parse::<LockspaceSpec>("lockspace", s) {
                Ok(spec) => spec,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let err =
                |m: String| ConfigError::on_line(s.line, format!("lockspace {:?}: {m}", spec.name));
            for p in spec.problems() {
                errors.push(err(p));
            }
            if let Ok(LockDevice::Lun { pool, lun }) = spec.device() {
                match typed.luns.iter().find(|l| l.name == lun) {
                    None => errors.push(err(format!("LUN {lun:?} is not declared"))),
                    Some(l) if l.pool != pool => errors.push(err(format!(
                        "LUN {lun:?} is in pool {:?}, not {pool:?}",
                        l.pool
                    ))),
                    Some(_) => {}
                }
            }
            // One device, however its URL spells credentials: the label drops them.
            let key = super::lockspaces::device_label(&spec.device);
            if let Some(other) = devices.insert(key, spec.name.clone()) {
                errors.push(err(format!(
                    "device {:?} is already lockspace {other:?}",
                    spec.device
                )));
            }
            typed.lockspaces.push(spec);
        }
        if errors.is_empty() {
            Ok(typed)
        } else {
            Err(errors)
        }
    }

    /// The line of a section, for errors found later.
    pub fn line_of(sections: &Sections, kind: &str, name: Option<&str>) -> Option<usize> {
        match name {
            Some(n) => sections
                .named(kind)
                .iter()
                .find(|s| s.name() == Some(n))
                .and_then(|s| s.line),
            None => sections.single(kind).and_then(|s| s.line),
        }
    }
}

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
        for s in &sections.lockspace {
            errors.push(ConfigError::on_line(
                s.line,
                "[[lockspace]] sections are not supported by this build yet",
            ));
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

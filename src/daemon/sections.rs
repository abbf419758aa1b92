//! The subsystem sections of the desired state, parsed into each subsystem's own types.
//!
//! The `config` crate keeps these sections as TOML tables with their lines; here they
//! become switch definitions (and, as the subsystems land, pools, LUNs, targets and
//! lockspaces). Every refusal names the section's line, and a section kind this build
//! cannot run yet is refused rather than stored and ignored.

use basalt_config::{ConfigError, Section, Sections};
use basalt_net::SwitchDefinition;
use serde::de::DeserializeOwned;

/// The sections, typed.
#[derive(Debug, Clone, Default)]
pub struct Typed {
    /// Switch definitions, by name order.
    pub switches: Vec<SwitchDefinition>,
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

/// A section back into its stored form.
pub fn to_section<T: serde::Serialize>(value: &T) -> Result<Section, String> {
    match toml::Value::try_from(value) {
        Ok(toml::Value::Table(table)) => Ok(Section { table, line: None }),
        Ok(_) => Err("a section must serialize to a table".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl Typed {
    /// Parses and checks every section; returns every problem found.
    pub fn parse(sections: &Sections) -> Result<Typed, Vec<ConfigError>> {
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
        let unsupported = [
            ("pool", &sections.pool),
            ("lun", &sections.lun),
            ("lockspace", &sections.lockspace),
        ];
        for (kind, list) in unsupported {
            for s in list {
                errors.push(ConfigError::on_line(
                    s.line,
                    format!("[[{kind}]] sections are not supported by this build yet"),
                ));
            }
        }
        for (kind, s) in [("iscsi", &sections.iscsi), ("nbd", &sections.nbd)] {
            if let Some(s) = s {
                errors.push(ConfigError::on_line(
                    s.line,
                    format!("[{kind}] is not supported by this build yet"),
                ));
            }
        }
        if errors.is_empty() {
            Ok(typed)
        } else {
            Err(errors)
        }
    }
}

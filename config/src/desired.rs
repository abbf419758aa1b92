//! The desired state: everything an administrator declares about the appliance, in one
//! document that `basalt config export` prints and `basalt config apply` takes.
//!
//! The document is TOML. Parsing keeps the source position of every entry so that a
//! refusal names the line and the reason, whether the problem is syntax, an unknown key,
//! a bad value, or something only the daemon can see (a disk path that does not exist).

use crate::size::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::Spanned;

/// The version of the document format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Block sizes a disk may have.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

/// The whole desired state of one appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Appliance-wide settings.
    pub appliance: ApplianceSettings,
    /// The management API.
    pub api: ApiSettings,
    /// Disks the appliance uses, in name order.
    pub disks: Vec<DiskSpec>,
    /// Sections the subsystems parse (pools, LUNs, switches, targets, lockspaces).
    pub sections: Sections,
}

/// A section of the document that a subsystem parses into its own types: kept here as a
/// TOML table with the line it starts on, so that the daemon can name the line when the
/// subsystem refuses it. This crate checks only the section's shape (a table, with a
/// valid `name` where the section is a list).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    /// The section's keys and values.
    pub table: toml::Table,
    /// The line of the document the section starts on.
    #[serde(skip)]
    pub line: Option<usize>,
}

impl PartialEq for Section {
    /// Equality of what is declared; where it was declared does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table
    }
}
impl Eq for Section {}

impl Section {
    /// The section's `name`, for sections that are lists of named objects.
    pub fn name(&self) -> Option<&str> {
        self.table.get("name").and_then(|v| v.as_str())
    }
}

/// The subsystem sections, in the order the document lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sections {
    /// `[[pool]]`: RAID arrays with their thin pools.
    pub pool: Vec<Section>,
    /// `[[lun]]`: LUNs carved from pools.
    pub lun: Vec<Section>,
    /// `[[switch]]`: virtual switch definitions.
    pub switch: Vec<Section>,
    /// `[[lockspace]]`: cluster lockspaces this host joins.
    pub lockspace: Vec<Section>,
    /// `[iscsi]`: the iSCSI target configuration.
    pub iscsi: Option<Section>,
    /// `[nbd]`: the NBD server configuration.
    pub nbd: Option<Section>,
}

/// Kinds of the named sections, as used in store keys and messages.
pub const NAMED_SECTIONS: [&str; 4] = ["pool", "lun", "switch", "lockspace"];
/// Kinds of the singleton sections.
pub const SINGLE_SECTIONS: [&str; 2] = ["iscsi", "nbd"];

impl Sections {
    /// The named sections of one kind.
    pub fn named(&self, kind: &str) -> &[Section] {
        match kind {
            "pool" => &self.pool,
            "lun" => &self.lun,
            "switch" => &self.switch,
            "lockspace" => &self.lockspace,
            _ => &[],
        }
    }

    /// The named sections of one kind, to change.
    pub fn named_mut(&mut self, kind: &str) -> Option<&mut Vec<Section>> {
        match kind {
            "pool" => Some(&mut self.pool),
            "lun" => Some(&mut self.lun),
            "switch" => Some(&mut self.switch),
            "lockspace" => Some(&mut self.lockspace),
            _ => None,
        }
    }

    /// A singleton section.
    pub fn single(&self, kind: &str) -> Option<&Section> {
        match kind {
            "iscsi" => self.iscsi.as_ref(),
            "nbd" => self.nbd.as_ref(),
            _ => None,
        }
    }

    /// A singleton section, to change.
    pub fn single_mut(&mut self, kind: &str) -> Option<&mut Option<Section>> {
        match kind {
            "iscsi" => Some(&mut self.iscsi),
            "nbd" => Some(&mut self.nbd),
            _ => None,
        }
    }

    /// Every section keyed as the store keys it: `kind/name` or `kind`.
    pub fn keyed(&self) -> std::collections::BTreeMap<String, &Section> {
        let mut out = std::collections::BTreeMap::new();
        for kind in NAMED_SECTIONS {
            for s in self.named(kind) {
                out.insert(format!("{kind}/{}", s.name().unwrap_or_default()), s);
            }
        }
        for kind in SINGLE_SECTIONS {
            if let Some(s) = self.single(kind) {
                out.insert(kind.to_string(), s);
            }
        }
        out
    }
}

/// Appliance-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceSettings {
    /// The appliance's name, shown in the CLI and in metrics.
    pub name: String,
}

/// Settings of the management API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSettings {
    /// TCP addresses of the HTTPS listener. The unix socket in the data directory is
    /// always there in addition.
    pub listen: Vec<SocketAddr>,
}

/// Whether a disk is a file or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    /// A regular file, created sparse at its size if missing.
    File,
    /// A block device such as /dev/sdb.
    Block,
}

impl fmt::Display for DiskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskKind::File => "file",
            DiskKind::Block => "block",
        })
    }
}

/// A disk the appliance uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Unique name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Absolute path of the file or device.
    pub path: PathBuf,
    /// File or block device.
    pub kind: DiskKind,
    /// Size of a file disk (created sparse at this size if missing). Block devices have
    /// the size of the device, so none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Logical block size of a file disk; block devices report their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// The line of the document this entry came from, for error messages.
    #[serde(skip)]
    pub line: Option<usize>,
}

impl PartialEq for DiskSpec {
    /// Equality of what is declared; where it was declared does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.path == other.path
            && self.kind == other.kind
            && self.size == other.size
            && self.block_size == other.block_size
    }
}
impl Eq for DiskSpec {}

impl Default for DesiredState {
    fn default() -> Self {
        DesiredState {
            appliance: ApplianceSettings {
                name: "basalt".to_string(),
            },
            api: ApiSettings::default(),
            disks: Vec::new(),
            sections: Sections::default(),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8443))],
        }
    }
}

/// One problem found in a document, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error at the position of byte `offset` of `source`.
    pub fn at(source: &str, offset: Option<usize>, message: impl Into<String>) -> Self {
        let (line, column) = match offset {
            Some(offset) => {
                let (l, c) = line_col(source, offset);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            line,
            column,
            message: message.into(),
        }
    }

    /// An error on a known line.
    pub fn on_line(line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigError {
            line,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a document; a document with any is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, column)
}

// The document as written, with positions. Kept apart from the typed model so that the
// model stays plain data and the file format can evolve behind `version`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    version: Spanned<u32>,
    #[serde(default)]
    appliance: Option<ApplianceDoc>,
    #[serde(default)]
    api: Option<ApiDoc>,
    #[serde(default)]
    disk: Vec<DiskDoc>,
    #[serde(default)]
    pool: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    lun: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    switch: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    lockspace: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    iscsi: Option<Spanned<toml::Table>>,
    #[serde(default)]
    nbd: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplianceDoc {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiDoc {
    listen: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskDoc {
    name: Spanned<String>,
    path: Spanned<PathBuf>,
    kind: Spanned<DiskKind>,
    #[serde(default)]
    size: Option<Spanned<ByteSize>>,
    #[serde(default)]
    block_size: Option<Spanned<u32>>,
}

/// Checks that `name` is usable as an object name: 1 to 63 characters, letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

impl DiskSpec {
    /// Checks the entry on its own (not against the machine or other entries).
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = check_name(&self.name) {
            problems.push(e);
        }
        if !self.path.is_absolute() {
            problems.push(format!(
                "disk {:?}: path {} must be absolute",
                self.name,
                self.path.display()
            ));
        }
        match self.kind {
            DiskKind::File => {
                let bs = self.block_size.unwrap_or(512);
                if !BLOCK_SIZES.contains(&bs) {
                    problems.push(format!(
                        "disk {:?}: block size {bs} is not one of 512, 4096",
                        self.name
                    ));
                }
                match self.size {
                    None => problems.push(format!(
                        "disk {:?}: a file disk needs a size (for example size = \"10G\")",
                        self.name
                    )),
                    Some(ByteSize(0)) => {
                        problems.push(format!("disk {:?}: size must not be zero", self.name))
                    }
                    Some(ByteSize(n)) if !n.is_multiple_of(u64::from(bs)) => {
                        problems.push(format!(
                            "disk {:?}: size {n} is not a multiple of the block size {bs}",
                            self.name
                        ))
                    }
                    Some(_) => {}
                }
            }
            DiskKind::Block => {
                if self.size.is_some() {
                    problems.push(format!(
                        "disk {:?}: a block device has the size of the device; remove size",
                        self.name
                    ));
                }
                if self.block_size.is_some() {
                    problems.push(format!(
                        "disk {:?}: a block device reports its own block size; remove block_size",
                        self.name
                    ));
                }
            }
        }
        problems
    }
}

impl DesiredState {
    /// Parses and checks a document. On any problem, returns all of them.
    pub fn from_toml(source: &str) -> Result<DesiredState, ConfigErrors> {
        let doc: Document = toml::from_str(source).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigErrors(vec![ConfigError::at(source, offset, e.message().trim())])
        })?;
        let mut errors = Vec::new();
        let at = |span: std::ops::Range<usize>, msg: String| {
            ConfigError::at(source, Some(span.start), msg)
        };

        if *doc.version.get_ref() != FORMAT_VERSION {
            errors.push(at(
                doc.version.span(),
                format!(
                    "version {} is not supported; this build reads version {FORMAT_VERSION}",
                    doc.version.get_ref()
                ),
            ));
        }

        let mut state = DesiredState::default();
        if let Some(appliance) = doc.appliance {
            if let Err(e) = check_name(appliance.name.get_ref()) {
                errors.push(at(appliance.name.span(), format!("appliance name: {e}")));
            }
            state.appliance.name = appliance.name.into_inner();
        }
        if let Some(api) = doc.api {
            let span = api.listen.span();
            let mut listen = Vec::new();
            for addr in api.listen.into_inner() {
                match addr.get_ref().parse::<SocketAddr>() {
                    Ok(a) => listen.push(a),
                    Err(_) => errors.push(at(
                        addr.span(),
                        format!(
                            "api listen address {:?} is not an IP:port such as 127.0.0.1:8443",
                            addr.get_ref()
                        ),
                    )),
                }
            }
            if listen.is_empty() && errors.is_empty() {
                errors.push(at(
                    span,
                    "api listen needs at least one address".to_string(),
                ));
            }
            state.api.listen = listen;
        }

        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for d in doc.disk {
            let line = Some(line_col(source, d.name.span().start).0);
            let spec = DiskSpec {
                name: d.name.get_ref().clone(),
                path: d.path.get_ref().clone(),
                kind: *d.kind.get_ref(),
                size: d.size.as_ref().map(|s| *s.get_ref()),
                block_size: d.block_size.as_ref().map(|s| *s.get_ref()),
                line,
            };
            for problem in spec.check() {
                errors.push(ConfigError::on_line(line, problem));
            }
            if !names.insert(spec.name.clone()) {
                errors.push(at(
                    d.name.span(),
                    format!("disk {:?} is declared twice", spec.name),
                ));
            }
            if !paths.insert(spec.path.clone()) {
                errors.push(at(
                    d.path.span(),
                    format!("path {} is used by two disks", d.path.get_ref().display()),
                ));
            }
            state.disks.push(spec);
        }
        state.disks.sort_by(|a, b| a.name.cmp(&b.name));

        let section = |t: Spanned<toml::Table>| Section {
            line: Some(line_col(source, t.span().start).0),
            table: t.into_inner(),
        };
        let named = [
            ("pool", doc.pool),
            ("lun", doc.lun),
            ("switch", doc.switch),
            ("lockspace", doc.lockspace),
        ];
        for (kind, tables) in named {
            let mut seen = HashSet::new();
            let mut list = Vec::new();
            for t in tables {
                let sec = section(t);
                match sec.table.get("name").map(|v| v.as_str()) {
                    Some(Some(name)) => {
                        if let Err(e) = check_name(name) {
                            errors.push(ConfigError::on_line(sec.line, format!("{kind}: {e}")));
                        } else if !seen.insert(name.to_string()) {
                            errors.push(ConfigError::on_line(
                                sec.line,
                                format!("{kind} {name:?} is declared twice"),
                            ));
                        }
                    }
                    Some(None) => errors.push(ConfigError::on_line(
                        sec.line,
                        format!("{kind}: name must be a string"),
                    )),
                    None => errors.push(ConfigError::on_line(
                        sec.line,
                        format!("[[{kind}]] needs a name"),
                    )),
                }
                list.push(sec);
            }
            list.sort_by(|a, b| a.name().cmp(&b.name()));
            if let Some(slot) = state.sections.named_mut(kind) {
                *slot = list;
            }
        }
        state.sections.iscsi = doc.iscsi.map(section);
        state.sections.nbd = doc.nbd.map(section);

        if errors.is_empty() {
            Ok(state)
        } else {
            errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(errors))
        }
    }

    /// Renders the document `from_toml` reads back to an equal state.
    pub fn to_toml<'a>(&'a self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            version: u32,
            appliance: &'a ApplianceSettings,
            api: ApiOut,
            disk: &'a [DiskSpec],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            pool: Vec<&'a toml::Table>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            lun: Vec<&'a toml::Table>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            switch: Vec<&'a toml::Table>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            lockspace: Vec<&'a toml::Table>,
            #[serde(skip_serializing_if = "Option::is_none")]
            iscsi: Option<&'a toml::Table>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nbd: Option<&'a toml::Table>,
        }
        let tables = |list: &'a [Section]| list.iter().map(|s| &s.table).collect::<Vec<_>>();
        #[derive(Serialize)]
        struct ApiOut {
            listen: Vec<String>,
        }
        let out = Out {
            version: FORMAT_VERSION,
            appliance: &self.appliance,
            api: ApiOut {
                listen: self.api.listen.iter().map(|a| a.to_string()).collect(),
            },
            disk: &self.disks,
            pool: tables(&self.sections.pool),
            lun: tables(&self.sections.lun),
            switch: tables(&self.sections.switch),
            lockspace: tables(&self.sections.lockspace),
            iscsi: self.sections.iscsi.as_ref().map(|s| &s.table),
            nbd: self.sections.nbd.as_ref().map(|s| &s.table),
        };
        let body = match toml::to_string_pretty(&out) {
            Ok(body) => body,
            // The model holds only strings, numbers and tables, which always serialize.
            Err(e) => unreachable!("desired state does not serialize: {e}"),
        };
        let newline = if body.ends_with('\n') { "" } else { "\n" };
        format!(
            "# Basalt desired state. Apply with `basalt config apply FILE`.\n\
             # Sizes: 512K, 10G (binary) or 10GB (decimal).\n\n{body}{newline}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1

[appliance]
name = "lab-1"

[api]
listen = ["127.0.0.1:9443", "[::1]:9443"]

[[disk]]
name = "d1"
path = "/srv/disks/d1.img"
kind = "file"
size = "10G"

[[disk]]
name = "d0"
path = "/dev/sdb"
kind = "block"
"#;

    #[test]
    fn parses_a_good_document() {
        let s = DesiredState::from_toml(GOOD).unwrap();
        assert_eq!(s.appliance.name, "lab-1");
        assert_eq!(s.api.listen.len(), 2);
        assert_eq!(s.disks.len(), 2);
        assert_eq!(s.disks[0].name, "d0");
        assert_eq!(s.disks[0].kind, DiskKind::Block);
        assert_eq!(s.disks[1].size, Some(ByteSize(10 << 30)));
        assert_eq!(s.disks[1].line, Some(11));
    }

    #[test]
    fn export_round_trips() {
        let s = DesiredState::from_toml(GOOD).unwrap();
        let text = s.to_toml();
        let again = DesiredState::from_toml(&text).unwrap();
        assert_eq!(s, again);
        assert_eq!(text, again.to_toml());
    }

    #[test]
    fn minimal_document_gets_defaults() {
        let s = DesiredState::from_toml("version = 1\n").unwrap();
        assert_eq!(s, DesiredState::default());
    }

    fn errors(doc: &str) -> Vec<ConfigError> {
        DesiredState::from_toml(doc).unwrap_err().0
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = errors("version = 1\n[[disk]]\nname = \"d0\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(3), "{e:?}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let e = errors("version = 1\n\n[appliance]\nname = \"x\"\ncolour = \"red\"\n");
        assert_eq!(e[0].line, Some(5), "{e:?}");
        assert!(e[0].message.contains("colour"), "{e:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_a_line() {
        let doc = r#"version = 1
[[disk]]
name = "a"
path = "relative.img"
kind = "file"
size = "1000"

[[disk]]
name = "a"
path = "/dev/sdb"
kind = "block"
size = "1G"
"#;
        let e = errors(doc);
        let text = ConfigErrors(e.clone()).to_string();
        assert!(
            text.contains("line 3: disk \"a\": path relative.img must be absolute"),
            "{text}"
        );
        assert!(
            text.contains("line 3: disk \"a\": size 1000 is not a multiple"),
            "{text}"
        );
        assert!(
            text.contains("line 9, column 8: disk \"a\" is declared twice"),
            "{text}"
        );
        assert!(
            text.contains("line 9: disk \"a\": a block device has the size"),
            "{text}"
        );
    }

    #[test]
    fn bad_size_and_kind_and_version() {
        let e = errors("version = 2\n");
        assert!(e[0].message.contains("version 2 is not supported"));
        let e = errors("version = 1\n[[disk]]\nname = \"a\"\npath = \"/x\"\nkind = \"tape\"\n");
        assert_eq!(e[0].line, Some(5), "{e:?}");
        let e = errors(
            "version = 1\n[[disk]]\nname = \"a\"\npath = \"/x\"\nkind = \"file\"\nsize = \"12Q\"\n",
        );
        assert_eq!(e[0].line, Some(6), "{e:?}");
        assert!(e[0].message.contains("invalid size"), "{e:?}");
    }

    #[test]
    fn sections_keep_their_lines_and_round_trip() {
        let doc = r#"version = 1

[[switch]]
name = "vs0"
uplinks = [{ name = "up0", interface = "eth1" }]

[[pool]]
name = "p1"
raid = "raid6"

[[pool]]
name = "p0"
raid = "raid1"
disks = ["d0", "d1"]

[iscsi]
[[iscsi.targets]]
iqn = "iqn.2026-11.io.basalt:t0"
"#;
        let s = DesiredState::from_toml(doc).unwrap();
        assert_eq!(s.sections.pool.len(), 2);
        assert_eq!(s.sections.pool[0].name(), Some("p0"));
        assert_eq!(s.sections.pool[0].line, Some(11));
        assert_eq!(s.sections.switch[0].line, Some(3));
        assert!(s.sections.iscsi.is_some());
        let again = DesiredState::from_toml(&s.to_toml()).unwrap();
        assert_eq!(s, again);
        assert_eq!(s.to_toml(), again.to_toml());
    }

    #[test]
    fn sections_need_unique_valid_names() {
        let e = errors("version = 1\n[[pool]]\nraid = \"raid5\"\n");
        assert!(e[0].message.contains("[[pool]] needs a name"), "{e:?}");
        assert_eq!(e[0].line, Some(2));
        let e = errors("version = 1\n[[lun]]\nname = \"a\"\n[[lun]]\nname = \"a\"\n");
        assert!(
            e[0].message.contains("lun \"a\" is declared twice"),
            "{e:?}"
        );
        assert_eq!(e[0].line, Some(4));
        let e = errors("version = 1\n[[switch]]\nname = 5\n");
        assert!(e[0].message.contains("name must be a string"), "{e:?}");
    }

    #[test]
    fn bad_listen_address() {
        let e = errors("version = 1\n[api]\nlisten = [\"localhost\"]\n");
        assert_eq!(e[0].line, Some(3));
    }
}

#[cfg(test)]
mod properties {
    //! The properties of the `config_document` fuzz target, run on random inputs.
    use super::*;
    use proptest::prelude::*;

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("version = 1".to_string()),
            Just("version = 2".to_string()),
            Just("[appliance]".to_string()),
            Just("[api]".to_string()),
            Just("[[disk]]".to_string()),
            "[a-z0-9._-]{0,8}".prop_map(|n| format!("name = \"{n}\"")),
            "/[a-z]{1,5}".prop_map(|p| format!("path = \"{p}\"")),
            Just("kind = \"file\"".to_string()),
            Just("kind = \"block\"".to_string()),
            "[0-9]{1,5}[KMG]?".prop_map(|s| format!("size = \"{s}\"")),
            prop_oneof![Just(512u32), Just(4096), Just(1000)]
                .prop_map(|b| format!("block_size = {b}")),
            "[0-9.:]{1,16}".prop_map(|a| format!("listen = [\"{a}\"]")),
            "\\PC{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = DesiredState::from_toml(&text);
        }

        #[test]
        fn whatever_parses_round_trips(lines in prop::collection::vec(line(), 0..24)) {
            let text = lines.join("\n");
            match DesiredState::from_toml(&text) {
                Ok(state) => {
                    let again = DesiredState::from_toml(&state.to_toml()).unwrap();
                    prop_assert_eq!(state, again);
                }
                Err(errors) => prop_assert!(!errors.0.is_empty()),
            }
        }
    }
}

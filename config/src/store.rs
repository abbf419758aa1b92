//! The appliance store: the appliance's own settings in an embedded RocksDB database
//! under the data directory.
//!
//! Layout: one column family per table. `meta` holds the schema version and the
//! appliance's identity; `settings` holds one JSON document per settings section;
//! `disks` maps a disk name to its JSON [`DiskSpec`]. JSON keeps records readable with
//! `ldb` and lets fields be added without a migration; a change of meaning gets a
//! migration (see [`MIGRATIONS`]), run once, atomically, when a newer build opens an
//! older store. A store written by a newer build is refused rather than misread.
//!
//! Every change is one RocksDB write batch with a synced WAL, so an applied
//! configuration is either entirely there after a crash or not at all.

use crate::desired::{ApiSettings, ApplianceSettings, DesiredState, DiskSpec, Section, Sections};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

const CF_META: &str = "meta";
const CF_SETTINGS: &str = "settings";
const CF_DISKS: &str = "disks";
const CF_OBJECTS: &str = "objects";
const COLUMN_FAMILIES: [&str; 4] = [CF_META, CF_SETTINGS, CF_DISKS, CF_OBJECTS];

const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_APPLIANCE_ID: &[u8] = b"appliance_id";
const KEY_GENERATION: &[u8] = b"generation";
const KEY_APPLIANCE: &[u8] = b"appliance";
const KEY_API: &[u8] = b"api";

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB failed.
    #[error("appliance store at {path}: {source}")]
    Db {
        /// The store's directory.
        path: PathBuf,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },
    /// A record does not decode.
    #[error("appliance store: record {table}/{key} is corrupt: {reason}")]
    Corrupt {
        /// Table (column family).
        table: &'static str,
        /// Key of the record.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was written by a newer Basalt.
    #[error(
        "appliance store at {path} has schema version {found}, newer than this build's {supported}; \
         run the newer basalt or restore a backup"
    )]
    NewerSchema {
        /// The store's directory.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// A record that must be unique already exists.
    #[error("{0}")]
    Conflict(String),
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One step of the schema's history.
pub struct Migration {
    /// The version the store has after this step.
    pub to: u32,
    /// What the step changes, for the log.
    pub description: &'static str,
    /// Adds the step's changes to the batch that also records the new version.
    pub run: fn(&DB, &mut WriteBatch) -> Result<()>,
}

/// The schema's history, oldest first. The last entry's `to` is the current version.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 1,
        description: "initial layout: meta, settings and disks tables; appliance identity",
        run: migrate_to_1,
    },
    Migration {
        to: 2,
        description: "objects table for pools, LUNs, switches, targets and lockspaces",
        run: migrate_to_2,
    },
];

fn migrate_to_1(db: &DB, batch: &mut WriteBatch) -> Result<()> {
    let meta = cf(db, CF_META)?;
    let id = uuid::Uuid::new_v4();
    batch.put_cf(meta, KEY_APPLIANCE_ID, id.to_string());
    batch.put_cf(meta, KEY_GENERATION, 0u64.to_be_bytes());
    Ok(())
}

fn migrate_to_2(db: &DB, _batch: &mut WriteBatch) -> Result<()> {
    // The column family is created when the store opens; the step only checks that it is
    // there and empty, so that an older build's leftovers are never taken for objects.
    let objects = cf(db, CF_OBJECTS)?;
    if db
        .iterator_cf(objects, rocksdb::IteratorMode::Start)
        .next()
        .is_some()
    {
        return Err(StoreError::Corrupt {
            table: CF_OBJECTS,
            key: String::new(),
            reason: "objects exist before the table was introduced".to_string(),
        });
    }
    Ok(())
}

fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| StoreError::Corrupt {
        table: name,
        key: String::new(),
        reason: "column family missing".to_string(),
    })
}

/// The current schema version.
pub fn current_schema_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.to)
}

/// What applying a desired state changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Disks to add.
    pub add_disks: Vec<DiskSpec>,
    /// Disks to remove, by name.
    pub remove_disks: Vec<String>,
    /// Disks whose declaration changes: (old, new).
    pub change_disks: Vec<(DiskSpec, DiskSpec)>,
    /// The appliance settings change.
    pub appliance_changed: bool,
    /// The API settings change.
    pub api_changed: bool,
    /// Sections added, by store key (`pool/p0`, `iscsi`).
    pub add_sections: Vec<String>,
    /// Sections removed, by store key.
    pub remove_sections: Vec<String>,
    /// Sections whose content changes, by store key.
    pub change_sections: Vec<String>,
}

impl Plan {
    /// True when applying changes nothing.
    pub fn is_empty(&self) -> bool {
        self.add_disks.is_empty()
            && self.remove_disks.is_empty()
            && self.change_disks.is_empty()
            && !self.appliance_changed
            && !self.api_changed
            && self.add_sections.is_empty()
            && self.remove_sections.is_empty()
            && self.change_sections.is_empty()
    }
}

/// The open appliance store.
pub struct Store {
    db: DB,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and brings its schema up to date.
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_with(dir, MIGRATIONS)
    }

    fn open_with(dir: &Path, migrations: &[Migration]) -> Result<Store> {
        let path = dir.to_path_buf();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // A small store: keep memory and file handles modest.
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(4);
        let cfs = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StoreError::Db {
            path: path.clone(),
            source,
        })?;
        let store = Store { db, path };
        store.migrate(migrations)?;
        Ok(store)
    }

    fn db_err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.db_err(e))
    }

    fn get_raw(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = cf(&self.db, table)?;
        self.db.get_cf(handle, key).map_err(|e| self.db_err(e))
    }

    fn get_json<T: DeserializeOwned>(&self, table: &'static str, key: &[u8]) -> Result<Option<T>> {
        match self.get_raw(table, key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        table,
                        key: String::from_utf8_lossy(key).into_owned(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    fn put_json<T: Serialize>(
        &self,
        batch: &mut WriteBatch,
        table: &'static str,
        key: &[u8],
        value: &T,
    ) -> Result<()> {
        let handle = cf(&self.db, table)?;
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
            table,
            key: String::from_utf8_lossy(key).into_owned(),
            reason: e.to_string(),
        })?;
        batch.put_cf(handle, key, bytes);
        Ok(())
    }

    fn get_u64(&self, table: &'static str, key: &'static [u8]) -> Result<Option<u64>> {
        match self.get_raw(table, key)? {
            None => Ok(None),
            Some(bytes) => {
                let arr: [u8; 8] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt {
                            table,
                            key: String::from_utf8_lossy(key).into_owned(),
                            reason: format!("expected 8 bytes, found {}", bytes.len()),
                        })?;
                Ok(Some(u64::from_be_bytes(arr)))
            }
        }
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self.get_u64(CF_META, KEY_SCHEMA_VERSION)?.unwrap_or(0) as u32)
    }

    fn migrate(&self, migrations: &[Migration]) -> Result<()> {
        let supported = migrations.last().map_or(0, |m| m.to);
        let found = self.schema_version()?;
        if found > supported {
            return Err(StoreError::NewerSchema {
                path: self.path.clone(),
                found,
                supported,
            });
        }
        let meta = cf(&self.db, CF_META)?;
        for m in migrations.iter().filter(|m| m.to > found) {
            let mut batch = WriteBatch::default();
            (m.run)(&self.db, &mut batch)?;
            batch.put_cf(meta, KEY_SCHEMA_VERSION, u64::from(m.to).to_be_bytes());
            self.write(batch)?;
        }
        Ok(())
    }

    /// The appliance's identity, made when the store was created.
    pub fn appliance_id(&self) -> Result<String> {
        match self.get_raw(CF_META, KEY_APPLIANCE_ID)? {
            Some(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            None => Err(StoreError::Corrupt {
                table: CF_META,
                key: "appliance_id".into(),
                reason: "missing".into(),
            }),
        }
    }

    /// How many changes have been committed; grows by one with every change.
    pub fn generation(&self) -> Result<u64> {
        Ok(self.get_u64(CF_META, KEY_GENERATION)?.unwrap_or(0))
    }

    fn bump_generation(&self, batch: &mut WriteBatch) -> Result<()> {
        let meta = cf(&self.db, CF_META)?;
        let next = self.generation()? + 1;
        batch.put_cf(meta, KEY_GENERATION, next.to_be_bytes());
        Ok(())
    }

    /// Every declared disk, in name order.
    pub fn disks(&self) -> Result<Vec<DiskSpec>> {
        let handle = cf(&self.db, CF_DISKS)?;
        let mut disks = Vec::new();
        for item in self.db.iterator_cf(handle, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|e| self.db_err(e))?;
            let disk: DiskSpec =
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    table: CF_DISKS,
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: e.to_string(),
                })?;
            disks.push(disk);
        }
        Ok(disks)
    }

    /// One disk by name.
    pub fn disk(&self, name: &str) -> Result<Option<DiskSpec>> {
        self.get_json(CF_DISKS, name.as_bytes())
    }

    /// Adds a disk; fails if the name or the path is taken.
    pub fn add_disk(&self, disk: &DiskSpec) -> Result<()> {
        for existing in self.disks()? {
            if existing.name == disk.name {
                return Err(StoreError::Conflict(format!(
                    "a disk named {:?} already exists",
                    disk.name
                )));
            }
            if existing.path == disk.path {
                return Err(StoreError::Conflict(format!(
                    "{} is already disk {:?}",
                    disk.path.display(),
                    existing.name
                )));
            }
        }
        let mut batch = WriteBatch::default();
        self.put_json(&mut batch, CF_DISKS, disk.name.as_bytes(), disk)?;
        self.bump_generation(&mut batch)?;
        self.write(batch)
    }

    /// Removes a disk; returns whether it existed.
    pub fn remove_disk(&self, name: &str) -> Result<bool> {
        if self.disk(name)?.is_none() {
            return Ok(false);
        }
        let handle = cf(&self.db, CF_DISKS)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(handle, name.as_bytes());
        self.bump_generation(&mut batch)?;
        self.write(batch)?;
        Ok(true)
    }

    /// A run-time record (state subsystems keep across restarts that is not part of the
    /// desired state, such as SCSI persistent reservations).
    pub fn record(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get_raw(CF_SETTINGS, format!("rt/{key}").as_bytes())
    }

    /// Stores a run-time record (synced).
    pub fn put_record(&self, key: &str, value: &[u8]) -> Result<()> {
        let handle = cf(&self.db, CF_SETTINGS)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(handle, format!("rt/{key}").as_bytes(), value);
        self.write(batch)
    }

    /// Deletes a run-time record.
    pub fn delete_record(&self, key: &str) -> Result<()> {
        let handle = cf(&self.db, CF_SETTINGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(handle, format!("rt/{key}").as_bytes());
        self.write(batch)
    }

    /// The appliance settings.
    pub fn appliance(&self) -> Result<ApplianceSettings> {
        Ok(self
            .get_json(CF_SETTINGS, KEY_APPLIANCE)?
            .unwrap_or_else(|| DesiredState::default().appliance))
    }

    /// The API settings.
    pub fn api(&self) -> Result<ApiSettings> {
        Ok(self.get_json(CF_SETTINGS, KEY_API)?.unwrap_or_default())
    }

    /// The subsystem sections as stored.
    pub fn sections(&self) -> Result<Sections> {
        let handle = cf(&self.db, CF_OBJECTS)?;
        let mut sections = Sections::default();
        for item in self.db.iterator_cf(handle, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|e| self.db_err(e))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let corrupt = |reason: String| StoreError::Corrupt {
                table: CF_OBJECTS,
                key: key.clone(),
                reason,
            };
            let table: toml::Table =
                serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
            let section = Section { table, line: None };
            let kind = key.split('/').next().unwrap_or_default();
            if let Some(list) = sections.named_mut(kind) {
                list.push(section);
            } else if let Some(slot) = sections.single_mut(kind) {
                *slot = Some(section);
            } else {
                return Err(corrupt(format!("unknown object kind {kind:?}")));
            }
        }
        Ok(sections)
    }

    /// The whole desired state as stored.
    pub fn desired_state(&self) -> Result<DesiredState> {
        Ok(DesiredState {
            appliance: self.appliance()?,
            api: self.api()?,
            disks: self.disks()?,
            sections: self.sections()?,
        })
    }

    /// What [`Store::apply`] would change.
    pub fn plan(&self, desired: &DesiredState) -> Result<Plan> {
        let current = self.desired_state()?;
        let mut plan = Plan {
            appliance_changed: current.appliance != desired.appliance,
            api_changed: current.api != desired.api,
            ..Plan::default()
        };
        for d in &desired.disks {
            match current.disks.iter().find(|c| c.name == d.name) {
                None => plan.add_disks.push(d.clone()),
                Some(c) if c != d => plan.change_disks.push((c.clone(), d.clone())),
                Some(_) => {}
            }
        }
        for c in &current.disks {
            if !desired.disks.iter().any(|d| d.name == c.name) {
                plan.remove_disks.push(c.name.clone());
            }
        }
        let (have, want) = (current.sections.keyed(), desired.sections.keyed());
        for (key, section) in &want {
            match have.get(key) {
                None => plan.add_sections.push(key.clone()),
                Some(old) if old != section => plan.change_sections.push(key.clone()),
                Some(_) => {}
            }
        }
        plan.remove_sections = have
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        Ok(plan)
    }

    /// Replaces the stored desired state with `desired` in one atomic write, and returns
    /// what changed. The caller has checked `desired` against the machine first.
    pub fn apply(&self, desired: &DesiredState) -> Result<Plan> {
        let plan = self.plan(desired)?;
        if plan.is_empty() {
            return Ok(plan);
        }
        let mut batch = WriteBatch::default();
        self.put_json(&mut batch, CF_SETTINGS, KEY_APPLIANCE, &desired.appliance)?;
        self.put_json(&mut batch, CF_SETTINGS, KEY_API, &desired.api)?;
        let handle = cf(&self.db, CF_DISKS)?;
        for name in &plan.remove_disks {
            batch.delete_cf(handle, name.as_bytes());
        }
        for d in &desired.disks {
            self.put_json(&mut batch, CF_DISKS, d.name.as_bytes(), d)?;
        }
        let objects = cf(&self.db, CF_OBJECTS)?;
        for key in &plan.remove_sections {
            batch.delete_cf(objects, key.as_bytes());
        }
        for (key, section) in desired.sections.keyed() {
            self.put_json(&mut batch, CF_OBJECTS, key.as_bytes(), &section.table)?;
        }
        self.bump_generation(&mut batch)?;
        self.write(batch)?;
        Ok(plan)
    }

    /// Flushes memtables to disk (the WAL already makes every write durable; this
    /// shortens recovery at the next open).
    pub fn flush(&self) -> Result<()> {
        for name in COLUMN_FAMILIES {
            let handle = cf(&self.db, name)?;
            self.db.flush_cf(handle).map_err(|e| self.db_err(e))?;
        }
        self.db.flush_wal(true).map_err(|e| self.db_err(e))
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::DiskKind;
    use crate::size::ByteSize;

    fn disk(name: &str) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            path: PathBuf::from(format!("/srv/{name}.img")),
            kind: DiskKind::File,
            size: Some(ByteSize(1 << 30)),
            block_size: None,
            line: None,
        }
    }

    #[test]
    fn fresh_store_is_at_current_version_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), current_schema_version());
        assert_eq!(store.desired_state().unwrap(), DesiredState::default());
        assert_eq!(store.generation().unwrap(), 0);
        let id = store.appliance_id().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.appliance_id().unwrap(),
            id,
            "identity survives reopen"
        );
    }

    #[test]
    fn add_remove_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_disk(&disk("a")).unwrap();
        assert!(matches!(
            store.add_disk(&disk("a")),
            Err(StoreError::Conflict(_))
        ));
        let mut same_path = disk("b");
        same_path.path = disk("a").path;
        assert!(matches!(
            store.add_disk(&same_path),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(store.disks().unwrap(), vec![disk("a")]);
        assert!(store.remove_disk("a").unwrap());
        assert!(!store.remove_disk("a").unwrap());
        assert_eq!(store.generation().unwrap(), 2);
    }

    #[test]
    fn apply_plans_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_disk(&disk("old")).unwrap();
        let mut desired = DesiredState::default();
        desired.appliance.name = "x".into();
        desired.disks = vec![disk("a"), disk("b")];
        let plan = store.apply(&desired).unwrap();
        assert_eq!(plan.add_disks.len(), 2);
        assert_eq!(plan.remove_disks, vec!["old".to_string()]);
        assert!(plan.appliance_changed);
        assert_eq!(store.desired_state().unwrap(), desired);
        assert!(store.apply(&desired).unwrap().is_empty());
    }

    #[test]
    fn sections_are_stored_planned_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let doc = "version = 1\n[[pool]]\nname = \"p0\"\nraid = \"raid5\"\n\n[[switch]]\nname = \"vs0\"\n\n[iscsi]\nx = 1\n";
        let desired = DesiredState::from_toml(doc).unwrap();
        let plan = store.apply(&desired).unwrap();
        assert_eq!(plan.add_sections, vec!["iscsi", "pool/p0", "switch/vs0"]);
        assert_eq!(store.desired_state().unwrap(), desired);

        let doc2 = "version = 1\n[[pool]]\nname = \"p0\"\nraid = \"raid6\"\n";
        let desired2 = DesiredState::from_toml(doc2).unwrap();
        let plan = store.plan(&desired2).unwrap();
        assert_eq!(plan.change_sections, vec!["pool/p0"]);
        assert_eq!(plan.remove_sections, vec!["iscsi", "switch/vs0"]);
        store.apply(&desired2).unwrap();
        assert_eq!(store.desired_state().unwrap(), desired2);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.desired_state().unwrap(), desired2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let meta = cf(&store.db, CF_META).unwrap();
            let mut batch = WriteBatch::default();
            batch.put_cf(meta, KEY_SCHEMA_VERSION, 99u64.to_be_bytes());
            store.write(batch).unwrap();
        }
        match Store::open(dir.path()) {
            Err(StoreError::NewerSchema { found: 99, .. }) => {}
            other => panic!("expected NewerSchema, got {:?}", other.err()),
        }
    }

    fn rename_disks(db: &DB, batch: &mut WriteBatch) -> Result<()> {
        // A test migration: rename every disk "x" to "x-renamed".
        let handle = cf(db, CF_DISKS)?;
        for item in db.iterator_cf(handle, rocksdb::IteratorMode::Start) {
            let (key, value) = item.unwrap();
            let mut d: DiskSpec = serde_json::from_slice(&value).unwrap();
            d.name = format!("{}-renamed", d.name);
            batch.delete_cf(handle, &key);
            batch.put_cf(handle, d.name.as_bytes(), serde_json::to_vec(&d).unwrap());
        }
        Ok(())
    }

    #[test]
    fn migrations_run_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.add_disk(&disk("a")).unwrap();
        }
        let chain = [
            Migration {
                to: 1,
                description: "initial",
                run: migrate_to_1,
            },
            Migration {
                to: 2,
                description: "objects",
                run: migrate_to_2,
            },
            Migration {
                to: 3,
                description: "rename",
                run: rename_disks,
            },
        ];
        let store = Store::open_with(dir.path(), &chain).unwrap();
        assert_eq!(store.schema_version().unwrap(), 3);
        assert_eq!(store.disks().unwrap()[0].name, "a-renamed");
        drop(store);
        let store = Store::open_with(dir.path(), &chain).unwrap();
        assert_eq!(store.disks().unwrap()[0].name, "a-renamed", "ran only once");
    }
}

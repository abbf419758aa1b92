//! VM folders: where definitions live, beside their disks.
//!
//! A [`VmStore`] is a directory of VM folders (the data dir's `vms/` until the datastore
//! lands, then a datastore folder), one per VM, named after it:
//!
//! ```text
//! vms/web-1/vm.json        the definition (written atomically: temp file + rename)
//! vms/web-1/status.json    what the supervisor last saw (state, pid, last exit, restarts)
//! vms/web-1/console.log    everything the guest wrote on its serial console
//! vms/web-1/console.sock   attach here (both runners)
//! vms/web-1/vmm.log        the VMM process's stderr (its last line says why it ended)
//! vms/web-1/qemu.log       QEMU's stderr (QEMU runner)
//! vms/web-1/*.img          file disks, kernels... anything the definition names relatively
//! ```

use crate::definition::{validate_name, DefinitionError, VmDefinition};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// The definition's file name.
pub const DEFINITION_FILE: &str = "vm.json";
/// The status file's name.
pub const STATUS_FILE: &str = "status.json";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No VM of that name.
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// A VM of that name exists.
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    /// The definition is invalid.
    #[error("invalid VM definition: {0}")]
    Invalid(#[from] DefinitionError),
    /// The VM is running.
    #[error("VM {0:?} is running; stop it first")]
    Running(String),
    /// A file holds what cannot be parsed (a torn or hand-edited `status.json`).
    #[error("{}: cannot be parsed: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file system failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A VM's lifecycle state as the supervisor sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Not running.
    #[default]
    Stopped,
    /// The VMM process is being started.
    Starting,
    /// The VMM process runs.
    Running,
    /// A stop was asked; waiting for the process to end.
    Stopping,
    /// The VMM ended unasked and will not be (or not yet be) restarted.
    Crashed,
    /// The VM cannot start (bad definition, missing disk...); see the last exit.
    Failed,
}

impl VmState {
    /// True while a VMM process exists (or is about to).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Stopping
        )
    }
}

/// How a VMM process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// Why, in words (the VMM's `vmm: exit:` line, or the signal).
    pub reason: String,
    /// Whether a stop or kill was asked.
    pub requested: bool,
}

/// What the supervisor last recorded about a VM (`status.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// State.
    pub state: VmState,
    /// The runner in use (`builtin`, `qemu`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// The VMM process, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the current or last run started (ms since the epoch).
    #[serde(default)]
    pub started_at_ms: u64,
    /// Restarts after crashes in a row (reset by a stable run).
    #[serde(default)]
    pub restarts: u32,
    /// How the last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    /// Why this status (live, in the supervisor) is not what `status.json` holds: the
    /// last write of it failed (a full disk...). Never written to the file itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_recorded: Option<String>,
}

/// One VM as listed.
#[derive(Debug, Clone)]
pub struct VmEntry {
    /// Name (the folder name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// The definition, or why it cannot be read.
    pub definition: Result<VmDefinition, String>,
    /// The recorded status, or why it cannot be read (see [`VmStore::status`]).
    pub status: Result<VmStatus, String>,
}

/// A directory of VM folders. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct VmStore {
    root: PathBuf,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, text: &str) -> Result<(), StoreError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

impl VmStore {
    /// The store at `root`, created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(VmStore { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of VM `name` (whether or not it exists).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates a VM folder with its definition.
    pub fn create(&self, def: &VmDefinition) -> Result<PathBuf, StoreError> {
        def.validate()?;
        let dir = self.dir(&def.name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if dir.join(DEFINITION_FILE).exists() {
                    return Err(StoreError::Exists(def.name.clone()));
                }
                // A folder with disks already in it (copied there first) is fine.
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        write_atomic(&dir.join(DEFINITION_FILE), &def.to_json())?;
        Ok(dir)
    }

    /// Replaces the definition of a stopped VM (the name must not change).
    pub fn update(&self, def: &VmDefinition) -> Result<(), StoreError> {
        def.validate()?;
        let dir = self.dir(&def.name);
        if !dir.join(DEFINITION_FILE).exists() {
            return Err(StoreError::NotFound(def.name.clone()));
        }
        // An unreadable status may hide a running VM: refused too.
        if self.status(&def.name)?.state.is_active() {
            return Err(StoreError::Running(def.name.clone()));
        }
        write_atomic(&dir.join(DEFINITION_FILE), &def.to_json())
    }

    /// Reads and validates a definition.
    pub fn get(&self, name: &str) -> Result<VmDefinition, StoreError> {
        validate_name(name).map_err(|_| StoreError::NotFound(name.to_string()))?;
        let path = self.dir(name).join(DEFINITION_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(VmDefinition::from_json(&text)?)
    }

    /// The recorded status.
    ///
    /// No `status.json` means [`VmState::Stopped`]: the file is written (atomically,
    /// so it is never half there) before a VMM is spawned, and a start that cannot
    /// write it fails, so a VM without one never ran. A file that cannot be read or
    /// parsed is an error, never "stopped": the VM may run, and the callers that must
    /// know (the one-writer and pool checks) refuse rather than guess.
    pub fn status(&self, name: &str) -> Result<VmStatus, StoreError> {
        let path = self.dir(name).join(STATUS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VmStatus::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Records a status.
    pub fn set_status(&self, name: &str, status: &VmStatus) -> Result<(), StoreError> {
        let mut status = status.clone();
        status.not_recorded = None;
        let path = self.dir(name).join(STATUS_FILE);
        let text = serde_json::to_string_pretty(&status).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &text)
    }

    /// Whether VM `name` exists: its folder has a `vm.json`, readable or not (so that a
    /// VM whose definition cannot be read can still be stopped, shown and deleted).
    pub fn exists(&self, name: &str) -> Result<bool, StoreError> {
        validate_name(name).map_err(|_| StoreError::NotFound(name.to_string()))?;
        let path = self.dir(name).join(DEFINITION_FILE);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every VM folder (folders with a `vm.json`), by name.
    pub fn list(&self) -> Result<Vec<VmEntry>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let e = e.map_err(io_err(&self.root))?;
            let dir = e.path();
            if !dir.join(DEFINITION_FILE).is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let definition = self.get(&name).map_err(|e| e.to_string());
            let status = self.status(&name).map_err(|e| e.to_string());
            out.push(VmEntry {
                name,
                dir,
                definition,
                status,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a stopped VM's folder with everything in it (file disks included; LUNs
    /// live elsewhere and are the caller's to delete). The definition need not be
    /// readable; the status must be, and not active (see [`VmStore::remove`]).
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        if !self.exists(name)? {
            return Err(StoreError::NotFound(name.to_string()));
        }
        if self.status(name)?.state.is_active() {
            return Err(StoreError::Running(name.to_string()));
        }
        self.remove(name)
    }

    /// Deletes VM `name`'s folder without looking at its status: for a caller that
    /// knows otherwise that no VMM runs for it (the supervisor).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        if !self.exists(name)? {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let dir = self.dir(name);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> VmDefinition {
        VmDefinition::from_json(&format!(
            r#"{{"name":"{name}","vcpus":1,"memory_mib":64,"boot":{{"kind":"kernel","kernel":"k"}}}}"#
        ))
        .expect("def")
    }

    #[test]
    fn create_list_get_update_delete() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path().join("vms")).expect("store");
        store.create(&def("b")).expect("b");
        store.create(&def("a")).expect("a");
        assert!(matches!(
            store.create(&def("a")),
            Err(StoreError::Exists(_))
        ));
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["a", "b"]);
        let mut d = store.get("a").expect("get");
        d.vcpus = 2;
        store.update(&d).expect("update");
        assert_eq!(store.get("a").expect("get").vcpus, 2);
        let mut st = VmStatus {
            state: VmState::Running,
            ..VmStatus::default()
        };
        store.set_status("a", &st).expect("status");
        assert!(matches!(store.delete("a"), Err(StoreError::Running(_))));
        assert!(matches!(store.update(&d), Err(StoreError::Running(_))));
        st.state = VmState::Stopped;
        store.set_status("a", &st).expect("status");
        store.delete("a").expect("delete");
        assert!(matches!(store.get("a"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.get("../etc"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn a_broken_definition_is_listed_with_its_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path()).expect("store");
        std::fs::create_dir(tmp.path().join("bad")).expect("dir");
        std::fs::write(
            tmp.path().join("bad/vm.json"),
            r#"{"name":"bad","vcpus":0}"#,
        )
        .expect("write");
        let list = store.list().expect("list");
        assert_eq!(list.len(), 1);
        assert!(list[0].definition.is_err());
        store
            .delete("bad")
            .expect("a broken VM can still be deleted");
    }

    #[test]
    fn an_unreadable_status_is_an_error_not_stopped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path()).expect("store");
        let d = def("a");
        store.create(&d).expect("a");
        // Never started: no status.json, stopped.
        assert_eq!(store.status("a").expect("status").state, VmState::Stopped);
        std::fs::write(tmp.path().join("a").join(STATUS_FILE), "{\"state\":\"runn").expect("w");
        let e = store
            .status("a")
            .expect_err("a torn status is not \"stopped\"");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(STATUS_FILE), "{e}");
        let list = store.list().expect("list");
        assert!(list[0].status.is_err(), "{:?}", list[0].status);
        // What may run is neither redefined nor deleted on a guess.
        assert!(matches!(store.update(&d), Err(StoreError::Corrupt { .. })));
        assert!(matches!(store.delete("a"), Err(StoreError::Corrupt { .. })));
        store
            .set_status("a", &VmStatus::default())
            .expect("rewrite");
        store.delete("a").expect("delete");
    }

    #[test]
    fn a_vm_whose_definition_cannot_be_read_exists_and_can_be_deleted() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = VmStore::open(tmp.path()).expect("store");
        store.create(&def("a")).expect("a");
        // Not UTF-8: reading it is an I/O error (InvalidData), not a parse error.
        std::fs::write(tmp.path().join("a").join(DEFINITION_FILE), [0xff, 0xfe]).expect("w");
        assert!(matches!(store.get("a"), Err(StoreError::Io { .. })));
        assert!(store.exists("a").expect("exists"));
        assert!(!store.exists("b").expect("exists"));
        assert!(matches!(store.delete("b"), Err(StoreError::NotFound(_))));
        store.delete("a").expect("delete");
        assert!(!store.exists("a").expect("exists"));
    }
}

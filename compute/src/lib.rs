//! Compute: VMs that run from Basalt storage, one supervised process per VM.
//!
//! - [`definition`]: the VM document (`vm.json`), validated with errors that name the
//!   field.
//! - [`store`]: VM folders in a directory (the data dir until the datastore lands):
//!   create, list, read, delete, and the status file the supervisor keeps.
//! - [`vmm`]: the built-in runner on the rust-vmm crates: guest memory (KSM- and
//!   userfaultfd-ready), direct kernel boot with ACPI tables, vCPU threads, an 8250
//!   console, virtio-mmio devices (blk on any `BlockDev`, net on a TAP, balloon with
//!   statistics), and completion of the few instructions a nested KVM cannot emulate.
//! - [`qemu`]: the QEMU runner, driven over QMP, for hosts without usable KVM (TCG) and
//!   guests that need firmware.
//! - [`nbd`]: an NBD client `BlockDev`, how a VMM process reaches the daemon's LUNs.
//! - [`launch`]: `vmm_main`, the body of `basalt vmm` (one process per VM), and the
//!   arguments the daemon passes it.
//! - [`supervisor`]: what the daemon holds: starts VMM processes, watches them, records
//!   why they ended, restarts them per the VM's crash policy.
//! - [`sandbox`]: seccomp filter and privilege drop for the VMM process.
//!
//! See `compute/DESIGN.md` for the process model and `compute/PVM.md` for what this
//! host's nested KVM allows.

#![deny(missing_docs)]

pub mod definition;
pub mod launch;
pub mod nbd;
pub mod qemu;
pub mod sandbox;
pub mod store;
pub mod supervisor;
pub mod vmm;

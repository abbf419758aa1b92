//! The built-in runner: a KVM virtual machine monitor on the rust-vmm crates
//! (kvm-ioctls, kvm-bindings, vm-memory, linux-loader, virtio-queue, vm-superio,
//! vmm-sys-util, acpi_tables).
//!
//! [`vm::Vm`] is the machine; [`layout`] its address map; [`boot`] and [`acpi`] what
//! direct kernel boot writes into guest memory; [`cpu`] the vCPU setup; [`serial`] and
//! [`console`] the console; [`virtio`] the devices. Everything that does not need KVM
//! (devices, tables, loader) is tested without it.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod console;
pub mod cpu;
pub mod emulate;
pub mod layout;
pub mod memory;
pub mod serial;
pub mod virtio;
pub mod vm;

pub use vm::{BootSpec, DiskConfig, NicConfig, Vm, VmConfig, VmError, VmExit, VmStopper};

//! A KVM virtual machine: memory, in-kernel interrupt controllers, devices on the port
//! and MMIO buses, and one thread per vCPU.
//!
//! [`Vm::new`] builds everything from a [`VmConfig`]; [`Vm::run`] starts the vCPU
//! threads and returns when the guest stops ([`VmExit`]), a vCPU fails ([`VmError`]),
//! or a [`VmStopper`] asks. Stopping kicks every vCPU thread out of `KVM_RUN` with a
//! real-time signal, repeated until each has left, so none is lost to the race between
//! checking the stop flag and entering the guest.

use super::acpi::{self, MmioSlot};
use super::boot;
use super::bus::{Bus, BusDevice};
use super::console::ConsoleOut;
use super::cpu;
use super::emulate::Insn;
use super::layout::*;
use super::memory::{self, GuestMem};
use super::serial::SerialDevice;
use super::virtio::balloon::{Balloon, BalloonHandle};
use super::virtio::block::Block;
use super::virtio::mmio::{reg, MmioTransport};
use super::virtio::net::{Net, Tap};
use super::virtio::VirtioDevice;
use crate::definition::CpuFeature;
use basalt_blockdev::BlockDev;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// How the guest starts.
#[derive(Debug, Clone)]
pub enum BootSpec {
    /// Linux boot protocol, 64-bit entry.
    Linux {
        /// bzImage or vmlinux.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Command line (the runner prepends nothing; say `console=ttyS0`).
        cmdline: String,
    },
    /// A small real-mode program (tests, benchmarks): `code` is copied to `load_addr`
    /// (below 64 KiB) and every vCPU starts there with `rsi` = its index.
    RealMode {
        /// Machine code.
        code: Vec<u8>,
        /// Load and entry address.
        load_addr: u16,
    },
    /// A small 64-bit program: loaded at `load_addr`, entered in long mode with the
    /// Linux boot protocol's page tables (first 4 GiB identity-mapped) on vCPU 0 only.
    LongMode {
        /// Machine code.
        code: Vec<u8>,
        /// Load and entry address (in RAM, outside the boot structures: 0x10000 up).
        load_addr: u64,
    },
}

/// A disk for the VM.
pub struct DiskConfig {
    /// Identifier (the guest sees it as the serial number).
    pub id: String,
    /// The backend.
    pub dev: Arc<dyn BlockDev>,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// A NIC for the VM.
pub struct NicConfig {
    /// Identifier.
    pub id: String,
    /// The TAP.
    pub tap: Tap,
    /// MAC address.
    pub mac: [u8; 6],
}

/// What the VM is made of.
pub struct VmConfig {
    /// vCPUs (1 to 64).
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// `MADV_MERGEABLE` guest memory.
    pub mergeable: bool,
    /// How it boots.
    pub boot: BootSpec,
    /// CPUID features to hide.
    pub hide_features: Vec<CpuFeature>,
    /// Where the serial console goes.
    pub console: ConsoleOut,
    /// Disks (virtio-blk), in order.
    pub disks: Vec<DiskConfig>,
    /// NICs (virtio-net), in order.
    pub nics: Vec<NicConfig>,
    /// Add a virtio-balloon.
    pub balloon: bool,
    /// The runtime that runs disk backends' futures (needed when there are disks).
    pub io: Option<tokio::runtime::Handle>,
}

/// Why the guest stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// A guest program wrote this byte to [`EXIT_PORT`].
    Exit(u8),
    /// ACPI S5 or a KVM shutdown event: the guest powered off.
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, KVM reset event).
    Reset,
    /// Triple fault.
    TripleFault,
    /// A vCPU halted with nothing to wake it (only without an in-kernel irqchip).
    Halted,
    /// The host asked ([`VmStopper`]).
    Stopped,
}

/// Why a VM could not be built or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed during setup.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// The step.
        what: String,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU setup.
    #[error("vCPU setup: {0}")]
    Cpu(#[from] cpu::CpuError),
    /// A device could not be created.
    #[error("device {id}: {reason}")]
    Device {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The configuration is unusable.
    #[error("bad VM configuration: {0}")]
    Config(String),
    /// A vCPU stopped with an error (emulation failure, failed entry...).
    #[error("vCPU {index}: {reason}")]
    Vcpu {
        /// Which vCPU.
        index: u8,
        /// What KVM said, with the registers.
        reason: String,
    },
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

type Outcome = Result<VmExit, VmError>;

/// Asks a running VM to stop (from a signal handler thread, the supervisor channel...).
#[derive(Clone)]
pub struct VmStopper {
    tx: mpsc::Sender<Outcome>,
}

impl VmStopper {
    /// Stops the VM; [`Vm::run`] returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        let _ = self.tx.send(Ok(VmExit::Stopped));
    }
}

/// The ACPI sleep/reset register port.
struct PowerPort {
    tx: mpsc::Sender<Outcome>,
}

impl BusDevice for PowerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v == acpi::RESET_VALUE {
            let _ = self.tx.send(Ok(VmExit::Reset));
        } else if v & (1 << 5) != 0 && (v >> 2) & 7 == acpi::S5_SLP_TYP {
            let _ = self.tx.send(Ok(VmExit::PowerOff));
        }
    }
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMem,
    vcpus: Vec<VcpuFd>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    balloon: Option<BalloonHandle>,
    tx: mpsc::Sender<Outcome>,
    rx: mpsc::Receiver<Outcome>,
    first_exit: Arc<OnceLock<Instant>>,
    _irqs: Vec<EventFd>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

impl Vm {
    /// Builds the VM: opens `/dev/kvm`, maps memory, creates the irqchip, PIT, devices
    /// and vCPUs, loads the guest.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > crate::definition::MAX_VCPUS {
            return Err(VmError::Config(format!("{} vCPUs", cfg.vcpus)));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        let mem_size = u64::from(cfg.memory_mib) << 20;
        let mem = memory::create(mem_size, cfg.mergeable)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Config(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps
            // for as long as the VmFd (they are dropped together).
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("map guest memory"))?;
        }
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;

        let (tx, rx) = mpsc::channel();
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let mut irqs = Vec::new();

        // COM1.
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device {
            id: "serial".into(),
            reason: e.to_string(),
        })?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("serial irqfd"))?;
        let serial_trigger = serial_irq.try_clone().map_err(|e| VmError::Device {
            id: "serial".into(),
            reason: e.to_string(),
        })?;
        irqs.push(serial_irq);
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_trigger,
            cfg.console.clone(),
        )));
        io_bus
            .insert(serial.clone(), u64::from(COM1_PORT), 8)
            .map_err(|e| VmError::Config(e.to_string()))?;
        io_bus
            .insert(
                Arc::new(Mutex::new(PowerPort { tx: tx.clone() })),
                u64::from(acpi::SLEEP_PORT),
                1,
            )
            .map_err(|e| VmError::Config(e.to_string()))?;

        // Virtio devices, one MMIO slot and GSI each.
        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        if !cfg.disks.is_empty() && cfg.io.is_none() {
            return Err(VmError::Config("disks need an I/O runtime".into()));
        }
        for d in cfg.disks {
            let Some(rt) = cfg.io.clone() else { break };
            devices.push((
                d.id.clone(),
                Box::new(Block::new(&d.id, d.dev, d.read_only, rt)),
            ));
        }
        for n in cfg.nics {
            devices.push((n.id.clone(), Box::new(Net::new(&n.id, n.tap, n.mac))));
        }
        let mut balloon = None;
        if cfg.balloon {
            let b = Balloon::new().map_err(|e| VmError::Device {
                id: "balloon".into(),
                reason: e.to_string(),
            })?;
            balloon = Some(b.handle());
            devices.push(("balloon".into(), Box::new(b)));
        }
        let mut slots = Vec::new();
        for (i, (id, dev)) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            let dev_err = |reason: String| VmError::Device {
                id: id.clone(),
                reason,
            };
            let t = MmioTransport::new(mem.clone(), dev).map_err(|e| dev_err(e.to_string()))?;
            vm.register_irqfd(t.irq().eventfd(), gsi)
                .map_err(kvm_err(format!("irqfd of {id}")))?;
            for (q, evt) in t.queue_evts().iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(kvm_err(format!("ioeventfd of {id}")))?;
            }
            mmio_bus
                .insert(Arc::new(Mutex::new(t)), base, VIRTIO_MMIO_SIZE)
                .map_err(|e| dev_err(e.to_string()))?;
            slots.push(MmioSlot {
                base,
                size: VIRTIO_MMIO_SIZE,
                irq: gsi,
            });
        }

        // Guest image and vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::new();
        let entry = match &cfg.boot {
            BootSpec::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let rsdp = acpi::write_tables(&mem, cfg.vcpus, &slots)?;
                let loaded =
                    boot::load_linux(&mem, mem_size, kernel, initrd.as_deref(), cmdline, rsdp)?;
                Some(loaded.entry)
            }
            BootSpec::RealMode { code, load_addr } => {
                if usize::from(*load_addr) + code.len() > 0x10000 {
                    return Err(VmError::Config(
                        "real-mode program must fit below 64 KiB".into(),
                    ));
                }
                vm_memory::Bytes::write_slice(
                    &mem,
                    code,
                    vm_memory::GuestAddress(u64::from(*load_addr)),
                )
                .map_err(|e| VmError::Config(e.to_string()))?;
                None
            }
            BootSpec::LongMode { code, load_addr } => {
                vm_memory::Bytes::write_slice(&mem, code, vm_memory::GuestAddress(*load_addr))
                    .map_err(|e| VmError::Config(e.to_string()))?;
                Some(*load_addr)
            }
        };
        for i in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err(format!("create vCPU {i}")))?;
            let mut cpuid = supported.clone();
            cpu::filter_cpuid(&mut cpuid, i, cfg.vcpus, &cfg.hide_features);
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            cpu::setup_lint(&vcpu)?;
            match (&cfg.boot, entry) {
                (BootSpec::Linux { .. } | BootSpec::LongMode { .. }, Some(entry)) => {
                    cpu::setup_msrs(&vcpu)?;
                    cpu::setup_fpu(&vcpu)?;
                    if i == 0 {
                        cpu::setup_long_mode(&vcpu, &mem, entry)?;
                    }
                }
                (BootSpec::RealMode { load_addr, .. }, _) => {
                    cpu::setup_real_mode(&vcpu, *load_addr, u64::from(i))?;
                    if i > 0 {
                        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                        })
                        .map_err(kvm_err("make AP runnable"))?;
                    }
                }
                _ => {}
            }
            vcpus.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            mem,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            balloon,
            tx,
            rx,
            first_exit: Arc::new(OnceLock::new()),
            _irqs: irqs,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The balloon's host handle, when the VM has one.
    pub fn balloon(&self) -> Option<BalloonHandle> {
        self.balloon.clone()
    }

    /// A function that feeds console input to the UART (for the attach socket).
    pub fn serial_input(&self) -> super::console::ConsoleInput {
        let serial = self.serial.clone();
        Arc::new(move |bytes: &[u8]| {
            let mut rest = bytes;
            // The FIFO holds 64 bytes; wait for the guest to drain it rather than drop.
            for _ in 0..1000 {
                let n = serial
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .input(rest);
                rest = &rest[n..];
                if rest.is_empty() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    /// A handle that stops the VM.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            tx: self.tx.clone(),
        }
    }

    /// When the first vCPU exit of the guest happened (filled in while running): how
    /// long the guest took to execute its first instruction that reaches the VMM.
    pub fn first_exit_probe(&self) -> Arc<OnceLock<Instant>> {
        self.first_exit.clone()
    }

    /// Runs the vCPUs until the guest stops, a vCPU fails or the stopper is used.
    pub fn run(self) -> Result<VmExit, VmError> {
        // A no-op handler: the signal only interrupts KVM_RUN (EINTR).
        let _ = register_signal_handler(kick_signal(), kick_handler);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let ctx = VcpuCtx {
                index: i as u8,
                io: self.io_bus.clone(),
                mmio: self.mmio_bus.clone(),
                tx: self.tx.clone(),
                stop: stop.clone(),
                first_exit: self.first_exit.clone(),
                mem: self.mem.clone(),
                trace: std::env::var("BASALT_VMM_TRACE_EXITS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            };
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || ctx.run(vcpu))
                .map_err(|e| VmError::Config(format!("cannot start vCPU thread: {e}")))?;
            handles.push(h);
        }
        // BASALT_VMM_SAMPLE_MS=N: kick the vCPUs every N ms so the exit trace shows where
        // a guest that makes no exits spends its time.
        if let Some(ms) = std::env::var("BASALT_VMM_SAMPLE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(ms));
                    for &t in &threads {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        // SAFETY: the vCPU threads are joined only after `stop` is set,
                        // which this loop checks before every kick.
                        unsafe {
                            libc::pthread_kill(t, kick_signal());
                        }
                    }
                }
            });
        }
        let outcome = self.rx.recv().unwrap_or(Ok(VmExit::Stopped));
        stop.store(true, Ordering::SeqCst);
        // Kick until every vCPU thread has left KVM_RUN and returned.
        while handles.iter().any(|h| !h.is_finished()) {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                // SAFETY: the pthread_t belongs to a thread we spawned and have not
                // joined, so it is valid; the signal has a no-op handler installed.
                unsafe {
                    libc::pthread_kill(h.as_pthread_t(), kick_signal());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for h in handles {
            let _ = h.join();
        }
        outcome
    }
}

/// Finishes an instruction KVM's emulator gave up on, when it is one of the few
/// [`super::emulate`] knows (int3, fwait, ldmxcsr, stmxcsr). Returns it, or `None`
/// when the failure must stand.
fn complete_unemulated(
    vcpu: &VcpuFd,
    mem: &GuestMem,
    internal: &kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13,
) -> Option<Insn> {
    // Emulation failure with instruction bytes: data[0] = flags (bit 0: bytes valid),
    // then insn_size (one byte) and up to 15 instruction bytes.
    if internal.suberror != 1 || internal.ndata < 3 || internal.data[0] & 1 == 0 {
        return None;
    }
    let size = (internal.data[1] & 0xff) as usize;
    let mut bytes = Vec::with_capacity(15);
    bytes.extend_from_slice(&internal.data[1].to_le_bytes()[1..]);
    bytes.extend_from_slice(&internal.data[2].to_le_bytes());
    bytes.truncate(size.min(15));
    let (insn, len) = super::emulate::decode(&bytes)?;
    let mut regs = vcpu.get_regs().ok()?;
    match insn {
        Insn::Int3 | Insn::Fwait => {}
        Insn::Ldmxcsr(op) | Insn::Stmxcsr(op) => {
            let sregs = vcpu.get_sregs().ok()?;
            let gva = super::emulate::linear(&op, &regs, len, sregs.fs.base, sregs.gs.base);
            let t = vcpu.translate_gva(gva).ok()?;
            if t.valid == 0 {
                return None;
            }
            let gpa = vm_memory::GuestAddress(t.physical_address);
            let mut fpu = vcpu.get_fpu().ok()?;
            if matches!(insn, Insn::Ldmxcsr(_)) {
                fpu.mxcsr = vm_memory::Bytes::read_obj::<u32>(mem, gpa).ok()?;
                vcpu.set_fpu(&fpu).ok()?;
            } else {
                vm_memory::Bytes::write_obj(mem, fpu.mxcsr, gpa).ok()?;
            }
        }
    }
    regs.rip += len as u64;
    vcpu.set_regs(&regs).ok()?;
    if insn == Insn::Int3 {
        let mut events = vcpu.get_vcpu_events().ok()?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.pending = 0;
        vcpu.set_vcpu_events(&events).ok()?;
    }
    Some(insn)
}

struct VcpuCtx {
    index: u8,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    tx: mpsc::Sender<Outcome>,
    stop: Arc<AtomicBool>,
    first_exit: Arc<OnceLock<Instant>>,
    mem: GuestMem,
    /// Print this many exits to stderr (`BASALT_VMM_TRACE_EXITS=N`), for diagnosing
    /// guests that do not boot.
    trace: u64,
}

impl VcpuCtx {
    fn fail(&self, vcpu: &VcpuFd, what: String) {
        let regs = vcpu
            .get_regs()
            .map(|r| {
                format!(
                    "rip={:#x} rsp={:#x} rax={:#x} rflags={:#x}",
                    r.rip, r.rsp, r.rax, r.rflags
                )
            })
            .unwrap_or_default();
        let sregs = vcpu
            .get_sregs()
            .map(|s| {
                format!(
                    "cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs.base={:#x}",
                    s.cr0, s.cr3, s.cr4, s.efer, s.cs.base
                )
            })
            .unwrap_or_default();
        let _ = self.tx.send(Err(VmError::Vcpu {
            index: self.index,
            reason: format!("{what}; {regs} {sregs}"),
        }));
    }

    fn done(&self, exit: VmExit) {
        let _ = self.tx.send(Ok(exit));
    }

    fn run(self, mut vcpu: VcpuFd) {
        let mut traced = 0u64;
        let mut completed = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let exit = vcpu.run();
            if !matches!(exit, Err(ref e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN)
            {
                let _ = self.first_exit.set(Instant::now());
            }
            let what = (traced < self.trace).then(|| format!("{exit:?}"));
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == EXIT_PORT {
                        let code = data.first().copied().unwrap_or(0);
                        self.done(VmExit::Exit(code));
                        return;
                    }
                    if port == I8042_PORT && data.first() == Some(&0xfe) {
                        self.done(VmExit::Reset);
                        return;
                    }
                    self.io.write(u64::from(port), data);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.io.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    self.done(VmExit::Halted);
                    return;
                }
                Ok(VcpuExit::Shutdown) => {
                    self.done(VmExit::TripleFault);
                    return;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let exit = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        VmExit::Reset
                    } else {
                        VmExit::PowerOff
                    };
                    self.done(exit);
                    return;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    self.fail(
                        &vcpu,
                        format!("KVM_EXIT_FAIL_ENTRY hardware reason {reason:#x} on cpu {cpu}"),
                    );
                    return;
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
                    // kvm_run union is the one KVM filled in.
                    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    if let Some(what) = complete_unemulated(&vcpu, &self.mem, &internal) {
                        completed += 1;
                        if completed.is_power_of_two() {
                            eprintln!(
                                "vmm: vCPU {}: KVM could not emulate {what:?}; completed in the VMM ({completed} so far)",
                                self.index
                            );
                        }
                        continue;
                    }
                    let n = (internal.ndata as usize).min(internal.data.len());
                    let data: Vec<String> = internal.data[..n]
                        .iter()
                        .map(|d| format!("{d:#x}"))
                        .collect();
                    let sub = match internal.suberror {
                        1 => "emulation failure",
                        2 => "simultaneous exception",
                        3 => "delivery event",
                        4 => "unexpected exit reason",
                        _ => "unknown",
                    };
                    self.fail(
                        &vcpu,
                        format!(
                            "KVM_EXIT_INTERNAL_ERROR suberror {} ({sub}) data [{}]",
                            internal.suberror,
                            data.join(", ")
                        ),
                    );
                    return;
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    self.fail(&vcpu, what);
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    self.fail(&vcpu, format!("KVM_RUN failed: {e}"));
                    return;
                }
            }
            if let Some(what) = what {
                traced += 1;
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                eprintln!("vcpu{} exit {traced}: {what} rip={rip:#x}", self.index);
            }
        }
    }
}

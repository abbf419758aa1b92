//! vCPU setup: CPUID, MSRs, registers for the two ways a guest starts (64-bit Linux
//! boot protocol, or real mode for small test programs), and the LAPIC's LINT pins.

use super::layout::*;
use crate::definition::CpuFeature;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMem;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which setup step.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Page tables or GDT could not be written to guest memory.
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// Bits of CPUID leaf 1 ECX.
mod ecx1 {
    pub const PCID: u32 = 1 << 17;
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const CX16: u32 = 1 << 13;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Adjusts the host-supported CPUID for vCPU `index` of `count`, hiding `hide`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8, hide: &[CpuFeature]) {
    let has = |f: CpuFeature| hide.contains(&f);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, CLFLUSH size 8 qwords.
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= ecx1::HYPERVISOR;
                if has(CpuFeature::Cx16) {
                    e.ecx &= !ecx1::CX16;
                }
                if has(CpuFeature::Xsave) {
                    e.ecx &= !(ecx1::XSAVE | ecx1::OSXSAVE | ecx1::AVX);
                }
                if has(CpuFeature::Avx) {
                    e.ecx &= !ecx1::AVX;
                }
                if has(CpuFeature::Rdrand) {
                    e.ecx &= !ecx1::RDRAND;
                }
                if has(CpuFeature::TscDeadline) {
                    e.ecx &= !ecx1::TSC_DEADLINE;
                }
                if has(CpuFeature::X2apic) {
                    e.ecx &= !ecx1::X2APIC;
                }
                if has(CpuFeature::Pcid) {
                    e.ecx &= !ecx1::PCID;
                }
            }
            7 if e.index == 0 => {
                if has(CpuFeature::Avx) || has(CpuFeature::Xsave) {
                    // AVX2 (EBX.5), AVX-512 F/DQ/CD/BW/VL... (EBX.16,17,28,30,31).
                    e.ebx &=
                        !((1 << 5) | (1 << 16) | (1 << 17) | (1 << 28) | (1 << 30) | (1 << 31));
                    e.ecx &= !((1 << 1) | (1 << 6) | (1 << 11) | (1 << 12));
                }
                if has(CpuFeature::Rdrand) {
                    e.ebx &= !(1 << 18); // RDSEED
                }
            }
            0xb => {
                e.edx = u32::from(index);
            }
            0xd if has(CpuFeature::Xsave) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// Boot MSRs (as Firecracker sets them): SYSENTER/SYSCALL state cleared, TSC 0, fast
/// strings on.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| CpuError::Kvm {
        what: "build MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("set boot MSRs"))?;
    if n != list.len() {
        // Some MSR was refused (a nested hypervisor may not emulate all of them). Linux
        // rewrites these itself; carry on.
    }
    Ok(())
}

/// FPU defaults (FCW 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU"))
}

/// LINT0 as ExtINT, LINT1 as NMI, as the MP spec's virtual wire mode wants.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    let get = |l: &kvm_lapic_state, off: usize| {
        let b = &l.regs[off..off + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    };
    let set = |l: &mut kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    let lvt0 = get(&lapic, APIC_LVT0);
    set(
        &mut lapic,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = get(&lapic, APIC_LVT1);
    set(
        &mut lapic,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let get_base = |e: u64| {
        ((e & 0xff00_0000_0000_0000) >> 32)
            | ((e & 0x0000_00ff_0000_0000) >> 16)
            | ((e & 0x0000_0000_ffff_0000) >> 16)
    };
    let get_limit =
        |e: u64| ((((e) & 0x000f_0000_0000_0000) >> 32) | ((e) & 0x0000_0000_0000_ffff)) as u32;
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Registers and segments for the 64-bit Linux boot protocol: long mode, paging with an
/// identity map of the first 4 GiB, `rsi` at the zero page, `rip` at `entry`.
pub fn setup_long_mode(vcpu: &VcpuFd, mem: &GuestMem, entry: u64) -> Result<(), CpuError> {
    // GDT: null, code64, data, TSS.
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    // Identity map the first 4 GiB (RAM below the gap and the MMIO gap) with 2 MiB
    // pages: one PD page per GiB.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const X86_CR0_PE: u64 = 0x1;
    const X86_CR0_PG: u64 = 0x8000_0000;
    const X86_CR4_PAE: u64 = 0x20;
    const EFER_LME: u64 = 0x100;
    const EFER_LMA: u64 = 0x400;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

/// Real mode at `cs:ip = 0:entry` (entry below 64 KiB), with `rsi` = `arg` so several
/// vCPUs running one program can tell themselves apart.
pub fn setup_real_mode(vcpu: &VcpuFd, entry: u16, arg: u64) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    sregs.es.base = 0;
    sregs.es.selector = 0;
    sregs.ss.base = 0;
    sregs.ss.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: u64::from(entry),
        rsp: 0x7c00,
        rsi: arg,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.l, code.present, code.type_, code.selector),
            (1, 1, 0xb, 8)
        );
        assert_eq!(code.limit, 0xfffff);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.l, data.type_), (1, 0, 3));
    }
}

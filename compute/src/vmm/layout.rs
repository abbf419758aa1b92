//! The guest physical address map of the built-in runner (x86_64), after Firecracker's.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page (boot_params)    0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4   0x0000_a000 PDPT    0x0000_b000  4 PDs (identity map of 4 GiB)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  end of low RAM (EBDA above)
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, MADT, DSDT (up to 0x000f_ffff)
//! 0x0010_0000  kernel (bzImage protected-mode part or vmlinux segments); RAM goes on
//!              to min(memory, 3 GiB), then resumes at 4 GiB
//! 0xc000_0000  MMIO gap: virtio-mmio slots at 0xd000_0000 + 4 KiB * n
//! 0xfec0_0000  IOAPIC     0xfee0_0000  local APIC
//! ```
//!
//! Port I/O: COM1 at 0x3f8 (IRQ 4), an exit port at [`EXIT_PORT`] that guest test
//! programs write to stop the VM, and the i8042 reset (port 0x64, value 0xfe) that Linux
//! uses for `reboot`.

/// Start of the GDT.
pub const GDT_START: u64 = 0x500;
/// Start of the (empty) IDT.
pub const IDT_START: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 page.
pub const PML4_START: u64 = 0x9000;
/// PDPT page.
pub const PDPTE_START: u64 = 0xa000;
/// The first of four PD pages (one per GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of usable low memory (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP; ACPI tables follow it.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded, and where high RAM starts in the e820 map.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// COM1 port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt.
pub const COM1_IRQ: u32 = 4;
/// The first GSI given to a virtio device.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Port a guest program writes to stop the VM; the byte written is the exit code.
pub const EXIT_PORT: u16 = 0x501;
/// i8042 command port (0xfe = reset).
pub const I8042_PORT: u16 = 0x64;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}

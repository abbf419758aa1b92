//! ACPI tables for direct kernel boot: RSDP, XSDT, FADT (hardware-reduced), MADT (one
//! local APIC per vCPU and the IOAPIC) and a DSDT that describes each virtio-mmio slot
//! as an `LNRO0005` device, which is how the Linux `virtio_mmio` driver finds devices
//! when `VIRTIO_MMIO_CMDLINE_DEVICES` is off (Debian's kernels). This is Firecracker's
//! approach. Power-off uses the FADT sleep control register at [`SLEEP_PORT`]: Linux
//! writes `SLP_TYP = 5 | SLP_EN` there for S5, and the runner stops the VM; reset uses
//! the FADT reset register on the same port.

use super::layout::*;
use super::memory::GuestMem;
use acpi_tables::{aml, fadt, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress};

/// Port of the sleep control/status and reset registers.
pub const SLEEP_PORT: u16 = 0x3c0;
/// The value the reset register takes.
pub const RESET_VALUE: u8 = 0x0f;
/// S5 sleep type (the `_S5_` package).
pub const S5_SLP_TYP: u8 = 5;

const OEM_ID: [u8; 6] = *b"BASALT";

/// A virtio-mmio slot to describe.
#[derive(Debug, Clone, Copy)]
pub struct MmioSlot {
    /// Base address.
    pub base: u64,
    /// Size.
    pub size: u64,
    /// GSI.
    pub irq: u32,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the 128 KiB reserved")]
    TooLarge(u64),
    /// Guest memory rejected the write.
    #[error("cannot write ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn dsdt(slots: &[MmioSlot]) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: Package { 5, 0, 0, 0 }? Linux reads element 0 as SLP_TYPa.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let names: Vec<String> = (0..slots.len()).map(|i| format!("V{i:03}")).collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let uids: Vec<aml::Name> = (0..slots.len())
        .map(|i| aml::Name::new("_UID".into(), &i))
        .collect();
    let mems: Vec<aml::Memory32Fixed> = slots
        .iter()
        .map(|s| aml::Memory32Fixed::new(true, s.base as u32, s.size as u32))
        .collect();
    let irqs: Vec<aml::Interrupt> = slots
        .iter()
        .map(|s| aml::Interrupt::new(true, true, false, false, s.irq))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = (0..slots.len())
        .map(|i| aml::ResourceTemplate::new(vec![&mems[i], &irqs[i]]))
        .collect();
    let crs_names: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devices: Vec<aml::Device> = (0..slots.len())
        .map(|i| {
            aml::Device::new(
                names[i].as_str().into(),
                vec![&hid, &uids[i], &cca, &crs_names[i]],
            )
        })
        .collect();
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"BSLTDSDT", 1);
    for b in body {
        sdt.append(b);
    }
    sdt.as_slice().to_vec()
}

/// Writes the tables at [`ACPI_START`]; returns the RSDP address (for `boot_params`).
pub fn write_tables(mem: &GuestMem, vcpus: u8, slots: &[MmioSlot]) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        next = (next + bytes.len() as u64).next_multiple_of(16);
        if next > ACPI_END {
            return Err(AcpiError::TooLarge(next - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        Ok(at)
    };

    let dsdt_addr = place(&dsdt(slots))?;

    let mut f = fadt::FADTBuilder::new(OEM_ID, *b"BSLTFACP", 1)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::ResetRegSup);
    let port = acpi_tables::gas::GAS::new(
        acpi_tables::gas::AddressSpace::SystemIo,
        8,
        0,
        acpi_tables::gas::AccessSize::ByteAccess,
        u64::from(SLEEP_PORT),
    );
    f.sleep_control_reg = port;
    f.sleep_status_reg = port;
    f.reset_reg = port;
    f.reset_value = RESET_VALUE;
    let mut fadt_bytes = Vec::new();
    f.finalize().to_aml_bytes(&mut fadt_bytes);
    let fadt_addr = place(&fadt_bytes)?;

    let mut m = madt::MADT::new(
        OEM_ID,
        *b"BSLTAPIC",
        1,
        madt::LocalInterruptController::Address(APIC_ADDR),
    );
    for i in 0..vcpus {
        m.add_structure(madt::ProcessorLocalApic::new(
            i,
            i,
            madt::EnabledStatus::Enabled,
        ));
    }
    m.add_structure(madt::IoApic::new(0, IOAPIC_ADDR, 0));
    let mut madt_bytes = Vec::new();
    m.to_aml_bytes(&mut madt_bytes);
    let madt_addr = place(&madt_bytes)?;

    let mut x = XSDT::new(OEM_ID, *b"BSLTXSDT", 1);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    x.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);
    mem.write_slice(&rsdp_bytes, GuestAddress(rsdp_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_consistent() {
        let mem = super::super::memory::create(64 << 20, false).expect("mem");
        let slots = [
            MmioSlot {
                base: VIRTIO_MMIO_START,
                size: 0x1000,
                irq: 5,
            },
            MmioSlot {
                base: VIRTIO_MMIO_START + 0x1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let rsdp = write_tables(&mem, 2, &slots).expect("tables");
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).expect("rsdp");
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[0..20]));
        assert!(checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().expect("8"));
        let mut h = [0u8; 36];
        mem.read_slice(&mut h, GuestAddress(xsdt)).expect("xsdt");
        assert_eq!(&h[0..4], b"XSDT");
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
        let mut x = vec![0u8; len];
        mem.read_slice(&mut x, GuestAddress(xsdt)).expect("xsdt");
        assert!(checksum_ok(&x));
        let mut sigs = Vec::new();
        for e in x[36..].chunks(8) {
            let a = u64::from_le_bytes(e.try_into().expect("8"));
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(a)).expect("table");
            let l = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
            let mut t = vec![0u8; l];
            mem.read_slice(&mut t, GuestAddress(a)).expect("table");
            assert!(checksum_ok(&t), "{:?}", &h[0..4]);
            sigs.push(h[0..4].to_vec());
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let d = dsdt(&slots);
        assert!(checksum_ok(&d));
        assert!(d.windows(8).any(|w| w == b"LNRO0005"));
    }
}

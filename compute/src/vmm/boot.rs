//! Direct kernel boot (Linux x86 boot protocol, 64-bit entry): the kernel (bzImage or
//! vmlinux ELF) through linux-loader, the initrd at the top of low memory, the command
//! line, and the zero page with the e820 map and the RSDP address.

use super::layout::*;
use super::memory::GuestMem;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress};

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {}: {reason}", path.display())]
    Kernel {
        /// The kernel.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit.
    #[error("initrd of {size} bytes does not fit between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// End of usable low memory.
        limit: u64,
    },
    /// Guest memory rejected a write.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where execution starts.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
    /// End of the loaded kernel.
    pub kernel_end: u64,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads kernel, initrd and command line, and writes the zero page.
pub fn load_linux(
    mem: &GuestMem,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Loaded, BootError> {
    let mut f = open(kernel)?;
    let mut magic = [0u8; 4];
    let file_err = |source| BootError::File {
        path: kernel.to_path_buf(),
        source,
    };
    f.read_exact(&mut magic).map_err(file_err)?;
    f.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let kerr = |e: loader::Error| BootError::Kernel {
        path: kernel.to_path_buf(),
        reason: e.to_string(),
    };
    let (res, entry) = if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        let entry = r.kernel_load.raw_value();
        (r, entry)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?;
        // The 64-bit entry of a bzImage is 0x200 past the start of its protected-mode
        // part (Documentation/x86/boot.rst).
        let entry = r.kernel_load.raw_value() + 0x200;
        (r, entry)
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let lowmem_end = mem_size.min(MMIO_GAP_START);
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;

    if let Some(initrd) = initrd {
        let mut f = open(initrd)?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).map_err(|source| BootError::File {
            path: initrd.to_path_buf(),
            source,
        })?;
        let size = data.len() as u64;
        let max = if params.hdr.initrd_addr_max != 0 {
            (u64::from(params.hdr.initrd_addr_max) + 1).min(lowmem_end)
        } else {
            lowmem_end
        };
        let addr = max.checked_sub(size).map(|a| a & !0xfff);
        match addr {
            Some(a) if a >= res.kernel_end => {
                mem.write_slice(&data, GuestAddress(a))?;
                params.hdr.ramdisk_image = a as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            _ => {
                return Err(BootError::InitrdTooLarge {
                    size,
                    kernel_end: res.kernel_end,
                    limit: max,
                })
            }
        }
    }

    let mut e820 = vec![(0u64, EBDA_START), (HIMEM_START, lowmem_end - HIMEM_START)];
    if mem_size > MMIO_GAP_START {
        e820.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1, // E820_RAM
        };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = rsdp;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(Loaded {
        entry,
        kernel_end: res.kernel_end,
    })
}

/// Wraps a flat 64-bit program in a minimal ELF executable whose one segment loads at
/// `addr` (at least 1 MiB) with its entry there: what the loader's vmlinux path accepts.
/// Tests and benchmarks boot such "kernels" through the same path as a real vmlinux.
pub fn flat_elf(code: &[u8], addr: u64) -> Vec<u8> {
    const PAGE: usize = 0x1000;
    let mut f = vec![0u8; PAGE];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&addr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    f[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&(PAGE as u64).to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&(PAGE as u64).to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

/// A 64-bit program for [`flat_elf`]: prints `text` on COM1, then powers the VM off
/// through the ACPI sleep register (S5), or executes `ud2` (a crash: triple fault)
/// when `crash` is set.
pub fn console_program(text: &[u8], crash: bool) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b ; out dx, al
    }
    if crash {
        c.extend_from_slice(&[0x0f, 0x0b]); // ud2
    } else {
        let port = super::acpi::SLEEP_PORT.to_le_bytes();
        let slp = (super::acpi::S5_SLP_TYP << 2) | (1 << 5);
        c.extend_from_slice(&[0x66, 0xba, port[0], port[1], 0xb0, slp, 0xee]); // mov dx, port ; mov al, slp ; out dx, al
    }
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt ; jmp hlt
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_elf_loads_at_its_address() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("k.elf");
        std::fs::write(&path, flat_elf(&console_program(b"ok", false), 0x20_0000)).expect("write");
        let mem = super::super::memory::create(16 << 20, false).expect("mem");
        let loaded =
            load_linux(&mem, 16 << 20, &path, None, "console=ttyS0", ACPI_START).expect("load");
        assert_eq!(loaded.entry, 0x20_0000);
        let first: u32 = mem.read_obj(GuestAddress(0x20_0000)).expect("read");
        assert_eq!(first.to_le_bytes(), [0x66, 0xba, 0xf8, 0x03]);
        let params: boot_params = mem
            .read_obj(GuestAddress(ZERO_PAGE_START))
            .expect("zero page");
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(params.e820_entries, 2);
    }
}

//! Guest memory: anonymous private mappings, one per RAM region, ready for KSM and
//! userfaultfd.
//!
//! - **KSM**: every region is `madvise(MADV_MERGEABLE)` when the definition asks
//!   (`memory.mergeable`), so `ksmd` may merge identical pages across VMs.
//! - **userfaultfd**: regions are plain `MAP_PRIVATE | MAP_ANONYMOUS` mappings with
//!   page-aligned starts and sizes and no `MAP_POPULATE`, which is what
//!   `UFFDIO_REGISTER` (missing-page mode) needs; a later snapshot-restore or
//!   post-copy path can register [`region_ranges`] as they are.
//! - **Balloon**: pages the guest gives back are dropped with `MADV_DONTNEED`
//!   ([`discard_range`]), which returns them to the host at once and reads zeroes later.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory as the runner uses it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Maps `size` bytes of guest RAM laid out by [`super::layout::ram_regions`];
/// `mergeable` marks it for KSM.
pub fn create(size: u64, mergeable: bool) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = super::layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size,
        reason: e.to_string(),
    })?;
    if mergeable {
        for region in mem.iter() {
            if let Ok(host) = mem.get_host_address(region.start_addr()) {
                // SAFETY: the range is exactly one mapping owned by `mem`; MADV_MERGEABLE
                // changes no contents. A failure (KSM compiled out) is harmless.
                unsafe {
                    libc::madvise(host.cast(), region.len() as usize, libc::MADV_MERGEABLE);
                }
            }
        }
    }
    Ok(mem)
}

/// `(guest address, host address, length)` of each region, for userfaultfd
/// registration or dumping.
pub fn region_ranges(mem: &GuestMem) -> Vec<(u64, usize, u64)> {
    mem.iter()
        .filter_map(|r| {
            let host = mem.get_host_address(r.start_addr()).ok()?;
            Some((r.start_addr().raw_value(), host as usize, r.len()))
        })
        .collect()
}

/// Drops the host pages behind `[addr, addr + len)` (balloon inflation). The range must
/// lie in one region; whole pages only.
pub fn discard_range(mem: &GuestMem, addr: GuestAddress, len: u64) -> bool {
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    let end = addr.checked_add(len);
    if end.is_none_or(|e| e > region.last_addr().unchecked_add(1)) {
        return false;
    }
    if !addr.raw_value().is_multiple_of(4096) || !len.is_multiple_of(4096) {
        return false;
    }
    let Ok(host) = mem.get_host_address(addr) else {
        return false;
    };
    // SAFETY: the range lies inside one private anonymous mapping owned by `mem`;
    // MADV_DONTNEED makes it read as zeroes, which is what a balloon page may be.
    unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn maps_and_discards() {
        let mem = create(8 << 20, true).expect("mem");
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x10000))
            .expect("write");
        assert!(discard_range(&mem, GuestAddress(0x10000), 4096));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x10000)).expect("read"), 0);
        assert!(!discard_range(&mem, GuestAddress(0x10001), 4096));
        assert!(!discard_range(&mem, GuestAddress(8 << 20), 4096));
        assert_eq!(region_ranges(&mem).len(), 1);
    }
}

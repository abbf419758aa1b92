/// Size and shape of a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes: the unit of addressing and of every I/O (512 or 4096
    /// for disks; arrays and LUNs choose theirs).
    pub block_size: u32,
    /// Physical block size in bytes: writes smaller than this may be read-modify-write
    /// inside the device. A multiple of `block_size`.
    pub physical_block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Preferred I/O size in bytes (the stripe width of an array), 0 when unknown.
    pub optimal_io_size: u32,
    /// The largest single request in bytes the device accepts, 0 for no limit. Larger
    /// requests are split by the caller.
    pub max_io_bytes: u32,
    /// What the device can do.
    pub capabilities: Capabilities,
}

impl Geometry {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// Optional abilities of a block device. Front ends consult these before advertising a
/// feature (SCSI LBPME, NBD SEND_TRIM), as SPDK's `io_type_supported` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `discard` deallocates space.
    pub discard: bool,
    /// Discarded blocks read back as zeroes (SCSI LBPRZ).
    pub discard_zeroes: bool,
    /// `write_zeroes` is fast (no zero buffers are written).
    pub fast_zeroes: bool,
    /// The device has a volatile write cache, so `flush` matters.
    pub volatile_cache: bool,
    /// The device rejects writes.
    pub read_only: bool,
}

//! Fixtures shared by the integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use basalt_blockdev::fault::FaultDev;
use basalt_blockdev::{BlockDev, MemDev, SharedBlockDev};
use basalt_raid::{Array, ArrayConfig, Device, Level};
use std::sync::Arc;

/// Member size used by most tests.
pub const MEMBER: u64 = 24 << 20;

pub fn mem(bytes: u64) -> Arc<MemDev> {
    Arc::new(MemDev::new(bytes / 512, 512))
}

/// `n` fault injectors over memory, write cache off unless `cache`.
pub fn fault_members(n: usize, bytes: u64, cache: bool) -> Vec<Arc<FaultDev>> {
    (0..n)
        .map(|i| {
            let f = FaultDev::with_seed(mem(bytes), i as u64 + 1);
            f.set_write_cache(cache);
            Arc::new(f)
        })
        .collect()
}

pub fn devices(fs: &[Arc<FaultDev>]) -> Vec<Device> {
    fs.iter()
        .enumerate()
        .map(|(i, f)| Device::new(format!("d{i}"), f.clone() as SharedBlockDev))
        .collect()
}

pub fn members_for(level: Level) -> usize {
    match level {
        Level::Raid0 => 3,
        Level::Raid1 => 3,
        Level::Raid10 => 4,
        Level::Raid5 => 4,
        Level::Raid6 => 5,
    }
}

pub const LEVELS: [Level; 5] = [
    Level::Raid0,
    Level::Raid1,
    Level::Raid10,
    Level::Raid5,
    Level::Raid6,
];

pub async fn make(level: Level, chunk: u32, fs: &[Arc<FaultDev>]) -> Arc<Array> {
    Array::create(
        ArrayConfig::new("t", level).chunk(chunk),
        devices(fs),
        vec![],
    )
    .await
    .expect("create")
}

/// A deterministic pseudo-random pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub async fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let cap = dev.geometry().capacity_bytes();
    let mut out = Vec::with_capacity(cap as usize);
    let mut at = 0;
    while at < cap {
        let n = (cap - at).min(4 << 20);
        out.extend_from_slice(&dev.read(at, n as usize).await.expect("read"));
        at += n;
    }
    out
}

/// First differing byte, for messages.
pub fn diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

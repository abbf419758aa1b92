//! The [`BlockDev`] conformance suite: every contract on the trait, checked against any
//! implementation.
//!
//! Available to this crate's tests and, with the `test-utils` feature, to every crate that
//! implements [`BlockDev`] (arrays, LUNs, the iSCSI initiator), the way virtio-queue ships
//! its mock driver. A failed check panics with a message that names the device, the check
//! and the first differing byte, like any assertion.
//!
//! ```no_run
//! # async fn demo() {
//! use basalt_blockdev::{conformance, MemDev, SharedBlockDev};
//! use std::sync::Arc;
//! conformance::run("MemDev", || async {
//!     Arc::new(MemDev::new(32 << 11, 512)) as SharedBlockDev
//! })
//! .await;
//! # }
//! ```
//!
//! Requirements on the device: writable, at least [`MIN_CAPACITY`] bytes, reads of
//! never-written blocks return zeroes when it claims `discard_zeroes`. The suite needs a
//! multi-threaded tokio runtime only for realism; it also runs on a current-thread one.
//! Each check gets a fresh device from the factory, so checks cannot hide each other's
//! bugs (and a factory for a real disk must hand out a zeroed one, or one that does not
//! claim `discard_zeroes`).

use crate::rng::SplitMix64;
use crate::{
    BlockDev, BlockError, CompareOutcome, ExtentKind, SharedBlockDev, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;
use tokio::task::JoinSet;

/// The smallest device the suite can run on.
pub const MIN_CAPACITY: u64 = 16 << 20;

/// Runs every check, each on a fresh device from `make`. `name` appears in the progress
/// lines and in failure messages.
pub async fn run<F, Fut>(name: &str, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = SharedBlockDev>,
{
    macro_rules! check {
        ($f:ident) => {{
            let dev = make().await;
            $f(name, dev).await;
            println!("conformance {name}: {} ok", stringify!($f));
        }};
    }
    check!(geometry_is_sane);
    check!(unwritten_blocks_read_zero);
    check!(read_after_write);
    check!(misaligned_requests_are_rejected);
    check!(out_of_range_requests_are_rejected);
    check!(discard);
    check!(write_zeroes);
    check!(compare_and_write);
    check!(compare_and_write_is_atomic);
    check!(fua_and_flush);
    check!(concurrent_disjoint_writers);
    check!(large_io);
    check!(many_small_ios_in_flight);
    check!(unaligned_buffers);
    check!(block_status);
}

/// `len` bytes of a pattern derived from `seed`.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    SplitMix64::new(seed).fill(&mut v);
    // Never all zeroes by accident, and distinct from zeroes in the first byte, so a
    // missing write is obvious.
    if let Some(b) = v.first_mut() {
        *b |= 1;
    }
    Bytes::from(v)
}

/// Reads `[offset, offset + expected.len())` and panics with the first difference.
pub async fn assert_reads(dev: &dyn BlockDev, offset: u64, expected: &[u8], what: &str) {
    let got = dev
        .read(offset, expected.len())
        .await
        .unwrap_or_else(|e| panic!("{what}: read at {offset} failed: {e}"));
    assert_eq!(got.len(), expected.len(), "{what}: read length");
    if let Some(at) = crate::first_difference(&got, expected) {
        let at = at as usize;
        panic!(
            "{what}: byte {} (offset {} + {at}) is {:#04x}, expected {:#04x}",
            offset + at as u64,
            offset,
            got[at],
            expected[at]
        );
    }
}

fn bs(dev: &dyn BlockDev) -> u64 {
    u64::from(dev.geometry().block_size)
}

fn zeroes(len: u64) -> Vec<u8> {
    vec![0u8; len as usize]
}

async fn write_ok(dev: &dyn BlockDev, offset: u64, data: Bytes, what: &str) {
    let len = data.len();
    dev.write(offset, data, WriteFlags::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: write at {offset} len {len} failed: {e}"));
}

/// Block size a power of two of at least 512, physical block size a multiple of it,
/// capacity at least [`MIN_CAPACITY`], writable.
pub async fn geometry_is_sane(name: &str, dev: SharedBlockDev) {
    let g = dev.geometry();
    assert!(
        g.block_size.is_power_of_two() && g.block_size >= 512,
        "{name}: block size {}",
        g.block_size
    );
    assert!(
        g.physical_block_size >= g.block_size && g.physical_block_size.is_multiple_of(g.block_size),
        "{name}: physical block size {} vs {}",
        g.physical_block_size,
        g.block_size
    );
    assert!(
        g.capacity_bytes() >= MIN_CAPACITY,
        "{name}: the suite needs {MIN_CAPACITY} bytes, the device has {}",
        g.capacity_bytes()
    );
    assert!(
        !g.capabilities.read_only,
        "{name}: the suite needs a writable device"
    );
    assert!(
        !g.capabilities.discard_zeroes || g.capabilities.discard,
        "{name}: discard_zeroes without discard"
    );
    assert_eq!(g, dev.geometry(), "{name}: geometry changed between calls");
}

/// Blocks never written read as zeroes (when the device claims `discard_zeroes`), at the
/// start, the middle and the very end.
pub async fn unwritten_blocks_read_zero(name: &str, dev: SharedBlockDev) {
    let g = dev.geometry();
    if !g.capabilities.discard_zeroes {
        println!("conformance {name}: device does not promise zeroes; skipping");
        return;
    }
    let bs = bs(&*dev);
    let cap = g.capacity_bytes();
    for (off, len) in [(0, bs), (cap / 2 / bs * bs, 1 << 20), (cap - bs, bs)] {
        assert_reads(&*dev, off, &zeroes(len), &format!("{name}: unwritten")).await;
    }
}

/// A write is visible to later reads, at many sizes and offsets, and touches nothing
/// around it.
pub async fn read_after_write(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let cap = dev.geometry().capacity_bytes();
    let zeroed = dev.geometry().capabilities.discard_zeroes;
    let sizes = [bs, 2 * bs, 7 * bs, 64 << 10, (1 << 20) + bs];
    let mut seed = 1;
    for size in sizes {
        // Offsets: the start, one block in, an odd block in the middle, flush against
        // the end.
        let mid = ((cap / 3 / bs) | 1) * bs;
        for off in [0, bs, mid, cap - size] {
            // Surround the target with a known background so a write that spills over
            // is caught, and so is a short one.
            let lo = off.saturating_sub(bs);
            let hi = (off + size + bs).min(cap);
            let background = pattern(seed + 1000, (hi - lo) as usize);
            write_ok(&*dev, lo, background.clone(), name).await;
            let data = pattern(seed, size as usize);
            write_ok(&*dev, off, data.clone(), name).await;
            let mut expect = background.to_vec();
            let at = (off - lo) as usize;
            expect[at..at + size as usize].copy_from_slice(&data);
            let what = format!("{name}: read-after-write size {size} offset {off}");
            assert_reads(&*dev, lo, &expect, &what).await;
            // Rewrite in place and read again: the second write wins.
            let data2 = pattern(seed + 7, size as usize);
            write_ok(&*dev, off, data2.clone(), name).await;
            assert_reads(&*dev, off, &data2, &what).await;
            seed += 1;
        }
    }
    if zeroed {
        // A block between written ranges that was never written still reads zero.
        let hole = ((cap / 3 / bs) | 1) * bs - 4 * bs;
        assert_reads(&*dev, hole, &zeroes(bs), &format!("{name}: untouched hole")).await;
    }
}

/// Requests not aligned to the block size fail with `Misaligned` and change nothing.
pub async fn misaligned_requests_are_rejected(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let half = bs / 2;
    let before = pattern(11, 4 * bs as usize);
    write_ok(&*dev, 0, before.clone(), name).await;
    let other = pattern(12, bs as usize);
    let no = WriteFlags::default();
    let zf = ZeroFlags::default();
    let what = |op: &str| format!("{name}: misaligned {op}");
    let misaligned = |r: &Result<(), BlockError>| matches!(r, Err(BlockError::Misaligned { .. }));

    let r = dev.write(half, other.clone(), no).await;
    assert!(misaligned(&r), "{}: {r:?}", what("write offset"));
    let r = dev.write(0, other.slice(..half as usize), no).await;
    assert!(misaligned(&r), "{}: {r:?}", what("write length"));
    let r = dev.read(half, bs as usize).await.map(|_| ());
    assert!(misaligned(&r), "{}: {r:?}", what("read offset"));
    let r = dev.read(0, (bs + half) as usize).await.map(|_| ());
    assert!(misaligned(&r), "{}: {r:?}", what("read length"));
    let r = dev.discard(half, bs).await;
    assert!(misaligned(&r), "{}: {r:?}", what("discard"));
    let r = dev.discard(0, half).await;
    assert!(misaligned(&r), "{}: {r:?}", what("discard length"));
    let r = dev.write_zeroes(half, bs, zf).await;
    assert!(misaligned(&r), "{}: {r:?}", what("write_zeroes"));
    let r = dev.write_zeroes(bs, half, zf).await;
    assert!(misaligned(&r), "{}: {r:?}", what("write_zeroes length"));
    let cmp = before.slice(..bs as usize);
    let r = dev
        .compare_and_write(half, cmp.clone(), other.clone(), no)
        .await
        .map(|_| ());
    assert!(misaligned(&r), "{}: {r:?}", what("compare_and_write"));
    let r = dev
        .compare_and_write(
            0,
            cmp.slice(..half as usize),
            other.slice(..half as usize),
            no,
        )
        .await
        .map(|_| ());
    assert!(
        misaligned(&r),
        "{}: {r:?}",
        what("compare_and_write length")
    );
    // Buffers of different lengths are a misuse, not a miscompare.
    let r = dev
        .compare_and_write(0, cmp.clone(), pattern(13, 2 * bs as usize), no)
        .await;
    assert!(
        matches!(r, Err(BlockError::InvalidRequest(_))),
        "{name}: compare_and_write with unequal buffers: {r:?}"
    );
    assert_reads(&*dev, 0, &before, &what("requests changed data")).await;
}

/// Requests past the end (including ones whose end overflows u64) fail with
/// `OutOfRange` and change nothing.
pub async fn out_of_range_requests_are_rejected(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let cap = dev.geometry().capacity_bytes();
    let last = pattern(21, bs as usize);
    write_ok(&*dev, cap - bs, last.clone(), name).await;
    let no = WriteFlags::default();
    let zf = ZeroFlags::default();
    let far = u64::MAX / bs * bs;
    let oor = |r: &Result<(), BlockError>| matches!(r, Err(BlockError::OutOfRange { .. }));
    let two = pattern(22, 2 * bs as usize);

    for off in [cap, far] {
        let r = dev.write(off, last.clone(), no).await;
        assert!(oor(&r), "{name}: write at {off}: {r:?}");
        let r = dev.read(off, bs as usize).await.map(|_| ());
        assert!(oor(&r), "{name}: read at {off}: {r:?}");
        let r = dev.discard(off, bs).await;
        assert!(oor(&r), "{name}: discard at {off}: {r:?}");
        let r = dev.write_zeroes(off, bs, zf).await;
        assert!(oor(&r), "{name}: write_zeroes at {off}: {r:?}");
        let r = dev
            .compare_and_write(off, last.clone(), last.clone(), no)
            .await
            .map(|_| ());
        assert!(oor(&r), "{name}: compare_and_write at {off}: {r:?}");
    }
    // Straddling the end: starts inside, ends outside.
    let r = dev.write(cap - bs, two.clone(), no).await;
    assert!(oor(&r), "{name}: write across the end: {r:?}");
    let r = dev.read(cap - bs, 2 * bs as usize).await.map(|_| ());
    assert!(oor(&r), "{name}: read across the end: {r:?}");
    let r = dev.discard(cap - bs, 2 * bs).await;
    assert!(oor(&r), "{name}: discard across the end: {r:?}");
    let r = dev.write_zeroes(cap - bs, 2 * bs, zf).await;
    assert!(oor(&r), "{name}: write_zeroes across the end: {r:?}");
    assert_reads(
        &*dev,
        cap - bs,
        &last,
        &format!("{name}: last block after rejects"),
    )
    .await;
}

/// Discard makes the range read zeroes (with `discard_zeroes`), leaves its neighbours
/// alone, and fails with `Unsupported` on devices without discard.
pub async fn discard(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let caps = dev.geometry().capabilities;
    let span = 512 << 10;
    let data = pattern(31, span as usize);
    write_ok(&*dev, 0, data.clone(), name).await;
    // Deliberately odd: starts one block in and is not a multiple of 64 KiB.
    let (off, len) = (bs, 130 * 1024 / bs * bs + bs);
    let r = dev.discard(off, len).await;
    if !caps.discard {
        assert!(
            matches!(r, Err(BlockError::Unsupported(_))),
            "{name}: discard on a device without discard: {r:?}"
        );
        assert_reads(&*dev, 0, &data, &format!("{name}: unsupported discard")).await;
        return;
    }
    r.unwrap_or_else(|e| panic!("{name}: discard failed: {e}"));
    let (o, l) = (off as usize, len as usize);
    if caps.discard_zeroes {
        let mut expect = data.to_vec();
        expect[o..o + l].fill(0);
        assert_reads(&*dev, 0, &expect, &format!("{name}: discard")).await;
        // Writing after a discard works as usual.
        let again = pattern(32, 4 * bs as usize);
        write_ok(&*dev, off, again.clone(), name).await;
        assert_reads(&*dev, off, &again, &format!("{name}: write after discard")).await;
    } else {
        assert_reads(&*dev, 0, &data[..o], &format!("{name}: before discard")).await;
        assert_reads(
            &*dev,
            off + len,
            &data[o + l..],
            &format!("{name}: after discard"),
        )
        .await;
        let a = dev.read(off, l).await.expect("read discarded");
        let b = dev.read(off, l).await.expect("read discarded");
        assert_eq!(a, b, "{name}: discarded data is not stable");
    }
}

/// Write-zeroes with every combination of flags, small and large.
pub async fn write_zeroes(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let caps = dev.geometry().capabilities;
    let mut base = 0;
    for (i, (may_unmap, fast_only)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let flags = ZeroFlags {
            may_unmap,
            fast_only,
        };
        let what = format!("{name}: write_zeroes {flags:?}");
        let len = 70 * 1024 / bs * bs + bs;
        let data = pattern(40 + i as u64, (len + 2 * bs) as usize);
        write_ok(&*dev, base, data.clone(), name).await;
        let r = dev.write_zeroes(base + bs, len, flags).await;
        match r {
            Err(BlockError::Unsupported(_)) if fast_only && !caps.fast_zeroes => {
                assert_reads(&*dev, base, &data, &format!("{what} unsupported")).await;
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(()) => {
                let mut expect = data.to_vec();
                expect[bs as usize..(bs + len) as usize].fill(0);
                assert_reads(&*dev, base, &expect, &what).await;
            }
        }
        base += 1 << 20;
    }
    // A large range, bigger than any fallback's zero buffer.
    let big = 8 << 20;
    write_ok(&*dev, base, pattern(49, 1 << 20), name).await;
    write_ok(&*dev, base + big - (1 << 20), pattern(50, 1 << 20), name).await;
    dev.write_zeroes(base, big, ZeroFlags::default())
        .await
        .unwrap_or_else(|e| panic!("{name}: write_zeroes of {big} bytes: {e}"));
    assert_reads(
        &*dev,
        base,
        &zeroes(big),
        &format!("{name}: large write_zeroes"),
    )
    .await;
}

/// Compare-and-write writes on a match, reports the first differing byte and writes
/// nothing on a mismatch, at one block and at several.
pub async fn compare_and_write(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let no = WriteFlags::default();
    for (i, blocks) in [1u64, 8].into_iter().enumerate() {
        let off = (i as u64 * 64 + 3) * bs;
        let len = (blocks * bs) as usize;
        let a = pattern(60 + i as u64, len);
        let b = pattern(70 + i as u64, len);
        let c = pattern(80 + i as u64, len);
        write_ok(&*dev, off, a.clone(), name).await;
        let r = dev.compare_and_write(off, a.clone(), b.clone(), no).await;
        assert!(
            matches!(r, Ok(CompareOutcome::Written)),
            "{name}: matching compare_and_write: {r:?}"
        );
        assert_reads(&*dev, off, &b, &format!("{name}: compare_and_write wrote")).await;

        // Differs from the current contents (b) first at `diff`, in the last block.
        let diff = len - bs as usize / 2 - 3;
        let mut wrong = b.to_vec();
        wrong[diff] ^= 0x5a;
        wrong[len - 1] ^= 0x33;
        let r = dev
            .compare_and_write(off, Bytes::from(wrong), c.clone(), no)
            .await;
        assert!(
            matches!(r, Ok(CompareOutcome::Miscompare { offset }) if offset == diff as u64),
            "{name}: miscompare should report offset {diff}: {r:?}"
        );
        assert_reads(&*dev, off, &b, &format!("{name}: miscompare wrote")).await;

        // With FUA too.
        let fua = WriteFlags { fua: true };
        let r = dev.compare_and_write(off, b.clone(), c.clone(), fua).await;
        assert!(
            matches!(r, Ok(CompareOutcome::Written)),
            "{name}: compare_and_write with FUA: {r:?}"
        );
        assert_reads(&*dev, off, &c, &format!("{name}: compare_and_write FUA")).await;
    }
}

/// Tasks that increment a counter by compare-and-write, racing each other and plain
/// writers that scribble over the rest of the compared range and its neighbours, never
/// lose an increment and never see the same value twice.
pub async fn compare_and_write_is_atomic(name: &str, dev: SharedBlockDev) {
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 25;
    const WRITERS: u64 = 2;
    const WRITES: u64 = 60;
    let bs = bs(&*dev);
    // Two blocks: the counter in the first, scribbled-over data in the second.
    let base = dev.geometry().capacity_bytes() / 2 / bs * bs;
    let range = 2 * bs as usize;
    write_ok(&*dev, base, Bytes::from(vec![0u8; range]), name).await;

    let mut set = JoinSet::new();
    for t in 0..TASKS {
        let dev = Arc::clone(&dev);
        let name = name.to_owned();
        set.spawn(async move {
            let mut seen = Vec::new();
            let mut retries = 0u64;
            for _ in 0..INCREMENTS {
                loop {
                    let cur = dev.read(base, range).await.expect("read counter");
                    let value = u64::from_le_bytes(cur[..8].try_into().expect("8 bytes"));
                    let mut next = cur.to_vec();
                    next[..8].copy_from_slice(&(value + 1).to_le_bytes());
                    next[8] = t as u8;
                    match dev
                        .compare_and_write(base, cur, Bytes::from(next), WriteFlags::default())
                        .await
                        .expect("compare_and_write")
                    {
                        CompareOutcome::Written => {
                            seen.push(value + 1);
                            break;
                        }
                        CompareOutcome::Miscompare { .. } => {
                            retries += 1;
                            assert!(retries < 100_000, "{name}: livelock");
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
            seen
        });
    }
    for w in 0..WRITERS {
        let dev = Arc::clone(&dev);
        set.spawn(async move {
            for i in 0..WRITES {
                // The second block of the compared range, and the block after it.
                let off = base + bs * (1 + (i % 2));
                let data = pattern(1000 * (w + 1) + i, bs as usize);
                dev.write(off, data, WriteFlags::default())
                    .await
                    .expect("plain write");
                tokio::task::yield_now().await;
            }
            Vec::new()
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("task panicked"));
    }
    all.sort_unstable();
    let expected: Vec<u64> = (1..=TASKS * INCREMENTS).collect();
    assert_eq!(
        all, expected,
        "{name}: compare_and_write increments were lost or duplicated"
    );
    let cur = dev.read(base, bs as usize).await.expect("read counter");
    let value = u64::from_le_bytes(cur[..8].try_into().expect("8 bytes"));
    assert_eq!(value, TASKS * INCREMENTS, "{name}: final counter");
}

/// FUA writes and flushes succeed, alone and mixed with other writes.
pub async fn fua_and_flush(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    dev.flush()
        .await
        .unwrap_or_else(|e| panic!("{name}: flush of an idle device: {e}"));
    let data = pattern(90, 4 * bs as usize);
    dev.write(bs, data.clone(), WriteFlags { fua: true })
        .await
        .unwrap_or_else(|e| panic!("{name}: FUA write: {e}"));
    assert_reads(&*dev, bs, &data, &format!("{name}: FUA write")).await;
    let mut set = JoinSet::new();
    for i in 0..16u64 {
        let dev = Arc::clone(&dev);
        set.spawn(async move {
            if i % 4 == 0 {
                dev.flush().await
            } else {
                let d = pattern(100 + i, bs as usize);
                let fua = WriteFlags { fua: i % 2 == 1 };
                dev.write((64 + i) * bs, d, fua).await
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task panicked")
            .unwrap_or_else(|e| panic!("{name}: concurrent write/flush: {e}"));
    }
    dev.flush()
        .await
        .unwrap_or_else(|e| panic!("{name}: flush: {e}"));
    for i in (0..16u64).filter(|i| i % 4 != 0) {
        let d = pattern(100 + i, bs as usize);
        assert_reads(&*dev, (64 + i) * bs, &d, &format!("{name}: after flush")).await;
    }
}

/// Many tasks writing disjoint ranges at once all land.
pub async fn concurrent_disjoint_writers(name: &str, dev: SharedBlockDev) {
    const TASKS: u64 = 8;
    const WRITES: u64 = 32;
    let bs = bs(&*dev);
    let mut set = JoinSet::new();
    for t in 0..TASKS {
        let dev = Arc::clone(&dev);
        set.spawn(async move {
            // Task t owns every TASKS-th slot of 1..=4 blocks in [0, 8 MiB).
            for i in 0..WRITES {
                let slot = i * TASKS + t;
                let len = (1 + (slot % 4)) * bs;
                let data = pattern(slot + 500, len as usize);
                dev.write(slot * 4 * bs, data, WriteFlags::default())
                    .await
                    .expect("write");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task panicked");
    }
    for slot in 0..TASKS * WRITES {
        let len = (1 + (slot % 4)) * bs;
        let what = format!("{name}: disjoint writer slot {slot}");
        assert_reads(
            &*dev,
            slot * 4 * bs,
            &pattern(slot + 500, len as usize),
            &what,
        )
        .await;
    }
}

/// 4 MiB requests (and a 4 MiB + 1 block one at an odd offset) in one piece.
pub async fn large_io(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let g = dev.geometry();
    let mut size: u64 = 4 << 20;
    if g.max_io_bytes != 0 {
        size = size.min(u64::from(g.max_io_bytes) / bs * bs);
    }
    let data = pattern(120, size as usize);
    write_ok(&*dev, 0, data.clone(), name).await;
    assert_reads(&*dev, 0, &data, &format!("{name}: large I/O")).await;
    if g.max_io_bytes == 0 {
        let odd = pattern(121, (size + bs) as usize);
        let off = (5 << 20) + 3 * bs;
        write_ok(&*dev, off, odd.clone(), name).await;
        assert_reads(&*dev, off, &odd, &format!("{name}: large odd I/O")).await;
    }
}

/// Hundreds of single-block writes, then reads, in flight at once.
pub async fn many_small_ios_in_flight(name: &str, dev: SharedBlockDev) {
    const N: u64 = 512;
    let bs = bs(&*dev);
    let mut set = JoinSet::new();
    for i in 0..N {
        let dev = Arc::clone(&dev);
        set.spawn(async move {
            // Scattered over the first 8 MiB, interleaved so neighbours race.
            let block = (i * 7919) % N;
            dev.write(
                block * bs,
                pattern(2000 + block, bs as usize),
                WriteFlags::default(),
            )
            .await
            .expect("small write");
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task panicked");
    }
    let mut set = JoinSet::new();
    for block in 0..N {
        let dev = Arc::clone(&dev);
        set.spawn(async move {
            let got = dev.read(block * bs, bs as usize).await.expect("small read");
            (block, got == pattern(2000 + block, bs as usize))
        });
    }
    while let Some(r) = set.join_next().await {
        let (block, ok) = r.expect("task panicked");
        assert!(ok, "{name}: small I/O block {block} read back wrong");
    }
}

/// Writes and compare-and-writes from buffers at odd addresses (as they arrive from a
/// socket) work, and reads can be sliced.
pub async fn unaligned_buffers(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev) as usize;
    let raw = pattern(130, 4 * bs + 1);
    let data = raw.slice(1..); // one byte off any alignment
    write_ok(&*dev, 0, data.clone(), name).await;
    assert_reads(&*dev, 0, &data, &format!("{name}: unaligned write")).await;
    let raw2 = pattern(131, bs + 3);
    let r = dev
        .compare_and_write(
            bs as u64,
            data.slice(bs..2 * bs),
            raw2.slice(3..),
            WriteFlags::default(),
        )
        .await;
    assert!(
        matches!(r, Ok(CompareOutcome::Written)),
        "{name}: unaligned compare_and_write: {r:?}"
    );
    assert_reads(
        &*dev,
        bs as u64,
        &raw2[3..],
        &format!("{name}: unaligned caw"),
    )
    .await;
    let all = dev.read(0, 4 * bs).await.expect("read");
    assert_eq!(
        &all.slice(2 * bs..)[..],
        &data[2 * bs..],
        "{name}: sliced read"
    );
}

/// Block status covers the range exactly with block-aligned extents, and whatever it
/// calls a hole (with `discard_zeroes`) or zero reads as zeroes.
pub async fn block_status(name: &str, dev: SharedBlockDev) {
    let bs = bs(&*dev);
    let zeroed = dev.geometry().capabilities.discard_zeroes;
    let span: u64 = 1 << 20;
    write_ok(&*dev, 0, pattern(140, (span / 4) as usize), name).await;
    write_ok(&*dev, span / 2, pattern(141, bs as usize), name).await;
    if dev.geometry().capabilities.discard {
        dev.discard(span / 2 + 64 * bs, 64 * bs)
            .await
            .unwrap_or_else(|e| panic!("{name}: discard: {e}"));
    }
    for (off, len) in [(0, span), (bs, span - 2 * bs), (span / 2, bs)] {
        let extents = dev
            .block_status(off, len)
            .await
            .unwrap_or_else(|e| panic!("{name}: block_status({off}, {len}): {e}"));
        let mut at = off;
        for e in &extents {
            assert!(
                e.len > 0 && e.len % bs == 0,
                "{name}: extent {e:?} is empty or not block-aligned"
            );
            let reads_zero = match e.kind {
                ExtentKind::Zero => true,
                ExtentKind::Hole => zeroed,
                ExtentKind::Data => false,
            };
            if reads_zero {
                assert_reads(
                    &*dev,
                    at,
                    &zeroes(e.len),
                    &format!("{name}: {:?} extent at {at}", e.kind),
                )
                .await;
            }
            at += e.len;
        }
        assert_eq!(
            at,
            off + len,
            "{name}: block_status({off}, {len}) covers up to {at}: {extents:?}"
        );
    }
    let r = dev.block_status(dev.geometry().capacity_bytes(), bs).await;
    assert!(
        matches!(r, Err(BlockError::OutOfRange { .. })),
        "{name}: block_status past the end: {r:?}"
    );
}

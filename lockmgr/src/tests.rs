//! Multi-host scenarios. Hosts are separate [`Lockspace`]s in one process, each with its
//! own [`HostLink`] to one shared device whose compare-and-write is atomic for all of
//! them. Most scenarios run on tokio's paused clock with the production timings (3 s
//! heartbeat, 9 s dead-host timeout), so they measure simulated seconds exactly and run
//! in milliseconds; the exclusion oracle runs in real time on several threads.

use crate::testing::HostLink;
use crate::*;
use async_trait::async_trait;
use basalt_blockdev::{BlockDev, MemDev, SharedBlockDev, WriteFlags};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

const BS: u32 = 512;

fn res(name: &str) -> ResourceId {
    ResourceId::from_name(name).unwrap()
}

async fn shared_dev() -> SharedBlockDev {
    let dev: SharedBlockDev = Arc::new(MemDev::new(8192, BS));
    let opts = FormatOptions {
        max_hosts: 64,
        max_locks: 256,
        ..FormatOptions::default()
    };
    Lockspace::format(&dev, 0, &opts).await.unwrap();
    dev
}

struct Host {
    ls: Lockspace,
    link: Arc<HostLink>,
}

#[derive(Default)]
struct RecordingRecovery {
    done: Mutex<Vec<(u16, u32)>>,
    fail_first: AtomicU64,
}

#[async_trait]
impl Recovery for RecordingRecovery {
    async fn recover(&self, info: RecoveryInfo) -> Result<(), String> {
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("journal replay failed (injected)".into());
        }
        info.fence.check().map_err(|e| e.to_string())?;
        self.done
            .lock()
            .unwrap()
            .push((info.slot, info.dead_generation));
        Ok(())
    }
}

fn options(id: u8, recovery: Option<Arc<RecordingRecovery>>) -> JoinOptions {
    let mut o = JoinOptions::new([id; 16], format!("host-{id}"));
    o.clock = Arc::new(TokioClock::new());
    o.recovery = recovery.map(|r| r as Arc<dyn Recovery>);
    o
}

async fn join(dev: &SharedBlockDev, id: u8, recovery: Option<Arc<RecordingRecovery>>) -> Host {
    let link = Arc::new(HostLink::new(dev.clone()));
    let ls = Lockspace::join(link.clone(), 0, options(id, recovery))
        .await
        .unwrap();
    Host { ls, link }
}

/// Kills a host: no more I/O from it, no release of its locks (a crash or SIGKILL).
fn kill(h: Host, guards: Vec<LockGuard>) {
    h.link.cut(true);
    for g in guards {
        std::mem::forget(g);
    }
    drop(h.ls);
}

/// Waits until `ls` completes its next renewal; returns the time it did.
async fn next_renewal(ls: &Lockspace) -> Instant {
    let n = ls.metrics().heartbeats_total;
    while ls.metrics().heartbeats_total == n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn join_lock_unlock_and_status() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    assert_ne!(a.ls.slot(), b.ls.slot());
    assert_eq!(a.ls.generation(), 1);
    let g = a.ls.lock(res("r1"), LockMode::Exclusive).await.unwrap();
    assert!(matches!(
        b.ls.try_lock(res("r1"), LockMode::Exclusive).await,
        Err(LockError::WouldBlock { holders }) if holders == vec![Holder { slot: a.ls.slot(), generation: 1 }]
    ));
    assert!(matches!(
        a.ls.try_lock(res("r1"), LockMode::SharedRead).await,
        Err(LockError::AlreadyHeld)
    ));
    assert!(matches!(
        b.ls.lock_timeout(res("r1"), LockMode::Exclusive, Duration::from_secs(2))
            .await,
        Err(LockError::Timeout)
    ));
    // Heartbeats keep going for a minute; nothing is taken over.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(a.ls.state(), HostState::Live);
    assert!(a.ls.metrics().heartbeats_total >= 19);
    assert_eq!(b.ls.metrics().takeovers_total, 0);
    let st = b.ls.status();
    let sa = &st.slots[usize::from(a.ls.slot())];
    assert_eq!(sa.presumed, Presumed::Alive);
    assert_eq!(sa.hostname, "host-1");
    assert_eq!(st.slots[5].presumed, Presumed::Free);
    let list = b.ls.list_locks().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].resource.to_string(), "r1");
    assert!(list[0].holders[0].current);
    assert_eq!(list[0].holders[0].hostname, "host-1");
    assert_eq!(a.ls.status().held.len(), 1);
    let epoch = g.epoch();
    g.unlock().await.unwrap();
    let g = b.ls.lock(res("r1"), LockMode::Exclusive).await.unwrap();
    assert_eq!(g.epoch(), epoch + 1, "epochs grow with every grant");
    g.unlock().await.unwrap();
    // Second acquire by the same host, uncontended: one CAW round trip.
    let before = b.ls.metrics().acquire_round_trips_total;
    b.ls.lock(res("r1"), LockMode::Exclusive)
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    assert_eq!(b.ls.metrics().acquire_round_trips_total - before, 1);
    a.ls.leave().await.unwrap();
    let st = b.ls.status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st2 = b.ls.status();
    assert_ne!(st.slots[0].presumed, Presumed::Dead);
    assert_eq!(st2.slots[0].presumed, Presumed::Free);
}

#[tokio::test(start_paused = true)]
async fn shared_and_multi_writer_modes() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    let c = join(&dev, 3, None).await;
    let ga = a.ls.lock(res("disk"), LockMode::SharedRead).await.unwrap();
    let gb = b.ls.lock(res("disk"), LockMode::SharedRead).await.unwrap();
    assert!(matches!(
        c.ls.try_lock(res("disk"), LockMode::Exclusive).await,
        Err(LockError::WouldBlock { holders }) if holders.len() == 2
    ));
    assert!(c
        .ls
        .try_lock(res("disk"), LockMode::MultiWriter)
        .await
        .is_err());
    ga.unlock().await.unwrap();
    gb.unlock().await.unwrap();
    let ga = a.ls.lock(res("disk"), LockMode::MultiWriter).await.unwrap();
    let gc = c.ls.lock(res("disk"), LockMode::MultiWriter).await.unwrap();
    assert!(b
        .ls
        .try_lock(res("disk"), LockMode::SharedRead)
        .await
        .is_err());
    // Each multi-writer can update the value block; the CAW keeps both holders.
    ga.write_payload(b"a").await.unwrap();
    gc.write_payload(b"c").await.unwrap();
    assert_eq!(&ga.read_payload().await.unwrap()[..1], b"c");
    ga.unlock().await.unwrap();
    gc.unlock().await.unwrap();
}

/// Issue 7, item 6: a killed holder's locks are taken by nobody before the dead-host
/// timeout after its last heartbeat, and by someone right after (within 10 s of the
/// kill), after its recovery ran.
#[tokio::test(start_paused = true)]
async fn killed_holder_locks_taken_after_dead_timeout() {
    let dev = shared_dev().await;
    let rec = Arc::new(RecordingRecovery::default());
    let a = join(&dev, 1, Some(rec.clone())).await;
    let b = join(&dev, 2, Some(rec.clone())).await;
    let c = join(&dev, 3, Some(rec.clone())).await;
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let gs = a.ls.lock(res("iso"), LockMode::SharedRead).await.unwrap();
    let gc = c.ls.lock(res("iso"), LockMode::SharedRead).await.unwrap();
    ga.write_payload(b"journal@17").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let last_beat = next_renewal(&a.ls).await;
    let a_slot = a.ls.slot();
    kill(a, vec![ga, gs]);
    let killed = Instant::now();
    // B waits for the lock; C probes it without waiting the whole time.
    let waiter = tokio::spawn(async move {
        let g = b.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
        (Instant::now(), g, b)
    });
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if waiter.is_finished() {
            break;
        }
        assert!(
            c.ls.try_lock(res("vm1"), LockMode::Exclusive)
                .await
                .is_err()
                || Instant::now() - last_beat >= Duration::from_secs(9)
        );
    }
    let (granted, g, b) = waiter.await.unwrap();
    let since_beat = granted - last_beat;
    let since_kill = granted - killed;
    assert!(
        since_beat >= Duration::from_secs(9),
        "taken {since_beat:?} after the last heartbeat"
    );
    assert!(
        since_kill <= Duration::from_secs(10),
        "taken {since_kill:?} after the kill"
    );
    assert_eq!(
        rec.done.lock().unwrap().as_slice(),
        &[(a_slot, 1)],
        "recovered once, before the grant"
    );
    assert_eq!(&g.read_payload().await.unwrap()[..10], b"journal@17");
    let breaks = b.ls.metrics().breaks_total + c.ls.metrics().breaks_total;
    assert_eq!(breaks, 2, "vm1 and A's share of iso");
    // C's shared hold survived A's death.
    let list = c.ls.list_locks().await.unwrap();
    let iso = list.iter().find(|l| l.resource == res("iso")).unwrap();
    assert_eq!(iso.holders.len(), 1);
    assert_eq!(iso.holders[0].slot, c.ls.slot());
    // The slot is free again with the bumped generation; a new host gets generation 3.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = join(&dev, 4, None).await;
    assert_eq!((d.ls.slot(), d.ls.generation()), (a_slot, 3));
    gc.unlock().await.unwrap();
    g.unlock().await.unwrap();
    drop(b);
}

/// Issue 7, item 6 and item 3: a holder paused past its lease (its CAW of the lock's
/// value block stuck in flight, issued after every local check passed) resumes after
/// another host took its slot over and the lock: the write is refused, not accepted.
#[tokio::test(start_paused = true)]
async fn paused_holder_write_is_refused_after_resume() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    ga.write_payload(b"A1").await.unwrap();
    let fence = ga.fence().clone();
    assert!(fence.check().is_ok());
    a.link.pause();
    // A's write is issued (checks pass) and held in flight.
    let ga = Arc::new(ga);
    let ga2 = ga.clone();
    let stale_write = tokio::spawn(async move { ga2.write_payload(b"A2-stale").await });
    let gb = b.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    gb.write_payload(b"B1").await.unwrap();
    assert!(fence.check().is_err(), "A's lease ran out while paused");
    let issued = a.link.issued();
    a.link.resume();
    // A gave up waiting (its I/O timed out) but its CAW was on the wire: it reaches
    // the device now, and miscompares against B's record.
    let r = stale_write.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(a.link.issued() > issued, "the stale CAW reached the device");
    assert_eq!(&gb.read_payload().await.unwrap()[..2], b"B1");
    // And a write A attempts now is refused outright.
    let r = ga.write_payload(b"A3").await;
    assert!(matches!(r, Err(LockError::Fenced(_))), "{r:?}");
    // A learns it was lost; its fenced device refuses plain writes too.
    let reason = tokio::time::timeout(Duration::from_secs(10), a.ls.lost())
        .await
        .unwrap();
    assert!(matches!(
        reason,
        LostReason::TakenOver | LostReason::LeaseExpired
    ));
    let fdev = FencedDev::new(a.link.clone(), fence, Duration::from_secs(1));
    let w = fdev
        .write(0, Bytes::from(vec![1u8; 512]), WriteFlags::default())
        .await;
    assert!(w.is_err());
    assert!(a.ls.metrics().fenced_writes_refused_total >= 1);
    assert!(matches!(
        a.ls.lock(res("x"), LockMode::Exclusive).await,
        Err(LockError::Lost(_))
    ));
}

/// The same pause, for the generation check: a host stopped for longer than the
/// dead-host timeout finds its slot taken over on its next renewal and reports lost.
#[tokio::test(start_paused = true)]
async fn paused_host_finds_its_generation_bumped() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    a.link.pause();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(b.ls.metrics().takeovers_total, 1);
    a.link.resume();
    let r = tokio::time::timeout(Duration::from_secs(5), a.ls.lost())
        .await
        .unwrap();
    // Either it noticed its lease run out while stuck, or the takeover on resume.
    assert!(matches!(
        r,
        LostReason::TakenOver | LostReason::LeaseExpired
    ));
    assert!(a.ls.fence().check().is_err());
}

/// Issue 7, item 6: a host that loses its storage reports "lost" and fences itself
/// before any other host may take over.
#[tokio::test(start_paused = true)]
async fn storage_loss_fences_before_takeover() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let last_beat = next_renewal(&a.ls).await;
    tokio::time::sleep(Duration::from_millis(2900)).await;
    a.link.cut(true); // just before the next renewal: the worst case
    let fence = ga.fence().clone();
    let mut rx = a.ls.subscribe();
    let lost_at = tokio::spawn(async move {
        while !matches!(*rx.borrow_and_update(), HostState::Lost(_)) {
            rx.changed().await.unwrap();
        }
        Instant::now()
    });
    let gb = b.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let granted = Instant::now();
    let lost_at = lost_at.await.unwrap();
    assert!(
        lost_at - last_beat <= Duration::from_secs(6),
        "lost {:?} after",
        lost_at - last_beat
    );
    assert!(
        granted - lost_at >= Duration::from_millis(2500),
        "gap only {:?}",
        granted - lost_at
    );
    assert!(matches!(
        a.ls.state(),
        HostState::Lost(LostReason::LeaseExpired)
    ));
    assert!(fence.check().is_err());
    assert_eq!(a.ls.metrics().fencing_events_total, 1);
    gb.unlock().await.unwrap();
    std::mem::forget(ga);
}

/// Issue 7, item 6: a CAW that timed out but was applied. The retry miscompares; the
/// host recognises its own image instead of declaring the lock (or heartbeat) lost,
/// which is VMware's false "ATS miscompare" failure.
#[tokio::test(start_paused = true)]
async fn timed_out_caw_that_applied_is_recognised() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    a.link.lose_next_ack(1);
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    assert_eq!(a.ls.metrics().own_image_recognized_total, 1);
    assert!(b
        .ls
        .try_lock(res("vm1"), LockMode::Exclusive)
        .await
        .is_err());
    // Heartbeat renewals whose answers are lost, three in a row.
    next_renewal(&a.ls).await;
    a.link.lose_next_ack(3);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(a.ls.state(), HostState::Live);
    assert!(a.ls.metrics().own_image_recognized_total >= 2);
    assert_eq!(b.ls.metrics().takeovers_total, 0);
    ga.write_payload(b"ok").await.unwrap();
    ga.unlock().await.unwrap();
    // An answer that arrives after the request timeout (1.5 s) rather than an error:
    // acquisitions and releases retry too (they used to give up after one timeout,
    // leaving a granted entry the host did not know about).
    let n = a.ls.metrics().own_image_recognized_total;
    a.link.delay_next_ack(Duration::from_secs(2));
    let ga = a.ls.lock(res("vm2"), LockMode::Exclusive).await.unwrap();
    a.link.delay_next_ack(Duration::from_secs(2));
    ga.write_payload(b"late").await.unwrap();
    a.link.delay_next_ack(Duration::from_secs(2));
    ga.unlock().await.unwrap();
    assert_eq!(a.ls.metrics().own_image_recognized_total, n + 3);
    let gb =
        b.ls.try_lock(res("vm2"), LockMode::Exclusive)
            .await
            .unwrap();
    assert_eq!(gb.read_payload().await.unwrap()[..4], *b"late");
}

/// Issue 7, item 6: torn writes of lock sectors are caught by the checksum. A torn
/// record is never granted; a host whose own CAW tore repairs it on retry.
#[tokio::test(start_paused = true)]
async fn torn_lock_sectors_are_caught() {
    let dev = shared_dev().await;
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, None).await;
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let idx = a.ls.status().held[0].index;
    let hdr = a.ls.header().clone();
    let off = hdr.locks_offset() + u64::from(idx) * u64::from(BS);
    let held_img = dev.read(off, BS as usize).await.unwrap();
    ga.unlock().await.unwrap();
    let free_img = dev.read(off, BS as usize).await.unwrap();
    // A sector half old, half new, as a power loss mid-sector would leave it.
    let mut torn = free_img.to_vec();
    torn[256..].copy_from_slice(&held_img[256..]);
    torn[100] ^= 0x55; // and not a clean mix either: a foreign tear
    dev.write(off, Bytes::from(torn), WriteFlags::default())
        .await
        .unwrap();
    let r = b.ls.try_lock(res("vm1"), LockMode::Exclusive).await;
    assert!(
        matches!(r, Err(LockError::Corrupt { index, .. }) if index == idx),
        "{r:?}"
    );
    assert!(b.ls.metrics().checksum_errors_total >= 1);
    assert!(matches!(
        b.ls.list_locks().await,
        Err(LockError::Corrupt { .. })
    ));
    // Repaired by an operator rewrite of the last good image.
    dev.write(off, free_img.clone(), WriteFlags::default())
        .await
        .unwrap();
    // Own tear: the torn sector is a mix of exactly the old and the new image.
    let tearing = Arc::new(TearingDev::new(dev.clone(), off));
    let mut o = options(3, None);
    o.tuning.io_timeout = Some(Duration::from_millis(500));
    let c = Lockspace::join(tearing.clone(), 0, o).await.unwrap();
    tearing.arm();
    let gc = c.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    assert_eq!(c.metrics().torn_repairs_total, 1);
    assert!(b
        .ls
        .try_lock(res("vm1"), LockMode::Exclusive)
        .await
        .is_err());
    gc.unlock().await.unwrap();
    b.ls.lock(res("vm1"), LockMode::Exclusive)
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
}

/// Tears the next compare-and-write at `offset`: persists the first half of the new
/// sector over the old one and fails with EIO.
struct TearingDev {
    inner: SharedBlockDev,
    offset: u64,
    armed: std::sync::atomic::AtomicBool,
}

impl TearingDev {
    fn new(inner: SharedBlockDev, offset: u64) -> Self {
        TearingDev {
            inner,
            offset,
            armed: false.into(),
        }
    }
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockDev for TearingDev {
    fn geometry(&self) -> basalt_blockdev::Geometry {
        self.inner.geometry()
    }
    async fn read(&self, o: u64, l: usize) -> basalt_blockdev::Result<Bytes> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Bytes, f: WriteFlags) -> basalt_blockdev::Result<()> {
        self.inner.write(o, d, f).await
    }
    async fn flush(&self) -> basalt_blockdev::Result<()> {
        self.inner.flush().await
    }
    async fn discard(&self, o: u64, l: u64) -> basalt_blockdev::Result<()> {
        self.inner.discard(o, l).await
    }
    async fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: basalt_blockdev::ZeroFlags,
    ) -> basalt_blockdev::Result<()> {
        self.inner.write_zeroes(o, l, f).await
    }
    async fn compare_and_write(
        &self,
        o: u64,
        c: Bytes,
        d: Bytes,
        f: WriteFlags,
    ) -> basalt_blockdev::Result<basalt_blockdev::CompareOutcome> {
        if o == self.offset && self.armed.swap(false, Ordering::SeqCst) {
            let cur = self.inner.read(o, c.len()).await?;
            if cur == c {
                let mut torn = c.to_vec();
                let half = torn.len() / 2;
                torn[..half].copy_from_slice(&d[..half]);
                self.inner.write(o, Bytes::from(torn), f).await?;
            }
            return Err(basalt_blockdev::BlockError::io(
                "compare_and_write",
                o,
                0,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.inner.compare_and_write(o, c, d, f).await
    }
}

/// A wall clock that jumps an hour back and forth on every reading.
struct JumpyWall(AtomicU64);

impl WallClock for JumpyWall {
    fn now(&self) -> SystemTime {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        if n.is_multiple_of(2) {
            base + Duration::from_secs(3600 * (n % 7))
        } else {
            base - Duration::from_secs(3600 * (n % 5))
        }
    }
}

/// Issue 7, item 6: wall-clock jumps on one host change nothing (the protocol reads
/// only the monotonic clock, pinned by `clock::tests::protocol_never_reads_wall_clock`;
/// this runs a holder through a minute of jumps and a kill with exact timings).
#[tokio::test(start_paused = true)]
async fn wall_clock_jumps_change_nothing() {
    let dev = shared_dev().await;
    let mut o = options(1, None);
    o.wall = Arc::new(JumpyWall(AtomicU64::new(0)));
    let link = Arc::new(HostLink::new(dev.clone()));
    let a = Host {
        ls: Lockspace::join(link.clone(), 0, o).await.unwrap(),
        link,
    };
    let b = join(&dev, 2, None).await;
    let ga = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = a.ls.status(); // reads the jumping wall clock
        assert!(b
            .ls
            .try_lock(res("vm1"), LockMode::Exclusive)
            .await
            .is_err());
    }
    assert_eq!(a.ls.state(), HostState::Live);
    assert_eq!(b.ls.metrics().takeovers_total, 0);
    let last_beat = next_renewal(&a.ls).await;
    kill(a, vec![ga]);
    let g = b.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let t = Instant::now() - last_beat;
    assert!(
        t >= Duration::from_secs(9) && t <= Duration::from_secs(10),
        "{t:?}"
    );
    g.unlock().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn duplicate_host_id_is_refused_and_restart_recovers_old_slot() {
    let dev = shared_dev().await;
    let rec = Arc::new(RecordingRecovery::default());
    let a = join(&dev, 1, Some(rec.clone())).await;
    let _b = join(&dev, 2, Some(rec.clone())).await;
    let link = Arc::new(HostLink::new(dev.clone()));
    let r = Lockspace::join(link, 0, options(1, None)).await;
    assert!(
        matches!(r, Err(LockError::DuplicateHost { slot: 0 })),
        "{:?}",
        r.err()
    );
    // A crashes holding a lock, and restarts with the same id.
    let g = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let old_slot = a.ls.slot();
    kill(a, vec![g]);
    let started = Instant::now();
    let a2 = join(&dev, 1, Some(rec.clone())).await;
    assert!(Instant::now() - started >= Duration::from_secs(9));
    // B recovered the old slot while A watched it (or A took it over after claiming
    // a new one): either way, exactly one recovery, and A may even get the old slot.
    let _ = old_slot;
    let g = a2.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    assert_eq!(rec.done.lock().unwrap().len(), 1);
    g.unlock().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failed_recovery_is_retried_after_the_timeout() {
    let dev = shared_dev().await;
    let rec = Arc::new(RecordingRecovery::default());
    rec.fail_first.store(1, Ordering::SeqCst);
    let a = join(&dev, 1, None).await;
    let b = join(&dev, 2, Some(rec.clone())).await;
    let g = a.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    let slot = a.ls.slot();
    kill(a, vec![g]);
    let t = Instant::now();
    let g = b.ls.lock(res("vm1"), LockMode::Exclusive).await.unwrap();
    assert!(
        Instant::now() - t >= Duration::from_secs(18),
        "second takeover after another timeout"
    );
    assert_eq!(b.ls.metrics().recoveries_failed_total, 1);
    // The second recovery saw the first (failed) recovery's generation.
    assert_eq!(rec.done.lock().unwrap().as_slice(), &[(slot, 2)]);
    g.unlock().await.unwrap();
}

/// At least 64 hosts (issue 7, item 1): 64 join one lockspace, the 65th finds no slot.
#[tokio::test(start_paused = true)]
async fn sixty_four_hosts() {
    let dev = shared_dev().await;
    let mut hosts = Vec::new();
    for i in 0..64u8 {
        hosts.push(join(&dev, i + 1, None).await);
    }
    let link = Arc::new(HostLink::new(dev.clone()));
    assert!(matches!(
        Lockspace::join(link, 0, options(200, None)).await,
        Err(LockError::NoFreeSlot)
    ));
    let mut gs = Vec::new();
    for h in &hosts {
        gs.push(
            h.ls.lock(res("shared"), LockMode::SharedRead)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(hosts.iter().all(|h| h.ls.state() == HostState::Live));
    let list = hosts[0].ls.list_locks().await.unwrap();
    assert_eq!(list[0].holders.len(), 64);
    for g in gs {
        g.unlock().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn format_guards() {
    let dev: SharedBlockDev = Arc::new(MemDev::new(8192, BS));
    assert!(matches!(
        Lockspace::read_header(&dev, 0).await,
        Err(LockError::NotFormatted(_))
    ));
    Lockspace::format(
        &dev,
        4096,
        &FormatOptions {
            max_locks: 16,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        Lockspace::format(&dev, 4096, &FormatOptions::default()).await,
        Err(LockError::AlreadyFormatted)
    ));
    let bad = FormatOptions {
        dead_after: Duration::from_secs(5),
        force: true,
        ..Default::default()
    };
    assert!(matches!(
        Lockspace::format(&dev, 0, &bad).await,
        Err(LockError::InvalidFormat(_))
    ));
    let big = FormatOptions {
        max_locks: 1 << 20,
        force: true,
        ..Default::default()
    };
    assert!(matches!(
        Lockspace::format(&dev, 0, &big).await,
        Err(LockError::TooSmall { .. })
    ));
    let h = Lockspace::read_header(&dev, 4096).await.unwrap();
    assert_eq!(h.max_hosts, 64);
    let dev4k: SharedBlockDev = Arc::new(MemDev::new(8192, 4096));
    assert!(matches!(
        Lockspace::read_header(&dev4k, 0).await,
        Err(LockError::NotFormatted(_))
    ));
}

/// A device whose reads are slow enough that two formats' checks interleave.
fn slow_reads() -> SharedBlockDev {
    let fault = basalt_blockdev::FaultDev::new(Arc::new(MemDev::new(8192, BS)));
    fault.set_latency(
        basalt_blockdev::fault::FaultOp::Read,
        Duration::from_millis(5),
    );
    Arc::new(fault)
}

fn small_format() -> FormatOptions {
    FormatOptions {
        max_hosts: 8,
        max_locks: 32,
        ..FormatOptions::default()
    }
}

/// The header of the one format that succeeded, and the other's error.
fn one_winner(a: Result<Header, LockError>, b: Result<Header, LockError>) -> (Header, LockError) {
    match (a, b) {
        (Ok(h), Err(e)) | (Err(e), Ok(h)) => (h, e),
        other => panic!("want exactly one winner: {other:?}"),
    }
}

/// Two explicit formats of the same range at once (over old data, where
/// `format_if_blank` would refuse): their reads interleave, yet one claims the range and
/// writes its lockspace, and the other writes nothing (`FormatInProgress`), so it cannot
/// zero the slot of a host that joined the winner's lockspace. A claim left by a format
/// that died blocks a plain format and is taken over with `force`.
#[tokio::test(start_paused = true)]
async fn explicit_formats_at_once_have_one_winner() {
    let dev = slow_reads();
    dev.write(
        0,
        Bytes::from(vec![9u8; 4 * BS as usize]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    let opts = small_format();
    let (a, b) = tokio::join!(
        Lockspace::format(&dev, 0, &opts),
        Lockspace::format(&dev, 0, &opts)
    );
    let (won, lost) = one_winner(a, b);
    assert!(matches!(lost, LockError::FormatInProgress), "{lost:?}");
    assert_eq!(Lockspace::read_header(&dev, 0).await.unwrap(), won);
    let host = Lockspace::join(dev.clone(), 0, JoinOptions::new([1; 16], "a"))
        .await
        .unwrap();
    assert_eq!(host.header().lockspace_id, won.lockspace_id);
    assert!(matches!(
        Lockspace::format(&dev, 0, &opts).await,
        Err(LockError::AlreadyFormatted)
    ));

    // A format that died after its claim.
    let died: SharedBlockDev = Arc::new(MemDev::new(8192, BS));
    died.write(
        0,
        crate::lockspace::format_claim(BS as usize),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        Lockspace::format(&died, 0, &opts).await,
        Err(LockError::FormatInProgress)
    ));
    let forced = FormatOptions {
        force: true,
        ..opts.clone()
    };
    let h = Lockspace::format(&died, 0, &forced).await.unwrap();
    assert_eq!(Lockspace::read_header(&died, 0).await.unwrap(), h);
}

/// Two hosts formatting the same blank range at once (`format = true` on both):
/// their blank checks interleave (every read is delayed), yet exactly one header is
/// written; the other host gets `AlreadyFormatted` and joins the same lockspace, and a
/// late `format_if_blank` after the winner joined leaves its slot alone.
#[tokio::test(start_paused = true)]
async fn format_if_blank_has_one_winner() {
    let dev = slow_reads();
    let opts = small_format();
    let (a, b) = tokio::join!(
        Lockspace::format_if_blank(&dev, 0, &opts),
        Lockspace::format_if_blank(&dev, 0, &opts)
    );
    let (won, lost) = one_winner(a, b);
    assert!(matches!(lost, LockError::AlreadyFormatted), "{lost:?}");
    assert_eq!(Lockspace::read_header(&dev, 0).await.unwrap(), won);

    let first = Lockspace::join(dev.clone(), 0, JoinOptions::new([1; 16], "a"))
        .await
        .unwrap();
    assert!(matches!(
        Lockspace::format_if_blank(&dev, 0, &opts).await,
        Err(LockError::AlreadyFormatted)
    ));
    let second = Lockspace::join(dev.clone(), 0, JoinOptions::new([2; 16], "b"))
        .await
        .unwrap();
    assert_eq!(first.header().lockspace_id, won.lockspace_id);
    assert_eq!(second.header().lockspace_id, won.lockspace_id);
    assert_ne!(first.slot(), second.slot());
    assert_eq!(first.state(), HostState::Live);

    // Data anywhere in the range: not blank, nothing written.
    let dirty: SharedBlockDev = Arc::new(MemDev::new(8192, BS));
    dirty
        .write(
            u64::from(BS) * 3,
            Bytes::from(vec![7u8; BS as usize]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert!(matches!(
        Lockspace::format_if_blank(&dirty, 0, &opts).await,
        Err(LockError::NotBlank { offset }) if offset == u64::from(BS) * 3
    ));
    assert!(matches!(
        Lockspace::read_header(&dirty, 0).await,
        Err(LockError::NotFormatted(_))
    ));
}

/// The exclusion oracle (sanlock's devcount, in process): hosts on their own threads
/// loop acquiring, checking and releasing a few resources in exclusive and shared
/// modes, with lost CAW answers injected. Every exclusive holder stamps an oracle
/// sector on the shared device and checks nobody overwrote it before releasing;
/// an in-memory ledger counts holders. Zero violations over >= 10,000 acquisitions.
#[test]
fn exclusion_oracle_ten_thousand_acquisitions() {
    const HOSTS: u8 = 4;
    const RESOURCES: u32 = 3;
    const TARGET: u64 = 10_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dev = rt.block_on(shared_dev());
    let total = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    let ledger: Arc<Mutex<HashMap<u32, (u32, u32)>>> = Arc::default();
    let recognized = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for id in 1..=HOSTS {
        let (dev, total, violations, ledger, recognized) = (
            dev.clone(),
            total.clone(),
            violations.clone(),
            ledger.clone(),
            recognized.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let link = Arc::new(HostLink::new(dev.clone()));
                let mut o = JoinOptions::new([id; 16], format!("host-{id}"));
                o.tuning.poll_max = Duration::from_millis(2);
                let ls = Lockspace::join(link.clone(), 0, o).await.unwrap();
                let oracle_base = 6000 * u64::from(BS);
                let mut seq = 0u64;
                let mut rng = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                while total.load(Ordering::Relaxed) < TARGET {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let r = (rng % u64::from(RESOURCES)) as u32;
                    let exclusive = rng % 4 != 0;
                    if rng % 97 == 0 {
                        link.lose_next_ack(1);
                    }
                    let mode = if exclusive {
                        LockMode::Exclusive
                    } else {
                        LockMode::SharedRead
                    };
                    let g = ls.lock(res(&format!("res{r}")), mode).await.unwrap();
                    {
                        let mut l = ledger.lock().unwrap();
                        let e = l.entry(r).or_default();
                        if e.0 > 0 || (exclusive && e.1 > 0) {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                        if exclusive {
                            e.0 += 1
                        } else {
                            e.1 += 1
                        }
                    }
                    let off = oracle_base + u64::from(r) * u64::from(BS);
                    if exclusive {
                        seq += 1;
                        let mut stamp = vec![0u8; BS as usize];
                        stamp[0] = id;
                        stamp[8..16].copy_from_slice(&seq.to_le_bytes());
                        let stamp = Bytes::from(stamp);
                        g.fence().check().unwrap();
                        dev.write(off, stamp.clone(), WriteFlags::default())
                            .await
                            .unwrap();
                        tokio::task::yield_now().await;
                        std::thread::yield_now();
                        if dev.read(off, BS as usize).await.unwrap() != stamp {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        let before = dev.read(off, BS as usize).await.unwrap();
                        std::thread::yield_now();
                        if dev.read(off, BS as usize).await.unwrap() != before {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    {
                        let mut l = ledger.lock().unwrap();
                        let e = l.entry(r).or_default();
                        if exclusive {
                            e.0 -= 1
                        } else {
                            e.1 -= 1
                        }
                    }
                    g.unlock().await.unwrap();
                    total.fetch_add(1, Ordering::Relaxed);
                }
                recognized.fetch_add(ls.metrics().own_image_recognized_total, Ordering::Relaxed);
                assert_eq!(ls.state(), HostState::Live);
                ls.leave().await.unwrap();
            });
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let n = total.load(Ordering::Relaxed);
    println!(
        "oracle: {n} acquisitions, {} violations, {} lost CAW answers recognised",
        violations.load(Ordering::Relaxed),
        recognized.load(Ordering::Relaxed)
    );
    assert!(n >= TARGET);
    assert_eq!(violations.load(Ordering::Relaxed), 0);
    assert!(recognized.load(Ordering::Relaxed) > 0);
}

//! A model check (stateright) of the acquire / renew / takeover / break protocol with
//! crashes, pauses, delayed and lost answers, and in-flight writes.
//!
//! Time is discrete (ticks) and global; each host reads it as its monotonic clock (the
//! model has no drift: DESIGN.md bounds drift separately). Timers are kept relative
//! (lease time left, ages of observations and in-flight requests, capped where larger
//! values make no difference), so the state space is finite without a time horizon. Parameters in ticks: lease
//! `L`, dead-host timeout `D`, protected-write time bound `W` (a write is issued only
//! with more than `W` lease left and lands within `W`).
//!
//! Modelled exactly as implemented:
//! - Renewal is a CAW issued at `t_i`, landing later (any time), acknowledged later or
//!   never; the lease runs from `t_i` of the last *acknowledged* renewal.
//! - An observer timestamps an image when a read returns it; it may take the slot over
//!   (CAW from that image, generation + 1) `D` ticks later.
//! - The taker transfers the dead incarnation's lock entry to the new generation, then
//!   (later) removes it and frees the slot; it may crash or pause at any point, and its
//!   own lease must be valid for each step. Recovering slots are not renewed in the
//!   model, so a slow recoverer is itself taken over: more interleavings, not fewer.
//! - Acquire is a CAW of the record granted only if the record is free or its entry is
//!   stale (slot free, or live under another generation); release and value-block
//!   writes are CAWs that need the host's own entry.
//! - Hosts crash (forever) or pause and resume at any time; a paused host does nothing
//!   but its in-flight requests still land. To keep the space finite and small, a run
//!   has at most one crash and one pause, and heartbeat counters count modulo 2 (an
//!   observer only needs to see *a* change).
//!
//! Properties:
//! - `mutual exclusion`: at most one live host believes it holds the lock with an
//!   unexpired lease;
//! - `no stale write lands`: every protected data write lands while the record still
//!   names its issuer (slot, generation), i.e. before any takeover fenced it;
//! - `no stale value-block write`: a value-block CAW never succeeds for a host whose
//!   entry is gone (it cannot, by construction of CAW; checked anyway);
//! - reachability (`sometimes`): a takeover followed by a grant to another host
//!   happens, so the model does exercise recovery.

use stateright::{Checker, Model, Property};

const N: usize = 2;
const L: u8 = 2;
const D: u8 = 3;
const W: u8 = 1;
/// Steps explored (bounded model check; `LOCKMGR_MODEL_DEPTH` overrides).
const DEPTH: usize = 20;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum SState {
    Free,
    Live,
    Recovering,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct SlotM {
    gen: u8,
    ctr: u8,
    state: SState,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct HostM {
    crashed: bool,
    paused: bool,
    lost: bool,
    gen: u8,
    /// Lease time left (ticks): `issue + L - now` of the last acknowledged renewal.
    lease_left: u8,
    /// In-flight renewal: age (capped at L), the counter it expects, and (once landed)
    /// whether it applied.
    renewal: Option<(u8, u8, Option<bool>)>,
    /// Last image seen of each slot and its age (capped at D).
    obs: [(SlotM, u8); N],
    holds: bool,
    /// In-flight protected data write: its age.
    write: Option<u8>,
    /// In-flight value-block CAW: the record image it compares against.
    vb_write: Option<Option<(u8, u8)>>,
    /// A slot this host is recovering, and whether its entry was transferred.
    recovering: Option<(u8, bool)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct St {
    slots: [SlotM; N],
    /// The lock record's holder: (slot, generation).
    rec: Option<(u8, u8)>,
    hosts: [HostM; N],
    bad_write: bool,
    bad_vb: bool,
    took_over: bool,
    granted_after_takeover: bool,
    crashes: u8,
    pauses: u8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Act {
    Tick,
    RenewIssue(u8),
    RenewLand(u8),
    RenewAck(u8),
    Observe(u8, u8),
    TakeOver(u8, u8),
    Transfer(u8),
    Finish(u8),
    Acquire(u8),
    Release(u8),
    WriteIssue(u8),
    WriteLand(u8),
    VbIssue(u8),
    VbLand(u8),
    Crash(u8),
    Pause(u8),
    Resume(u8),
}

struct Lm;

impl St {
    fn lease_ok(&self, h: usize) -> bool {
        let x = &self.hosts[h];
        !x.lost && x.lease_left > 0
    }
    fn stale(&self, (s, g): (u8, u8)) -> bool {
        let slot = self.slots[usize::from(s)];
        match slot.state {
            SState::Free => true,
            SState::Live => slot.gen != g,
            SState::Recovering => false,
        }
    }
}

impl Model for Lm {
    type State = St;
    type Action = Act;

    fn init_states(&self) -> Vec<St> {
        let slot = SlotM {
            gen: 1,
            ctr: 0,
            state: SState::Live,
        };
        let host = HostM {
            crashed: false,
            paused: false,
            lost: false,
            gen: 1,
            lease_left: L,
            renewal: None,
            obs: [(slot, 0); N],
            holds: false,
            write: None,
            vb_write: None,
            recovering: None,
        };
        vec![St {
            slots: [slot; N],
            rec: None,
            hosts: [host; N],
            bad_write: false,
            bad_vb: false,
            took_over: false,
            granted_after_takeover: false,
            crashes: 0,
            pauses: 0,
        }]
    }

    fn actions(&self, s: &St, acts: &mut Vec<Act>) {
        // Time may pass unless an in-flight protected write would overrun its bound.
        let overdue = s.hosts.iter().any(|h| h.write.is_some_and(|age| age >= W));
        if !overdue {
            acts.push(Act::Tick);
        }
        for h in 0..N as u8 {
            let x = &s.hosts[usize::from(h)];
            let hu = usize::from(h);
            if x.renewal.is_some_and(|r| r.2.is_none()) {
                acts.push(Act::RenewLand(h));
            }
            if x.write.is_some() {
                acts.push(Act::WriteLand(h));
            }
            if x.vb_write.is_some() {
                acts.push(Act::VbLand(h));
            }
            if x.crashed {
                continue;
            }
            if x.paused {
                acts.push(Act::Resume(h));
                continue;
            }
            if x.lost {
                continue;
            }
            // At most one crash per run keeps the space small; pauses are free.
            if s.crashes == 0 {
                acts.push(Act::Crash(h));
            }
            if s.pauses == 0 {
                acts.push(Act::Pause(h));
            }
            if x.renewal.is_some_and(|r| r.2.is_some()) {
                acts.push(Act::RenewAck(h));
            }
            if !s.lease_ok(hu) {
                continue;
            }
            if x.renewal.is_none() {
                acts.push(Act::RenewIssue(h));
            }
            for o in 0..N as u8 {
                if o != h {
                    acts.push(Act::Observe(h, o));
                    let (img, seen) = x.obs[usize::from(o)];
                    let slot = s.slots[usize::from(o)];
                    if img == slot
                        && slot.state != SState::Free
                        && seen >= D
                        && x.recovering.is_none()
                    {
                        acts.push(Act::TakeOver(h, o));
                    }
                }
            }
            if x.recovering.is_some() {
                acts.push(Act::Transfer(h));
                acts.push(Act::Finish(h));
            }
            if !x.holds {
                acts.push(Act::Acquire(h));
            } else {
                // Contract: unlock only after the protected writes completed.
                if x.write.is_none() {
                    acts.push(Act::Release(h));
                }
                if x.write.is_none() && x.lease_left > W {
                    acts.push(Act::WriteIssue(h));
                }
                if x.vb_write.is_none() {
                    acts.push(Act::VbIssue(h));
                }
            }
        }
    }

    fn next_state(&self, s: &St, a: Act) -> Option<St> {
        let mut n = s.clone();
        match a {
            Act::Tick => {
                for x in n.hosts.iter_mut() {
                    x.lease_left = x.lease_left.saturating_sub(1);
                    if let Some(r) = &mut x.renewal {
                        r.0 = (r.0 + 1).min(L);
                    }
                    for o in x.obs.iter_mut() {
                        o.1 = (o.1 + 1).min(D);
                    }
                    if let Some(w) = &mut x.write {
                        *w += 1;
                    }
                }
            }
            Act::RenewIssue(h) => {
                let hu = usize::from(h);
                let ctr = n.hosts[hu].obs_self_ctr(&n.slots, hu);
                n.hosts[hu].renewal = Some((0, ctr, None));
            }
            Act::RenewLand(h) => {
                let hu = usize::from(h);
                let (i, c, _) = n.hosts[hu].renewal?;
                let slot = &mut n.slots[hu];
                let ok = slot.state == SState::Live && slot.gen == n.hosts[hu].gen && slot.ctr == c;
                if ok {
                    slot.ctr = (slot.ctr + 1) % 2;
                }
                n.hosts[hu].renewal = Some((i, c, Some(ok)));
            }
            Act::RenewAck(h) => {
                let hu = usize::from(h);
                let (i, _, landed) = n.hosts[hu].renewal?;
                if landed == Some(true) {
                    n.hosts[hu].lease_left = n.hosts[hu].lease_left.max(L - i);
                } else {
                    n.hosts[hu].lost = true;
                }
                n.hosts[hu].renewal = None;
            }
            Act::Observe(h, o) => {
                let (img, _) = n.hosts[usize::from(h)].obs[usize::from(o)];
                let cur = n.slots[usize::from(o)];
                if img != cur {
                    n.hosts[usize::from(h)].obs[usize::from(o)] = (cur, 0);
                }
            }
            Act::TakeOver(h, o) => {
                let slot = &mut n.slots[usize::from(o)];
                slot.gen += 1;
                slot.ctr = 0;
                slot.state = SState::Recovering;
                let cur = *slot;
                n.hosts[usize::from(h)].recovering = Some((o, false));
                n.hosts[usize::from(h)].obs[usize::from(o)] = (cur, 0);
                n.took_over = true;
            }
            Act::Transfer(h) => {
                let (o, _) = n.hosts[usize::from(h)].recovering?;
                let slot = n.slots[usize::from(o)];
                if slot.state != SState::Recovering {
                    n.hosts[usize::from(h)].recovering = None;
                    return Some(n);
                }
                if let Some((rs, rg)) = n.rec {
                    if rs == o && rg != slot.gen {
                        n.rec = Some((o, slot.gen));
                    }
                }
                n.hosts[usize::from(h)].recovering = Some((o, true));
            }
            Act::Finish(h) => {
                let (o, transferred) = n.hosts[usize::from(h)].recovering?;
                if !transferred {
                    return None;
                }
                let slot = n.slots[usize::from(o)];
                // The CAW to free the slot needs the image this host wrote (it did not
                // renew it in the model, so: still recovering, same generation).
                if slot.state == SState::Recovering
                    && n.hosts[usize::from(h)].obs[usize::from(o)].0 == slot
                {
                    if n.rec == Some((o, slot.gen)) {
                        n.rec = None;
                    }
                    n.slots[usize::from(o)].state = SState::Free;
                }
                n.hosts[usize::from(h)].recovering = None;
            }
            Act::Acquire(h) => {
                let hu = usize::from(h);
                let free = match n.rec {
                    None => true,
                    Some(e) => e.0 != h && n.stale(e),
                };
                if !free {
                    return None;
                }
                n.rec = Some((h, n.hosts[hu].gen));
                n.hosts[hu].holds = true;
                if n.took_over {
                    n.granted_after_takeover = true;
                }
            }
            Act::Release(h) => {
                let hu = usize::from(h);
                if n.rec == Some((h, n.hosts[hu].gen)) {
                    n.rec = None;
                }
                n.hosts[hu].holds = false;
            }
            Act::WriteIssue(h) => n.hosts[usize::from(h)].write = Some(0),
            Act::WriteLand(h) => {
                let hu = usize::from(h);
                if n.rec != Some((h, n.hosts[hu].gen)) {
                    n.bad_write = true;
                }
                n.hosts[hu].write = None;
            }
            Act::VbIssue(h) => {
                let hu = usize::from(h);
                // The CAW compares against the image the host last knew: its own entry.
                n.hosts[hu].vb_write = Some(Some((h, n.hosts[hu].gen)));
            }
            Act::VbLand(h) => {
                let hu = usize::from(h);
                let expect = n.hosts[hu].vb_write?;
                if n.rec == expect {
                    // Applied: it must be the holder's own current entry.
                    if expect != Some((h, n.hosts[hu].gen)) {
                        n.bad_vb = true;
                    }
                } else if n.hosts[hu].holds && n.rec.map(|e| e.0) != Some(h) {
                    // Refused: the host learns it no longer holds the lock.
                    n.hosts[hu].holds = false;
                }
                n.hosts[hu].vb_write = None;
            }
            Act::Crash(h) => {
                n.hosts[usize::from(h)].crashed = true;
                n.crashes += 1;
            }
            Act::Pause(h) => {
                n.hosts[usize::from(h)].paused = true;
                n.pauses += 1;
            }
            Act::Resume(h) => n.hosts[usize::from(h)].paused = false,
        }
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("mutual exclusion", |_, s: &St| {
                (0..N)
                    .filter(|&h| !s.hosts[h].crashed && s.hosts[h].holds && s.lease_ok(h))
                    .count()
                    <= 1
            }),
            Property::always("no stale write lands", |_, s: &St| !s.bad_write),
            Property::always("no stale value-block write", |_, s: &St| !s.bad_vb),
            Property::sometimes("takeover then grant", |_, s: &St| s.granted_after_takeover),
        ]
    }

    fn within_boundary(&self, s: &St) -> bool {
        s.slots.iter().all(|x| x.gen <= 4)
    }
}

impl HostM {
    /// The counter a renewal expects: the host's last known image of its own slot
    /// (the model's hosts know their slot exactly when they wrote it last).
    fn obs_self_ctr(&self, slots: &[SlotM; N], me: usize) -> u8 {
        let s = slots[me];
        if s.gen == self.gen {
            s.ctr
        } else {
            // Taken over: the renewal will miscompare.
            u8::MAX
        }
    }
}

#[test]
fn model_check_lock_protocol() {
    let depth: usize = std::env::var("LOCKMGR_MODEL_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(DEPTH);
    let started = std::time::Instant::now();
    let checker = Lm
        .checker()
        .threads(2)
        .target_max_depth(depth)
        .spawn_bfs()
        .join();
    println!(
        "model: {} states, {} unique, depth {depth}, hosts {N}, L={L} D={D} W={W}, {:?}",
        checker.state_count(),
        checker.unique_state_count(),
        started.elapsed()
    );
    checker.assert_properties();
}

/// The check has teeth: a host that keeps writing without checking its lease (no
/// self-fencing) has a stale write land after a takeover, and the checker finds it.
#[test]
fn model_check_finds_a_bug_without_the_margin() {
    struct NoMargin;
    impl Model for NoMargin {
        type State = St;
        type Action = Act;
        fn init_states(&self) -> Vec<St> {
            Lm.init_states()
        }
        fn actions(&self, s: &St, acts: &mut Vec<Act>) {
            Lm.actions(s, acts);
            // Let a holder issue writes until the very end of a lease of D ticks.
            for h in 0..N as u8 {
                let x = &s.hosts[usize::from(h)];
                if !x.crashed
                    && !x.paused
                    && x.holds
                    && x.write.is_none()
                    && !acts.contains(&Act::WriteIssue(h))
                {
                    acts.push(Act::WriteIssue(h));
                }
            }
        }
        fn next_state(&self, s: &St, a: Act) -> Option<St> {
            Lm.next_state(s, a)
        }
        fn properties(&self) -> Vec<Property<Self>> {
            vec![Property::always("no stale write lands", |_, s: &St| {
                !s.bad_write
            })]
        }
        fn within_boundary(&self, s: &St) -> bool {
            Lm.within_boundary(s)
        }
    }
    let checker = NoMargin
        .checker()
        .threads(2)
        .target_max_depth(DEPTH)
        .spawn_bfs()
        .join();
    assert!(checker.discovery("no stale write lands").is_some());
}

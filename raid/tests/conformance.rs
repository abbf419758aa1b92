//! The BlockDev conformance suite against an array of every level, healthy and (for
//! the redundant levels) degraded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::{conformance, SharedBlockDev};
use basalt_raid::Level;
use common::*;

async fn suite(level: Level, degraded: bool) {
    let name = format!("{level}{}", if degraded { " degraded" } else { "" });
    conformance::run(&name, || async move {
        let fs = fault_members(members_for(level), 24 << 20, false);
        let a = make(level, 65536, &fs).await;
        if degraded {
            fs[members_for(level) - 1].fail_device();
        }
        a as SharedBlockDev
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid0() {
    suite(Level::Raid0, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1() {
    suite(Level::Raid1, false).await;
    suite(Level::Raid1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10() {
    suite(Level::Raid10, false).await;
    suite(Level::Raid10, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5() {
    suite(Level::Raid5, false).await;
    suite(Level::Raid5, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6() {
    suite(Level::Raid6, false).await;
    suite(Level::Raid6, true).await;
}

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use basalt_blockdev::{BlockDev, WriteFlags};
use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_each_level_and_degraded() {
    for level in LEVELS {
        let fs = fault_members(members_for(level), MEMBER, false);
        let a = make(level, 16 << 10, &fs).await;
        let cap = a.geometry().capacity_bytes();
        let data = pattern(1, 300 << 10);
        a.write(8192, Bytes::from(data.clone()), WriteFlags::default())
            .await
            .unwrap();
        let got = a.read(8192, data.len()).await.unwrap();
        assert_eq!(diff(&got, &data), None, "{level}");
        if level.redundant() {
            fs[1].fail_device();
            let got = a.read(8192, data.len()).await.unwrap();
            assert_eq!(diff(&got, &data), None, "{level} degraded");
            let d2 = pattern(2, 100 << 10);
            a.write(4096 * 5, Bytes::from(d2.clone()), WriteFlags::default())
                .await
                .unwrap();
            let got = a.read(4096 * 5, d2.len()).await.unwrap();
            assert_eq!(diff(&got, &d2), None, "{level} degraded write");
            println!("{}", a.status().md_text());
        }
        println!("{level}: cap {cap} ok");
        a.stop().await.unwrap();
    }
}

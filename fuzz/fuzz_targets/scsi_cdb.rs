//! CDB decoding and execution: arbitrary CDB and Data-Out against a memory LUN; the
//! core must answer every input with a status, never panic.
#![no_main]

use basalt_blockdev::MemDev;
use basalt_scsi::cdb::{lba_and_len, transfer};
use basalt_scsi::{LogicalUnit, LunIdentity, LunResolver, NexusId};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

struct NoCopy;
impl LunResolver for NoCopy {
    fn resolve(&self, _: &[u8]) -> Option<Arc<LogicalUnit>> {
        None
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let n = usize::from(data[0] % 17).min(data.len() - 1);
    let cdb = &data[1..1 + n];
    let _ = transfer(cdb, 512);
    let _ = lba_and_len(cdb);
    let lu = LogicalUnit::new(Arc::new(MemDev::new(4096, 512)), LunIdentity::new(1), None);
    let nexus = NexusId { initiator: "iqn.f".into(), isid: [0; 6], target: "iqn.t".into(), rel_port: 1 };
    let out = Bytes::copy_from_slice(&data[1 + n..]);
    let r = block_on(lu.execute(&nexus, &NoCopy, cdb, out));
    let _ = r.sense_bytes();
});

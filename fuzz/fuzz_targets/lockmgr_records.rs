//! The lock manager's on-disk record decoders (header, heartbeat slot, lock record) on
//! arbitrary sectors: they must never panic, and whatever decodes must re-encode to
//! the same bytes (a sector that decodes is exactly what a writer would have written).
#![no_main]

use basalt_lockmgr::format::{Header, LockRecord, Slot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for sector in [512usize, 4096] {
        if data.len() < sector {
            continue;
        }
        let buf = &data[..sector];
        if let Ok(h) = Header::decode(buf, sector) {
            assert_eq!(h.encode(), buf);
        }
        if let Ok(s) = Slot::decode(buf, sector, 3) {
            if buf.iter().any(|&b| b != 0) {
                let _ = s.encode(sector);
            }
        }
        if let Ok(Some(r)) = LockRecord::decode(buf, sector, 3) {
            assert_eq!(r.encode(sector), buf);
        }
    }
});

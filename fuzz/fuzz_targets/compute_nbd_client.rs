//! The NBD client's side of the handshake (compute's `NbdDev`, how a VMM reaches the
//! daemon's LUNs) and its reply-header parser, fed what a hostile or broken server could
//! send, in fuzzer-chosen chunks: each call finishes, asks for more or fails; none
//! panics, loops or over-reads.
#![no_main]

use basalt_compute::nbd::wire::{parse_simple_reply, Handshake};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk.max(1));
    let mut hs = Handshake::new("lun0");
    let mut buf = Vec::new();
    for part in rest.chunks(chunk) {
        buf.extend_from_slice(part);
        match hs.handle_input(&mut buf) {
            Ok(Some(info)) => {
                assert!(info.min_block >= 1 && info.max_payload >= info.min_block);
                break;
            }
            Ok(None) => {
                let _ = hs.poll_transmit();
            }
            Err(_) => break,
        }
    }
    for header in rest.chunks_exact(16) {
        let mut h = [0u8; 16];
        h.copy_from_slice(header);
        let _ = parse_simple_reply(&h);
    }
});

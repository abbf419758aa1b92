//! The NBD handshake (fixed newstyle option haggling): any bytes, split anywhere, are
//! answered with well-formed option replies or refused with a close, never a panic,
//! and the core never buffers more than one bounded option.
#![no_main]

use basalt_nbd::handshake::MAX_OPTION_DATA;
use basalt_nbd::test_utils::{OptionReply, TestCatalog};
use basalt_nbd::{Handshake, HandshakeEvent, TlsPolicy};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&split, input)) = rest.split_first() else {
        return;
    };
    let tls = match mode % 3 {
        0 => TlsPolicy::Off,
        1 => TlsPolicy::Allow,
        _ => TlsPolicy::Require,
    };
    let mut cat = TestCatalog::one("a", 1 << 20, false);
    cat.add("ro", 4096, true);
    cat.deny("d");
    let mut hs = Handshake::new(tls);
    let _ = hs.poll_transmit();
    let step = usize::from(split).max(1);
    let mut buf = BytesMut::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let ev = hs.handle_input(&mut buf, &cat);
            let out = hs.poll_transmit().unwrap_or_default();
            if !matches!(ev, Some(HandshakeEvent::Go(_))) {
                let _ = OptionReply::parse_all(&out);
            }
            assert!(buf.len() <= 16 + MAX_OPTION_DATA as usize + step);
            match ev {
                Some(HandshakeEvent::StartTls) => hs.tls_established(),
                Some(_) => return,
                None => break,
            }
        }
    }
});

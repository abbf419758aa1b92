//! iSCSI PDU framing and the connection state machine on arbitrary bytes: never a
//! panic, never an allocation beyond the negotiated limits.
#![no_main]

use basalt_iscsi::catalog::{Catalog, LoginDenied, LoginGrant};
use basalt_iscsi::pdu::{parse, Framing};
use basalt_iscsi::{ConnConfig, Connection};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Instant;

struct Open;
impl Catalog for Open {
    fn login(&self, _: &str, _: Option<&str>, _: &str) -> Result<LoginGrant, LoginDenied> {
        Err(LoginDenied::NotFound)
    }
    fn send_targets(&self, _: &str, _: Option<&str>, _: &str) -> Vec<(String, Vec<String>)> {
        Vec::new()
    }
}

fuzz_target!(|data: &[u8]| {
    for (hd, dd) in [(false, false), (true, true)] {
        let f = Framing { header_digest: hd, data_digest: dd, max_data: 8192 };
        let mut b = BytesMut::from(data);
        while let Ok(p) = parse(&mut b, &f) {
            assert!(p.data.len() <= 8192);
        }
    }
    let mut c = Connection::new(ConnConfig::default(), Arc::new(Open), "127.0.0.1:3260".into(), Instant::now());
    let mut b = BytesMut::from(data);
    c.receive(&mut b, Instant::now());
    while c.poll_event().is_some() {}
    let _ = c.transmit();
});

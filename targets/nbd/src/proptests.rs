//! Property tests of the parsers, the same properties the fuzz targets
//! (`fuzz/fuzz_targets/nbd_handshake.rs`, `nbd_request.rs`) check: any input is either
//! parsed or refused, never panics, and never makes the core hold more than one bounded
//! message; framing does not depend on how the bytes are split.

use crate::handshake::{Handshake, HandshakeEvent, TlsPolicy, MAX_OPTION_DATA};
use crate::proto::{cmd, cmd_flags, opt, tx_flags, MAX_PAYLOAD};
use crate::test_utils::{opt_data_info, opt_data_meta, ClientMsg, OptionReply, TestCatalog};
use crate::transmission::{Command, Decoded, RequestHeader, Session};
use crate::{ExportInfo, NbdErrno, Negotiated, Output};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

/// Feeds `input` to a handshake in pieces; checks the output is well-formed option
/// replies (or the export info of EXPORT_NAME) and that the buffer stays bounded.
pub(crate) fn drive_handshake(input: &[u8], cuts: &[usize], tls: TlsPolicy) {
    let mut cat = TestCatalog::one("a", 1 << 20, false);
    cat.deny("d");
    let mut hs = Handshake::new(tls);
    let _ = hs.poll_transmit();
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut pieces: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    pieces.sort_unstable();
    pieces.push(input.len());
    for end in pieces {
        if end < at {
            continue;
        }
        buf.extend_from_slice(&input[at..end]);
        at = end;
        loop {
            let ev = hs.handle_input(&mut buf, &cat);
            let out = hs.poll_transmit().unwrap_or_default();
            // EXPORT_NAME answers with raw export info; everything else is option
            // replies, which must parse.
            if !matches!(ev, Some(HandshakeEvent::Go(_))) {
                let _ = OptionReply::parse_all(&out);
            }
            // Never more than one option's worth buffered.
            assert!(buf.len() <= 16 + MAX_OPTION_DATA as usize + input.len().min(1 << 16));
            match ev {
                Some(HandshakeEvent::StartTls) => hs.tls_established(),
                Some(_) => return,
                None => break,
            }
        }
    }
}

/// Decodes `input` with a session and encodes a reply for every decoded request.
pub(crate) fn drive_requests(input: &[u8], structured: bool, strict: bool, read_only: bool) {
    let export = ExportInfo {
        name: "a".into(),
        description: None,
        size: 1 << 20,
        min_block_size: 512,
        preferred_block_size: 4096,
        max_block_size: MAX_PAYLOAD,
        read_only,
        trim: true,
        multi_conn: true,
        rotational: false,
    };
    let flags = export.transmission_flags(structured);
    let neg = Negotiated {
        export,
        flags,
        structured,
        meta_context: structured.then_some(1),
        block_sizes_agreed: strict,
        tls: false,
    };
    let s = Session::new(&neg);
    let mut buf = BytesMut::from(input);
    let mut out = Output::new();
    loop {
        let before = buf.len();
        match s.decode(&mut buf) {
            Ok(Some(Decoded::Request(r))) => {
                assert!(buf.len() < before);
                match r.command {
                    Command::Read { offset, len, df } => {
                        assert!(offset + u64::from(len) <= 1 << 20);
                        let data = Bytes::from(vec![0u8; len as usize]);
                        s.reply_read(&mut out, r.handle, offset, &[data], df);
                    }
                    Command::Write { offset, data, .. } => {
                        assert!(!read_only);
                        assert!(offset + data.len() as u64 <= 1 << 20);
                        s.reply_ok(&mut out, r.handle);
                    }
                    Command::BlockStatus {
                        offset,
                        len,
                        req_one,
                    } => {
                        assert!(structured);
                        let ext = [crate::StatusExtent {
                            len: 1 << 20,
                            flags: 3,
                        }];
                        s.reply_block_status(&mut out, r.handle, (offset, len, req_one), 0, &ext);
                    }
                    _ => s.reply_ok(&mut out, r.handle),
                }
            }
            Ok(Some(Decoded::Reject {
                handle,
                errno,
                message,
                ..
            })) => {
                assert!(buf.len() < before);
                s.reply_error(&mut out, handle, errno, message);
            }
            Ok(Some(Decoded::Disconnect)) => assert!(buf.len() < before),
            Ok(None) => {
                assert_eq!(buf.len(), before);
                assert!(buf.len() < 28 + MAX_PAYLOAD as usize);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = out.take();
}

fn arb_request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
    (
        prop_oneof![
            Just(cmd::READ),
            Just(cmd::WRITE),
            Just(cmd::FLUSH),
            Just(cmd::TRIM),
            Just(cmd::CACHE),
            Just(cmd::WRITE_ZEROES),
            Just(cmd::BLOCK_STATUS),
            Just(99u16),
        ],
        prop_oneof![Just(0u16), Just(cmd_flags::FUA), 0u16..64],
        prop_oneof![(0u64..2048).prop_map(|b| b * 512), any::<u64>()],
        prop_oneof![(0u32..64).prop_map(|b| b * 512), 0u32..70000],
    )
}

/// The verdict the protocol document asks for, computed independently of the code
/// under test (structured replies, metadata context, block sizes agreed, writable).
fn expected(kind: u16, flags: u16, offset: u64, len: u32) -> Option<NbdErrno> {
    let size = 1u64 << 20;
    let allowed = cmd_flags::FUA
        | match kind {
            cmd::READ => cmd_flags::DF,
            cmd::WRITE_ZEROES => cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
            _ => 0,
        };
    if ![0, 1, 3, 4, 5, 6, 7].contains(&kind) || flags & !allowed != 0 {
        return Some(NbdErrno::Inval);
    }
    if kind == cmd::FLUSH {
        return None;
    }
    let end = offset.checked_add(u64::from(len));
    if end.is_none_or(|e| e > size) {
        return Some(if kind == cmd::WRITE || kind == cmd::WRITE_ZEROES {
            NbdErrno::NoSpc
        } else {
            NbdErrno::Inval
        });
    }
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Some(NbdErrno::Inval);
    }
    if kind == cmd::BLOCK_STATUS && len == 0 {
        return Some(NbdErrno::Inval);
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn handshake_never_panics_on_random_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        tls in prop_oneof![Just(TlsPolicy::Off), Just(TlsPolicy::Allow), Just(TlsPolicy::Require)],
    ) {
        drive_handshake(&input, &cuts, tls);
    }

    #[test]
    fn handshake_survives_corrupted_valid_sessions(
        flip in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut s = 1u32.to_be_bytes().to_vec();
        s.extend(ClientMsg::option(opt::LIST, &[]));
        s.extend(ClientMsg::option(opt::STRUCTURED_REPLY, &[]));
        s.extend(ClientMsg::option(opt::LIST_META_CONTEXT, &opt_data_meta("a", &["base:"])));
        s.extend(ClientMsg::option(opt::SET_META_CONTEXT, &opt_data_meta("a", &["base:allocation"])));
        s.extend(ClientMsg::option(opt::INFO, &opt_data_info("d", &[1, 2, 3])));
        s.extend(ClientMsg::option(opt::GO, &opt_data_info("a", &[3])));
        for (at, x) in flip {
            let i = at % s.len();
            s[i] ^= x;
        }
        drive_handshake(&s, &cuts, TlsPolicy::Off);
    }

    #[test]
    fn request_parser_never_panics(
        input in proptest::collection::vec(any::<u8>(), 0..4096),
        structured: bool, strict: bool, ro: bool,
    ) {
        drive_requests(&input, structured, strict, ro);
    }

    #[test]
    fn requests_get_the_documented_verdict(reqs in proptest::collection::vec(arb_request(), 1..20)) {
        let mut stream = BytesMut::new();
        for (i, &(kind, flags, offset, len)) in reqs.iter().enumerate() {
            let h = RequestHeader { flags, kind, handle: i as u64, offset, len };
            stream.extend_from_slice(&h.encode());
            if kind == cmd::WRITE {
                stream.extend_from_slice(&vec![0x5a; len as usize]);
            }
        }
        let export = ExportInfo {
            name: "a".into(), description: None, size: 1 << 20, min_block_size: 512,
            preferred_block_size: 4096, max_block_size: MAX_PAYLOAD, read_only: false,
            trim: true, multi_conn: true, rotational: false,
        };
        let flags = export.transmission_flags(true);
        prop_assert!(flags & tx_flags::SEND_DF != 0);
        let s = Session::new(&Negotiated {
            export, flags, structured: true, meta_context: Some(1),
            block_sizes_agreed: true, tls: false,
        });
        for (i, &(kind, flags, offset, len)) in reqs.iter().enumerate() {
            let d = s.decode(&mut stream).unwrap().unwrap();
            let got = match d {
                Decoded::Request(r) => { prop_assert_eq!(r.handle, i as u64); None }
                Decoded::Reject { handle, errno, .. } => { prop_assert_eq!(handle, i as u64); Some(errno) }
                Decoded::Disconnect => unreachable!(),
            };
            prop_assert_eq!(got, expected(kind, flags, offset, len), "kind {} flags {:#x} offset {} len {}", kind, flags, offset, len);
        }
        prop_assert!(stream.is_empty());
    }

    #[test]
    fn framing_does_not_depend_on_splits(
        reqs in proptest::collection::vec(arb_request(), 1..10),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut stream = Vec::new();
        for (i, &(kind, flags, offset, len)) in reqs.iter().enumerate() {
            let len = if kind == cmd::WRITE { len.min(8192) } else { len };
            let h = RequestHeader { flags, kind, handle: i as u64, offset, len };
            stream.extend_from_slice(&h.encode());
            if kind == cmd::WRITE {
                stream.extend_from_slice(&vec![i as u8; len as usize]);
            }
        }
        let export = ExportInfo {
            name: "a".into(), description: None, size: 1 << 20, min_block_size: 512,
            preferred_block_size: 4096, max_block_size: MAX_PAYLOAD, read_only: false,
            trim: true, multi_conn: true, rotational: false,
        };
        let flags = export.transmission_flags(false);
        let s = Session::new(&Negotiated {
            export, flags, structured: false, meta_context: None,
            block_sizes_agreed: false, tls: false,
        });
        let whole = {
            let mut b = BytesMut::from(&stream[..]);
            let mut v = Vec::new();
            while let Some(d) = s.decode(&mut b).unwrap() { v.push(d); }
            v
        };
        let mut pieces: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        pieces.sort_unstable();
        pieces.push(stream.len());
        let mut b = BytesMut::new();
        let mut at = 0;
        let mut split = Vec::new();
        for end in pieces {
            b.extend_from_slice(&stream[at..end]);
            at = end;
            while let Some(d) = s.decode(&mut b).unwrap() { split.push(d); }
        }
        prop_assert_eq!(whole.len(), reqs.len());
        prop_assert_eq!(whole, split);
    }
}

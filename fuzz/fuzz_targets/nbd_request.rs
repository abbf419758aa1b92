//! The NBD transmission-phase request parser and reply encoder: any bytes decode into
//! requests, refusals with the right NBD error, or a framing error that closes the
//! connection, never a panic; decoded requests stay inside the export; and every reply
//! encodes.
#![no_main]

use basalt_nbd::proto::MAX_PAYLOAD;
use basalt_nbd::{Command, Decoded, ExportInfo, Negotiated, Output, Session, StatusExtent};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 != 0;
    let export = ExportInfo {
        name: "a".into(),
        description: None,
        size: SIZE,
        min_block_size: 512,
        preferred_block_size: 4096,
        max_block_size: MAX_PAYLOAD,
        read_only: mode & 2 != 0,
        trim: mode & 4 != 0,
        multi_conn: true,
        rotational: false,
    };
    let flags = export.transmission_flags(structured);
    let s = Session::new(&Negotiated {
        export,
        flags,
        structured,
        meta_context: (structured && mode & 8 != 0).then_some(1),
        block_sizes_agreed: mode & 16 != 0,
        tls: false,
    });
    let mut buf = BytesMut::from(input);
    let mut out = Output::new();
    loop {
        let before = buf.len();
        match s.decode(&mut buf) {
            Ok(Some(Decoded::Request(r))) => {
                assert!(buf.len() < before);
                match r.command {
                    Command::Read { offset, len, df } => {
                        assert!(offset + u64::from(len) <= SIZE);
                        let data = Bytes::from(vec![(offset % 7) as u8; len as usize]);
                        s.reply_read(&mut out, r.handle, offset, &[data], df);
                    }
                    Command::Write { offset, data, .. } => {
                        assert!(offset + data.len() as u64 <= SIZE);
                        s.reply_ok(&mut out, r.handle);
                    }
                    Command::BlockStatus {
                        offset,
                        len,
                        req_one,
                    } => {
                        let ext = [
                            StatusExtent {
                                len: offset / 512 * 512 + 512,
                                flags: 0,
                            },
                            StatusExtent {
                                len: SIZE,
                                flags: 3,
                            },
                        ];
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
                break;
            }
            Err(_) => break,
        }
    }
    let _ = out.take();
});

//! The NBD wire format, client side, sans-IO: the fixed-newstyle handshake as a state
//! machine ([`Handshake`]) and the transmission-phase request and simple-reply encodings.
//!
//! Nothing here reads a socket or a clock, so the handshake is tested against byte
//! transcripts and fuzzed (`fuzz/fuzz_targets/compute_nbd_client.rs`).

use super::NbdError;

/// `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic and the option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Server handshake flag: no zero padding after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;

/// NBD_OPT_GO.
pub const OPT_GO: u32 = 7;
/// NBD_REP_ACK.
pub const REP_ACK: u32 = 1;
/// NBD_REP_INFO.
pub const REP_INFO: u32 = 3;
/// NBD_INFO_EXPORT.
pub const INFO_EXPORT: u16 = 0;
/// NBD_INFO_BLOCK_SIZE.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server takes NBD_CMD_FLUSH.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours NBD_CMD_FLAG_FUA.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server takes NBD_CMD_TRIM.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server takes NBD_CMD_WRITE_ZEROES.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server honours NBD_CMD_FLAG_FAST_ZERO.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Request flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1;
/// Request flag: write zeroes without punching a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Request flag: fail write-zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Transmission commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// NBD_CMD_READ.
    Read = 0,
    /// NBD_CMD_WRITE.
    Write = 1,
    /// NBD_CMD_DISC.
    Disconnect = 2,
    /// NBD_CMD_FLUSH.
    Flush = 3,
    /// NBD_CMD_TRIM.
    Trim = 4,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes = 6,
}

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Minimum block size (1 when the server did not say).
    pub min_block: u32,
    /// Preferred block size (4096 when the server did not say).
    pub preferred_block: u32,
    /// Maximum payload (32 MiB when the server did not say).
    pub max_payload: u32,
}

/// The 28-byte header of a transmission request (a write's data follows it).
pub fn encode_request(cmd: Command, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A parsed simple reply header: `(errno, handle)`.
pub fn parse_simple_reply(b: &[u8; 16]) -> Result<(u32, u64), NbdError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "reply magic {magic:#x} (structured replies were not negotiated)"
        )));
    }
    let errno = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let mut h = [0u8; 8];
    h.copy_from_slice(&b[8..16]);
    Ok((errno, u64::from_be_bytes(h)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    ReplyHeader,
    ReplyData { reply: u32, len: usize },
    Done,
}

/// The client side of the fixed-newstyle handshake with NBD_OPT_GO.
///
/// Call order: after [`Handshake::new`], send what [`Handshake::poll_transmit`] returns,
/// append every byte received to a buffer and call [`Handshake::handle_input`] with it
/// (it consumes what it used), send again, until `handle_input` returns the export
/// information. The buffer then holds no more bytes (a server does not talk first in the
/// transmission phase).
#[derive(Debug)]
pub struct Handshake {
    export: String,
    state: State,
    out: Vec<u8>,
    info: ExportInfo,
    have_export: bool,
}

/// The most bytes of option reply data accepted (a server's error message, say).
const MAX_REPLY_DATA: usize = 64 * 1024;

impl Handshake {
    /// Starts a handshake for `export`.
    pub fn new(export: &str) -> Self {
        Handshake {
            export: export.to_string(),
            state: State::Greeting,
            out: Vec::new(),
            info: ExportInfo {
                min_block: 1,
                preferred_block: 4096,
                max_payload: 32 << 20,
                ..ExportInfo::default()
            },
            have_export: false,
        }
    }

    /// Bytes to send to the server now, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// Consumes handshake bytes from the front of `buf`. Returns the export's
    /// information once the server acknowledged NBD_OPT_GO, `None` while more bytes are
    /// needed.
    pub fn handle_input(&mut self, buf: &mut Vec<u8>) -> Result<Option<ExportInfo>, NbdError> {
        loop {
            match self.state {
                State::Done => return Ok(Some(self.info)),
                State::Greeting => {
                    if buf.len() < 18 {
                        return Ok(None);
                    }
                    let magic = be64(&buf[0..8]);
                    let opt = be64(&buf[8..16]);
                    let flags = u16::from_be_bytes([buf[16], buf[17]]);
                    buf.drain(..18);
                    if magic != NBD_MAGIC {
                        return Err(NbdError::Protocol(format!(
                            "not an NBD server (magic {magic:#x})"
                        )));
                    }
                    if opt != IHAVEOPT {
                        return Err(NbdError::Protocol(
                            "oldstyle server; only newstyle is supported".into(),
                        ));
                    }
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(NbdError::Protocol("server is not fixed-newstyle".into()));
                    }
                    let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
                    self.out.extend_from_slice(&client_flags.to_be_bytes());
                    // NBD_OPT_GO: name, then one information request (block sizes).
                    let name = self.export.as_bytes();
                    let data_len = 4 + name.len() + 2 + 2;
                    self.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    self.out.extend_from_slice(&OPT_GO.to_be_bytes());
                    self.out.extend_from_slice(&(data_len as u32).to_be_bytes());
                    self.out
                        .extend_from_slice(&(name.len() as u32).to_be_bytes());
                    self.out.extend_from_slice(name);
                    self.out.extend_from_slice(&1u16.to_be_bytes());
                    self.out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    self.state = State::ReplyHeader;
                }
                State::ReplyHeader => {
                    if buf.len() < 20 {
                        return Ok(None);
                    }
                    let magic = be64(&buf[0..8]);
                    let opt = be32(&buf[8..12]);
                    let reply = be32(&buf[12..16]);
                    let len = be32(&buf[16..20]) as usize;
                    buf.drain(..20);
                    if magic != OPT_REPLY_MAGIC {
                        return Err(NbdError::Protocol(format!("option reply magic {magic:#x}")));
                    }
                    if opt != OPT_GO {
                        return Err(NbdError::Protocol(format!(
                            "reply to option {opt}, asked {OPT_GO}"
                        )));
                    }
                    if len > MAX_REPLY_DATA {
                        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
                    }
                    self.state = State::ReplyData { reply, len };
                }
                State::ReplyData { reply, len } => {
                    if buf.len() < len {
                        return Ok(None);
                    }
                    let data: Vec<u8> = buf.drain(..len).collect();
                    self.state = State::ReplyHeader;
                    if reply & (1 << 31) != 0 {
                        let msg = String::from_utf8_lossy(&data).into_owned();
                        return Err(NbdError::Refused {
                            export: self.export.clone(),
                            code: reply,
                            message: msg,
                        });
                    }
                    match reply {
                        REP_ACK => {
                            if !self.have_export {
                                return Err(NbdError::Protocol(
                                    "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                                ));
                            }
                            self.state = State::Done;
                        }
                        REP_INFO => self.handle_info(&data)?,
                        other => {
                            return Err(NbdError::Protocol(format!(
                                "unexpected option reply type {other}"
                            )))
                        }
                    }
                }
            }
        }
    }

    fn handle_info(&mut self, data: &[u8]) -> Result<(), NbdError> {
        if data.len() < 2 {
            return Err(NbdError::Protocol("empty NBD_REP_INFO".into()));
        }
        match u16::from_be_bytes([data[0], data[1]]) {
            INFO_EXPORT => {
                if data.len() != 12 {
                    return Err(NbdError::Protocol(format!(
                        "NBD_INFO_EXPORT of {} bytes",
                        data.len()
                    )));
                }
                self.info.size = be64(&data[2..10]);
                self.info.flags = u16::from_be_bytes([data[10], data[11]]);
                self.have_export = true;
            }
            INFO_BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(NbdError::Protocol(format!(
                        "NBD_INFO_BLOCK_SIZE of {} bytes",
                        data.len()
                    )));
                }
                let min = be32(&data[2..6]);
                let pref = be32(&data[6..10]);
                let max = be32(&data[10..14]);
                let pow2 = |v: u32| v.is_power_of_two() && v <= 64 * 1024;
                if !pow2(min) || !pow2(pref) || pref < min || max < min {
                    return Err(NbdError::Protocol(format!(
                        "bad block sizes {min}/{pref}/{max}"
                    )));
                }
                self.info.min_block = min;
                self.info.preferred_block = pref;
                self.info.max_payload = max;
            }
            // Information we did not ask for is allowed and ignored.
            _ => {}
        }
        Ok(())
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        reply(REP_INFO, &d)
    }

    #[test]
    fn handshake_byte_at_a_time() {
        let mut hs = Handshake::new("disk0");
        let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        server.extend(export_info(1 << 20, TF_SEND_FLUSH | 1));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        server.extend(reply(REP_INFO, &bs));
        server.extend(reply(REP_ACK, &[]));
        let mut buf = Vec::new();
        let mut sent = Vec::new();
        let mut done = None;
        for b in server {
            buf.push(b);
            if let Some(info) = hs.handle_input(&mut buf).expect("ok") {
                done = Some(info);
            }
            if let Some(out) = hs.poll_transmit() {
                sent.extend(out);
            }
        }
        let info = done.expect("done");
        assert_eq!(info.size, 1 << 20);
        assert_eq!(info.min_block, 512);
        assert_eq!(info.max_payload, 1 << 20);
        assert_eq!(&sent[0..4], &3u32.to_be_bytes());
        assert_eq!(&sent[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&sent[24..29], b"disk0");
    }

    #[test]
    fn refusal_carries_the_message() {
        let mut hs = Handshake::new("nope");
        let mut buf = greeting(1);
        buf.extend(reply((1 << 31) | 6, b"no such export"));
        let err = hs.handle_input(&mut buf).expect_err("refused");
        assert!(err.to_string().contains("no such export"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [vec![0u8; 18], greeting(0), vec![0xff; 64]] {
            let mut hs = Handshake::new("x");
            let mut buf = bytes;
            assert!(hs.handle_input(&mut buf).is_err());
        }
    }

    #[test]
    fn request_layout() {
        let r = encode_request(Command::Write, CMD_FLAG_FUA, 7, 4096, 512);
        assert_eq!(&r[0..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(
            parse_simple_reply(&{
                let mut b = [0u8; 16];
                b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                b[15] = 7;
                b
            })
            .expect("reply"),
            (0, 7)
        );
    }

    /// Fed any bytes after a valid greeting, in any chunking, the handshake either
    /// finishes, asks for more or fails: it never panics and never reads past its
    /// input (the fuzz target `compute_nbd_client` checks the same property).
    fn feed_all(bytes: &[u8], chunk: usize) {
        let mut hs = Handshake::new("export");
        let mut buf = Vec::new();
        for part in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(part);
            match hs.handle_input(&mut buf) {
                Ok(Some(info)) => {
                    assert!(info.min_block >= 1);
                    return;
                }
                Ok(None) => {
                    let _ = hs.poll_transmit();
                }
                Err(_) => return,
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn handshake_never_panics(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            chunk in 1usize..40,
            replies in proptest::collection::vec((0u32..5, 0u16..5, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)), 0..4),
        ) {
            let mut bytes = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            for (kind, info, data) in &replies {
                let mut d = info.to_be_bytes().to_vec();
                d.extend_from_slice(data);
                bytes.extend(reply(*kind, &d));
            }
            bytes.extend_from_slice(&tail);
            feed_all(&bytes, chunk);
            feed_all(&tail, chunk);
        }
    }
}

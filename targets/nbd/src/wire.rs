//! Byte-level helpers shared by the handshake and the transmission phase: the outgoing
//! byte queue ([`Output`]) and a bounds-checked big-endian reader.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Payloads at least this long are queued as they are (no copy); shorter ones are copied
/// next to the headers so that a vectored write does not carry many tiny slices.
const COPY_BELOW: usize = 512;

/// Bytes waiting to be written to the peer, in order: headers and small payloads are
/// copied into one growing buffer, large payloads (read data) are queued as shared
/// [`Bytes`] without copying, so the driver can hand them all to one vectored write.
#[derive(Debug, Default)]
pub struct Output {
    segs: VecDeque<Bytes>,
    head: BytesMut,
    len: usize,
}

impl Output {
    /// An empty queue.
    pub fn new() -> Self {
        Output::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a copy of `data`.
    pub fn put_slice(&mut self, data: &[u8]) {
        self.head.extend_from_slice(data);
        self.len += data.len();
    }

    /// Queues a big-endian u16.
    pub fn put_u16(&mut self, v: u16) {
        self.head.put_u16(v);
        self.len += 2;
    }

    /// Queues a big-endian u32.
    pub fn put_u32(&mut self, v: u32) {
        self.head.put_u32(v);
        self.len += 4;
    }

    /// Queues a big-endian u64.
    pub fn put_u64(&mut self, v: u64) {
        self.head.put_u64(v);
        self.len += 8;
    }

    /// Queues `data`, without copying when it is large.
    pub fn put_bytes(&mut self, data: Bytes) {
        if data.len() < COPY_BELOW {
            self.put_slice(&data);
            return;
        }
        self.seal_head();
        self.len += data.len();
        self.segs.push_back(data);
    }

    fn seal_head(&mut self) {
        if !self.head.is_empty() {
            self.segs.push_back(self.head.split().freeze());
        }
    }

    /// Fills `dst` with slices of the queued bytes, in order, and returns how many it
    /// filled. Pass the result to a vectored write, then call [`Output::advance`] with
    /// the number of bytes written.
    pub fn io_slices<'a>(&'a mut self, dst: &mut [IoSlice<'a>]) -> usize {
        self.seal_head();
        let mut n = 0;
        for (slot, seg) in dst.iter_mut().zip(self.segs.iter()) {
            *slot = IoSlice::new(seg);
            n += 1;
        }
        n
    }

    /// Drops the first `n` queued bytes (they were written).
    pub fn advance(&mut self, mut n: usize) {
        self.seal_head();
        self.len = self.len.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.segs.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }

    /// Takes everything queued as one contiguous buffer (copying); for tests and the
    /// handshake, where messages are small.
    pub fn take(&mut self) -> Bytes {
        self.seal_head();
        let out = match self.segs.len() {
            0 => Bytes::new(),
            1 => self.segs.pop_front().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.len);
                for seg in self.segs.drain(..) {
                    all.extend_from_slice(&seg);
                }
                all.freeze()
            }
        };
        self.segs.clear();
        self.len = 0;
        out
    }
}

/// A bounds-checked big-endian reader over a message body; every getter fails (with
/// `None`) instead of reading past the end.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Validates a protocol string: UTF-8, no NUL, at most [`MAX_STRING`](crate::proto::MAX_STRING)
/// bytes.
pub(crate) fn protocol_string(b: &[u8]) -> Option<String> {
    if b.len() > crate::proto::MAX_STRING || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn output_keeps_order_across_copied_and_shared_pieces() {
        let mut out = Output::new();
        out.put_u32(1);
        out.put_bytes(Bytes::from(vec![7u8; 4096]));
        out.put_u16(2);
        out.put_bytes(Bytes::from_static(b"tiny"));
        assert_eq!(out.len(), 4 + 4096 + 2 + 4);
        // Write it through a writer that takes at most 1000 bytes a call.
        let mut sink = Vec::new();
        while !out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let n = out.io_slices(&mut slices);
            let mut budget = 1000;
            let mut written = 0;
            for s in &slices[..n] {
                let take = s.len().min(budget);
                sink.write_all(&s[..take]).unwrap();
                written += take;
                budget -= take;
                if budget == 0 {
                    break;
                }
            }
            out.advance(written);
        }
        let mut expect = vec![0, 0, 0, 1];
        expect.extend_from_slice(&[7u8; 4096]);
        expect.extend_from_slice(&[0, 2]);
        expect.extend_from_slice(b"tiny");
        assert_eq!(sink, expect);
    }

    #[test]
    fn reader_refuses_to_overrun() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.bytes(1), Some(&[2u8][..]));
        assert_eq!(r.u32(), None);
    }

    #[test]
    fn protocol_strings() {
        assert_eq!(protocol_string(b"lun0").as_deref(), Some("lun0"));
        assert_eq!(protocol_string(b"a\0b"), None);
        assert_eq!(protocol_string(&[0xff, 0xfe]), None);
        assert_eq!(protocol_string(&vec![b'a'; 4097]), None);
    }
}

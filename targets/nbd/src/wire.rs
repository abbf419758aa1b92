//! Byte-level helpers shared by the handshake and the transmission phase: the outgoing
//! byte queue ([`Output`]) and a bounds-checked big-endian reader.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;

/// Payloads at least this long are queued as they are (no copy); shorter ones are copied
/// next to the headers so that a vectored write does not carry many tiny slices.
const COPY_BELOW: usize = 512;

/// Bytes waiting to be written to the peer, in order: headers and small payloads are
/// copied into one growing buffer, large payloads (read data) are queued as shared
/// [`Bytes`] without copying, so the driver can hand them all to one vectored write.
/// Read data may also be a range of a file in the page cache ([`FileRange`]), which
/// the driver sends with `sendfile(2)` (see [`Output::front_file`]).
#[derive(Debug, Default)]
pub struct Output {
    segs: VecDeque<Seg>,
    head: BytesMut,
    len: usize,
}

/// Bytes of a file that go to the peer as they are, from the page cache (the server's
/// device hands them out; the sans-IO core only queues them in order).
pub trait FileRange: std::fmt::Debug + Send + Sync {
    /// The file.
    fn file(&self) -> &File;
    /// Where the bytes start in the file.
    fn offset(&self) -> u64;
    /// How many bytes.
    fn len(&self) -> u64;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
enum Seg {
    Mem(Bytes),
    /// A file range, of which the first `sent` bytes have been written.
    File {
        range: Box<dyn FileRange>,
        sent: usize,
    },
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Mem(b) => b.len(),
            Seg::File { range, sent } => range.len() as usize - sent,
        }
    }
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
        self.segs.push_back(Seg::Mem(data));
    }

    /// Queues the bytes of a file range, to be sent from the page cache.
    pub fn put_file(&mut self, range: Box<dyn FileRange>) {
        if range.is_empty() {
            return;
        }
        self.seal_head();
        self.len += range.len() as usize;
        self.segs.push_back(Seg::File { range, sent: 0 });
    }

    fn seal_head(&mut self) {
        if !self.head.is_empty() {
            self.segs.push_back(Seg::Mem(self.head.split().freeze()));
        }
    }

    /// Fills `dst` with slices of the queued bytes, in order, up to the first file
    /// range, and returns how many it filled. Pass the result to a vectored write, then
    /// call [`Output::advance`] with the number of bytes written. Filling none while
    /// bytes are queued means a file range is first: see [`Output::front_file`].
    pub fn io_slices<'a>(&'a mut self, dst: &mut [IoSlice<'a>]) -> usize {
        self.seal_head();
        let mut n = 0;
        for (slot, seg) in dst.iter_mut().zip(self.segs.iter()) {
            let Seg::Mem(b) = seg else { break };
            *slot = IoSlice::new(b);
            n += 1;
        }
        n
    }

    /// When the next bytes to send are a file range: the file, the file offset to send
    /// from and how many bytes. Call [`Output::advance`] with the number sent.
    pub fn front_file(&mut self) -> Option<(&File, u64, usize)> {
        self.seal_head();
        match self.segs.front() {
            Some(Seg::File { range, sent }) => Some((
                range.file(),
                range.offset() + *sent as u64,
                range.len() as usize - sent,
            )),
            _ => None,
        }
    }

    /// Drops the first `n` queued bytes (they were written).
    pub fn advance(&mut self, mut n: usize) {
        self.seal_head();
        self.len = self.len.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                return;
            };
            let left = front.len();
            if n >= left {
                n -= left;
                self.segs.pop_front();
                continue;
            }
            match front {
                Seg::Mem(b) => {
                    let _ = b.split_to(n);
                }
                Seg::File { sent, .. } => *sent += n,
            }
            n = 0;
        }
    }

    /// Takes everything queued as one contiguous buffer (copying, and reading file
    /// ranges); for tests and the handshake, where messages are small. Fails only if a
    /// queued file range cannot be read, and then leaves the queue empty.
    pub fn take(&mut self) -> io::Result<Bytes> {
        self.seal_head();
        let mut all = BytesMut::with_capacity(self.len);
        let segs = std::mem::take(&mut self.segs);
        self.len = 0;
        if let (1, Some(Seg::Mem(b))) = (segs.len(), segs.front()) {
            return Ok(b.clone());
        }
        for seg in segs {
            match seg {
                Seg::Mem(b) => all.extend_from_slice(&b),
                Seg::File { range, sent } => {
                    let start = all.len();
                    all.resize(start + range.len() as usize - sent, 0);
                    range
                        .file()
                        .read_exact_at(&mut all[start..], range.offset() + sent as u64)?;
                }
            }
        }
        Ok(all.freeze())
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

    #[derive(Debug)]
    struct Range(File, u64, u64);

    impl FileRange for Range {
        fn file(&self) -> &File {
            &self.0
        }
        fn offset(&self) -> u64 {
            self.1
        }
        fn len(&self) -> u64 {
            self.2
        }
    }

    #[test]
    fn file_ranges_go_out_in_order_and_in_pieces() {
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).unwrap();
        let mut out = Output::new();
        out.put_u32(1);
        out.put_file(Box::new(Range(f.try_clone().unwrap(), 100, 5000)));
        out.put_u16(2);
        out.put_bytes(Bytes::from(vec![9u8; 600]));
        out.put_file(Box::new(Range(f.try_clone().unwrap(), 0, 0)));
        out.put_file(Box::new(Range(f.try_clone().unwrap(), 9000, 1000)));
        assert_eq!(out.len(), 4 + 5000 + 2 + 600 + 1000);
        let mut expect = vec![0, 0, 0, 1];
        expect.extend_from_slice(&content[100..5100]);
        expect.extend_from_slice(&[0, 2]);
        expect.extend_from_slice(&[9u8; 600]);
        expect.extend_from_slice(&content[9000..]);

        // As the driver sends: vectored writes up to a file range, then the range in
        // pieces of at most 1500 bytes.
        let mut sink = Vec::new();
        while !out.is_empty() {
            if let Some((file, offset, len)) = out.front_file() {
                let n = len.min(1500);
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, offset).unwrap();
                sink.extend_from_slice(&buf);
                out.advance(n);
                continue;
            }
            let mut slices = [IoSlice::new(&[]); 8];
            let n = out.io_slices(&mut slices);
            assert!(n > 0);
            let written: usize = slices[..n].iter().map(|s| s.len()).sum();
            for s in &slices[..n] {
                sink.extend_from_slice(s);
            }
            out.advance(written);
        }
        assert_eq!(sink, expect);

        // take() reads the ranges.
        out.put_u16(2);
        out.put_file(Box::new(Range(f, 9000, 1000)));
        let mut both = vec![0, 2];
        both.extend_from_slice(&content[9000..]);
        assert_eq!(out.take().unwrap(), both);
        assert!(out.is_empty());
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

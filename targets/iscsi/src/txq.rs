//! The outgoing byte queue of a connection: PDU headers are appended to a small
//! contiguous buffer, data segments are queued as the [`Bytes`] they came in (a read's
//! buffer from the block device goes to the socket without being copied). It is a
//! [`Buf`], so the driver hands [`Buf::chunks_vectored`] to one `writev` for everything
//! that is ready, and [`Buf::advance`]s by what the socket took.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Data segments up to this size are copied next to their header instead of taking an
/// I/O vector entry of their own.
const COPY_BELOW: usize = 512;

/// Bytes waiting to be written. See the [module docs](self).
#[derive(Debug, Default)]
pub struct TxQueue {
    /// Sealed pieces, in order, before `tail`.
    segs: VecDeque<Bytes>,
    /// Header bytes after the last sealed piece.
    tail: BytesMut,
    /// Total bytes queued.
    len: usize,
}

impl TxQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes that are copied (headers, padding, digests, short data).
    pub fn put_slice(&mut self, b: &[u8]) {
        if self.tail.capacity() - self.tail.len() < b.len() {
            self.tail.reserve(b.len().max(4096));
        }
        self.tail.extend_from_slice(b);
        self.len += b.len();
    }

    /// Appends a data segment without copying it (short ones are copied).
    pub fn put_bytes(&mut self, b: Bytes) {
        if b.len() < COPY_BELOW {
            self.put_slice(&b);
            return;
        }
        if !self.tail.is_empty() {
            self.segs.push_back(self.tail.split().freeze());
        }
        self.len += b.len();
        self.segs.push_back(b);
    }

    /// Number of queued pieces (I/O vector entries a full write would need).
    pub fn pieces(&self) -> usize {
        self.segs.len() + usize::from(!self.tail.is_empty())
    }

    /// Takes everything queued as one contiguous buffer (tests and tools; copies).
    pub fn take_all(&mut self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.len);
        for s in self.segs.drain(..) {
            out.extend_from_slice(&s);
        }
        out.extend_from_slice(&self.tail);
        self.tail.clear();
        self.len = 0;
        out
    }
}

impl Buf for TxQueue {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        match self.segs.front() {
            Some(s) => s,
            None => &self.tail,
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for s in &self.segs {
            if n == dst.len() {
                return n;
            }
            dst[n] = IoSlice::new(s);
            n += 1;
        }
        if n < dst.len() && !self.tail.is_empty() {
            dst[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of the queue");
        self.len -= cnt;
        while cnt > 0 {
            match self.segs.front_mut() {
                Some(s) if s.len() <= cnt => {
                    cnt -= s.len();
                    self.segs.pop_front();
                }
                Some(s) => {
                    s.advance(cnt);
                    return;
                }
                None => {
                    self.tail.advance(cnt);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever is queued and however the socket splits the writes, the bytes come
        /// out in order.
        #[test]
        fn drains_in_order(
            parts in proptest::collection::vec((any::<bool>(), 0usize..2000), 0..20),
            steps in proptest::collection::vec(1usize..3000, 1..50),
            iov in 1usize..8,
        ) {
            let mut q = TxQueue::new();
            let mut want = Vec::new();
            for (i, (copy, n)) in parts.iter().enumerate() {
                let b: Vec<u8> = (0..*n).map(|j| (i * 31 + j) as u8).collect();
                want.extend_from_slice(&b);
                if *copy { q.put_slice(&b) } else { q.put_bytes(Bytes::from(b)) }
            }
            prop_assert_eq!(q.remaining(), want.len());
            let mut got = Vec::new();
            let mut k = 0;
            while q.has_remaining() {
                let mut v = vec![IoSlice::new(&[]); iov];
                let cnt = q.chunks_vectored(&mut v);
                prop_assert!(cnt >= 1);
                let limit = steps[k % steps.len()];
                k += 1;
                let mut took = 0;
                for s in &v[..cnt] {
                    let t = s.len().min(limit - took);
                    got.extend_from_slice(&s[..t]);
                    took += t;
                    if took == limit { break; }
                }
                q.advance(took);
            }
            prop_assert_eq!(got, want);
        }
    }
}

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// A zero-filled heap buffer whose start is aligned for direct I/O.
///
/// O_DIRECT needs the buffer address, the offset and the length aligned to the device's
/// logical block size; [`AlignedBuf::ALIGN`] (4096) covers every block size we use.
/// [`AlignedBuf::freeze`] turns it into [`Bytes`] without copying, so a buffer read from
/// a disk travels up the stack and out to a socket as is.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The alignment of every buffer.
    pub const ALIGN: usize = 4096;

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        // A zero-sized layout may not be passed to the allocator; keep one page.
        let size = len.max(1).next_multiple_of(Self::ALIGN);
        let layout = match Layout::from_size_align(size, Self::ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("buffer of {len} bytes is too large"),
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Shortens the buffer to `len` bytes (no reallocation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Converts into [`Bytes`] without copying; the allocation lives as long as any
    /// clone or slice of the result.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// True when `data` starts at an address aligned to `align`.
    pub fn is_aligned(data: &[u8], align: usize) -> bool {
        (data.as_ptr() as usize).is_multiple_of(align)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert!(AlignedBuf::is_aligned(buf.as_slice(), AlignedBuf::ALIGN));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn freeze_keeps_bytes_and_alignment() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[100] = 7;
        let bytes = buf.freeze();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[100], 7);
        assert!(AlignedBuf::is_aligned(&bytes, 4096));
        let tail = bytes.slice(4096..);
        assert!(AlignedBuf::is_aligned(&tail, 4096));
    }
}

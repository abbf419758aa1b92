//! Executing validated commands on a block device: splitting at the device's largest
//! request, unaligned requests (read the enclosing blocks; read-modify-write edges with
//! compare-and-write), FUA for commands the device has no FUA flag for, the mapping of
//! provisioning to `base:allocation` flags, and of [`BlockError`] to NBD errors.

use crate::errno::NbdErrno;
use crate::proto::state;
use crate::transmission::{Command, StatusExtent};
use crate::wire::FileRange;
use basalt_blockdev::{
    BlockDev, BlockError, CachedRange, CompareOutcome, ExtentKind, Geometry, SharedBlockDev,
    WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;

/// Largest range asked of the device in one BLOCK_STATUS (the client asks again for the
/// rest), so one request cannot make a fragmented device build a huge extent list.
const STATUS_QUERY_CAP: u64 = 1 << 30;

/// Attempts at an unaligned edge before giving up with `EIO` (each failure means
/// another writer changed the block between our read and our compare-and-write).
const RMW_ATTEMPTS: usize = 64;

/// The result of one command, ready to encode.
#[derive(Debug)]
pub(crate) enum Completion {
    /// Success without data.
    Ok,
    /// Read data, consecutive from `offset`.
    Read {
        offset: u64,
        pieces: Vec<Bytes>,
        df: bool,
    },
    /// Read data to send straight from the page cache (see [`SEND_FILE_MIN`]).
    ReadFile { offset: u64, range: CachedRange },
    /// Block status: extents from `start`.
    Status {
        offset: u64,
        len: u32,
        req_one: bool,
        start: u64,
        extents: Vec<StatusExtent>,
    },
    /// Failure.
    Err(NbdErrno, String),
}

/// Maps a device error to the NBD error value the protocol document asks for.
pub(crate) fn errno_of(e: &BlockError, fast_zero: bool) -> NbdErrno {
    match e {
        BlockError::ReadOnly => NbdErrno::Perm,
        BlockError::NoSpace => NbdErrno::NoSpc,
        BlockError::Misaligned { .. }
        | BlockError::OutOfRange { .. }
        | BlockError::InvalidRequest(_) => NbdErrno::Inval,
        BlockError::Unsupported(_) if fast_zero => NbdErrno::NotSup,
        BlockError::Unsupported(_) => NbdErrno::Inval,
        BlockError::Io { source, .. } => match source.raw_os_error() {
            Some(libc_enospc) if is_space_errno(libc_enospc) => NbdErrno::NoSpc,
            _ => NbdErrno::Io,
        },
        _ => NbdErrno::Io,
    }
}

/// ENOSPC, EDQUOT and EFBIG all mean "no space" to an NBD client.
fn is_space_errno(code: i32) -> bool {
    // Linux values: ENOSPC 28, EDQUOT 122, EFBIG 27.
    matches!(code, 28 | 122 | 27)
}

fn fail(e: BlockError, fast_zero: bool) -> Completion {
    Completion::Err(errno_of(&e, fast_zero), e.to_string())
}

/// A device's page-cache range goes into the output queue as it is.
impl FileRange for CachedRange {
    fn file(&self) -> &std::fs::File {
        CachedRange::file(self)
    }
    fn offset(&self) -> u64 {
        CachedRange::offset(self)
    }
    fn len(&self) -> u64 {
        CachedRange::len(self)
    }
}

/// Reads at least this long, on a connection that can `sendfile(2)`, are answered from
/// the page cache without copying when the device is a buffered file that holds the
/// range in the cache ([`BlockDev::cached_range`]): a copy less into our buffer and one
/// less out of it into the socket, which were most of the CPU time of a 1 MiB read.
/// Smaller reads are copied: a `sendfile` each would cost more system calls than the
/// one vectored write that carries many small replies.
pub(crate) const SEND_FILE_MIN: u32 = 64 * 1024;

/// Runs `command` on `dev`; `read_only` is the export's current setting (checked again
/// here, as it may have changed since the handshake); `send_file`: the connection can
/// send file ranges (plain TCP or unix socket, not TLS).
pub(crate) async fn execute(
    dev: SharedBlockDev,
    command: Command,
    read_only: bool,
    send_file: bool,
) -> Completion {
    let g = dev.geometry();
    let writes = matches!(
        command,
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
    );
    if writes && read_only {
        return Completion::Err(NbdErrno::Perm, "export is read-only".into());
    }
    match command {
        Command::Read { offset, len, df } => {
            let bs = g.block_size;
            if send_file && len >= SEND_FILE_MIN && offset % u64::from(bs) == 0 && len % bs == 0 {
                match dev.cached_range(offset, u64::from(len)).await {
                    Ok(Some(range)) => return Completion::ReadFile { offset, range },
                    Ok(None) => {}
                    Err(e) => return fail(e, false),
                }
            }
            match read(&dev, &g, offset, len as u64).await {
                Ok(pieces) => Completion::Read { offset, pieces, df },
                Err(e) => fail(e, false),
            }
        }
        Command::Write { offset, data, fua } => {
            match write(&dev, &g, offset, data, WriteFlags { fua }).await {
                Ok(()) => Completion::Ok,
                Err(e) => fail(e, false),
            }
        }
        Command::Flush => match dev.flush().await {
            Ok(()) => Completion::Ok,
            Err(e) => fail(e, false),
        },
        Command::Trim { offset, len, fua } => {
            // A trim is a hint: only whole blocks inside the range are discarded.
            let bs = u64::from(g.block_size);
            let start = offset.next_multiple_of(bs);
            let end = (offset + u64::from(len)) / bs * bs;
            if start < end {
                if let Err(e) = dev.discard(start, end - start).await {
                    return match e {
                        // Not worth an error: a trim may be ignored.
                        BlockError::Unsupported(_) => Completion::Ok,
                        e => fail(e, false),
                    };
                }
                if fua {
                    if let Err(e) = dev.flush().await {
                        return fail(e, false);
                    }
                }
            }
            Completion::Ok
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            let flags = ZeroFlags {
                may_unmap: !no_hole,
                fast_only: fast,
            };
            match write_zeroes(&dev, &g, offset, u64::from(len), flags).await {
                Ok(()) => {}
                Err(e) => return fail(e, fast),
            }
            if fua && len > 0 {
                if let Err(e) = dev.flush().await {
                    return fail(e, false);
                }
            }
            Completion::Ok
        }
        // A hint; the device caches (or does not) on its own.
        Command::Cache { .. } => Completion::Ok,
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let bs = u64::from(g.block_size);
            let start = offset / bs * bs;
            let end = (offset + u64::from(len)).next_multiple_of(bs);
            let cap = STATUS_QUERY_CAP / bs * bs;
            let qlen = (end - start).min(cap.max(bs));
            let hole = if g.capabilities.discard_zeroes {
                state::HOLE | state::ZERO
            } else {
                state::HOLE
            };
            let extents = match dev.block_status(start, qlen).await {
                Ok(ext) => ext
                    .into_iter()
                    .map(|e| StatusExtent {
                        len: e.len,
                        flags: match e.kind {
                            ExtentKind::Data => 0,
                            ExtentKind::Zero => state::ZERO,
                            ExtentKind::Hole => hole,
                        },
                    })
                    .collect(),
                // Status 0 ("data") is always true.
                Err(BlockError::Unsupported(_)) => vec![StatusExtent {
                    len: qlen,
                    flags: 0,
                }],
                Err(e) => return fail(e, false),
            };
            Completion::Status {
                offset,
                len,
                req_one,
                start,
                extents,
            }
        }
    }
}

/// The device's largest request, in whole blocks (at least one block).
fn max_io(g: &Geometry) -> u64 {
    let bs = u64::from(g.block_size);
    match g.max_io_bytes {
        0 => u64::MAX,
        m => (u64::from(m) / bs * bs).max(bs),
    }
}

/// Splits `[offset, offset + len)` into pieces of at most `max` bytes.
fn split(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (end - at).min(max);
        let item = (at, n);
        at += n;
        Some(item)
    })
}

async fn read(
    dev: &SharedBlockDev,
    g: &Geometry,
    offset: u64,
    len: u64,
) -> Result<Vec<Bytes>, BlockError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let bs = u64::from(g.block_size);
    let start = offset / bs * bs;
    let end = (offset + len).next_multiple_of(bs);
    let mut pieces = if end - start <= max_io(g) {
        // The common case: one device request, no join (and no allocations for one).
        vec![dev.read(start, (end - start) as usize).await?]
    } else {
        let reads = split(start, end - start, max_io(g)).map(|(o, n)| dev.read(o, n as usize));
        try_join_all(reads).await?
    };
    // Trim the enclosing blocks to the request.
    let head = (offset - start) as usize;
    if head > 0 {
        if let Some(first) = pieces.first_mut() {
            *first = first.slice(head..);
        }
    }
    let tail = (end - (offset + len)) as usize;
    if tail > 0 {
        if let Some(last) = pieces.last_mut() {
            *last = last.slice(..last.len() - tail);
        }
    }
    Ok(pieces)
}

async fn write(
    dev: &SharedBlockDev,
    g: &Geometry,
    offset: u64,
    data: Bytes,
    flags: WriteFlags,
) -> Result<(), BlockError> {
    let len = data.len() as u64;
    if len == 0 {
        return Ok(());
    }
    let bs = u64::from(g.block_size);
    let end = offset + len;
    let astart = offset.next_multiple_of(bs);
    let aend = end / bs * bs;
    if astart >= aend {
        // Within one or two blocks and no whole block: edges only.
        return write_edges(dev, bs, offset, &data, flags).await;
    }
    if astart == offset && aend == end && len <= max_io(g) {
        // The common case: aligned, one device request.
        return dev.write(offset, data, flags).await;
    }
    let middle = data.slice((astart - offset) as usize..(aend - offset) as usize);
    let writes = split(astart, aend - astart, max_io(g)).map(|(o, n)| {
        let piece = middle.slice((o - astart) as usize..(o - astart + n) as usize);
        dev.write(o, piece, flags)
    });
    try_join_all(writes).await?;
    if astart > offset {
        rmw(dev, bs, offset, &data[..(astart - offset) as usize], flags).await?;
    }
    if end > aend {
        rmw(dev, bs, aend, &data[(aend - offset) as usize..], flags).await?;
    }
    Ok(())
}

/// Writes a range with no whole block in it: at most two partial blocks.
async fn write_edges(
    dev: &SharedBlockDev,
    bs: u64,
    offset: u64,
    data: &[u8],
    flags: WriteFlags,
) -> Result<(), BlockError> {
    let first_block_end = (offset / bs + 1) * bs;
    let split_at = ((first_block_end - offset) as usize).min(data.len());
    rmw(dev, bs, offset, &data[..split_at], flags).await?;
    if split_at < data.len() {
        rmw(dev, bs, first_block_end, &data[split_at..], flags).await?;
    }
    Ok(())
}

/// Read-modify-write of `data` at `offset` within one block, atomic against every
/// other I/O on the device through compare-and-write.
async fn rmw(
    dev: &SharedBlockDev,
    bs: u64,
    offset: u64,
    data: &[u8],
    flags: WriteFlags,
) -> Result<(), BlockError> {
    let block = offset / bs * bs;
    let at = (offset - block) as usize;
    for _ in 0..RMW_ATTEMPTS {
        let old = dev.read(block, bs as usize).await?;
        let mut new = BytesMut::from(&old[..]);
        new[at..at + data.len()].copy_from_slice(data);
        match dev
            .compare_and_write(block, old.clone(), new.clone().freeze(), flags)
            .await
        {
            Ok(CompareOutcome::Written) => return Ok(()),
            Ok(CompareOutcome::Miscompare { .. }) => continue,
            // A device without compare-and-write: plain read-modify-write.
            Err(BlockError::Unsupported(_)) => return dev.write(block, new.freeze(), flags).await,
            Err(e) => return Err(e),
        }
    }
    Err(BlockError::io(
        "read-modify-write",
        offset,
        data.len() as u64,
        std::io::Error::other("the block kept changing under concurrent writes"),
    ))
}

async fn write_zeroes(
    dev: &SharedBlockDev,
    g: &Geometry,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<(), BlockError> {
    if len == 0 {
        return Ok(());
    }
    let bs = u64::from(g.block_size);
    let end = offset + len;
    let astart = offset.next_multiple_of(bs);
    let aend = end / bs * bs;
    let aligned = astart == offset && aend == end;
    if flags.fast_only && !aligned {
        // Partial blocks need read-modify-write, which is not fast.
        return Err(BlockError::Unsupported(
            "fast write-zeroes of partial blocks",
        ));
    }
    let wflags = WriteFlags::default();
    if astart >= aend {
        let zeroes = vec![0u8; len as usize];
        return write_edges(dev, bs, offset, &zeroes, wflags).await;
    }
    dev.write_zeroes(astart, aend - astart, flags).await?;
    if astart > offset {
        let z = vec![0u8; (astart - offset) as usize];
        rmw(dev, bs, offset, &z, wflags).await?;
    }
    if end > aend {
        let z = vec![0u8; (end - aend) as usize];
        rmw(dev, bs, aend, &z, wflags).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_blockdev::{BlockDev, MemDev};
    use std::sync::Arc;

    fn dev() -> SharedBlockDev {
        Arc::new(MemDev::new(256, 4096))
    }

    async fn read_all(d: &SharedBlockDev) -> Vec<u8> {
        d.read(0, 256 * 4096).await.unwrap().to_vec()
    }

    #[tokio::test]
    async fn unaligned_writes_and_reads_match_a_byte_model() {
        let d = dev();
        let mut model = vec![0u8; 256 * 4096];
        let cases: &[(u64, usize)] = &[
            (1, 10),
            (4090, 20),
            (4096, 4096),
            (100, 9000),
            (8191, 1),
            (0, 12288),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8 | 1).collect();
            let c = execute(
                d.clone(),
                Command::Write {
                    offset: off,
                    data: Bytes::from(data.clone()),
                    fua: false,
                },
                false,
                false,
            )
            .await;
            assert!(matches!(c, Completion::Ok), "{c:?}");
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(read_all(&d).await, model, "after write {off}+{len}");
            let c = execute(
                d.clone(),
                Command::Read {
                    offset: off + 1,
                    len: (len - 1) as u32,
                    df: false,
                },
                false,
                false,
            )
            .await;
            let Completion::Read { pieces, .. } = c else {
                panic!()
            };
            let got: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(got, &model[off as usize + 1..off as usize + len]);
        }
        // Unaligned write-zeroes.
        let c = execute(
            d.clone(),
            Command::WriteZeroes {
                offset: 50,
                len: 10000,
                fua: true,
                no_hole: false,
                fast: false,
            },
            false,
            false,
        )
        .await;
        assert!(matches!(c, Completion::Ok));
        model[50..10050].fill(0);
        assert_eq!(read_all(&d).await, model);
        // Fast zeroing of partial blocks is refused with ENOTSUP, untouched.
        let c = execute(
            d.clone(),
            Command::WriteZeroes {
                offset: 1,
                len: 4096,
                fua: false,
                no_hole: false,
                fast: true,
            },
            false,
            false,
        )
        .await;
        assert!(matches!(c, Completion::Err(NbdErrno::NotSup, _)), "{c:?}");
        assert_eq!(read_all(&d).await, model);
    }

    #[tokio::test]
    async fn block_status_maps_holes_and_data() {
        let d: SharedBlockDev = Arc::new(MemDev::new(64 * 16, 512)); // 512 KiB
        d.write(65536, Bytes::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .unwrap();
        let c = execute(
            d.clone(),
            Command::BlockStatus {
                offset: 0,
                len: 512 * 1024,
                req_one: false,
            },
            false,
            false,
        )
        .await;
        let Completion::Status { extents, .. } = c else {
            panic!()
        };
        let z = state::HOLE | state::ZERO;
        assert_eq!(
            extents,
            vec![
                StatusExtent {
                    len: 65536,
                    flags: z
                },
                StatusExtent {
                    len: 65536,
                    flags: 0
                },
                StatusExtent {
                    len: 6 * 65536,
                    flags: z
                },
            ]
        );
    }

    #[tokio::test]
    async fn read_only_and_errors() {
        let d = dev();
        let c = execute(
            d.clone(),
            Command::Write {
                offset: 0,
                data: Bytes::from(vec![1u8; 4096]),
                fua: false,
            },
            true,
            false,
        )
        .await;
        assert!(matches!(c, Completion::Err(NbdErrno::Perm, _)));
        assert_eq!(errno_of(&BlockError::NoSpace, false), NbdErrno::NoSpc);
        assert_eq!(
            errno_of(
                &BlockError::io("write", 0, 1, std::io::Error::from_raw_os_error(122)),
                false
            ),
            NbdErrno::NoSpc
        );
        assert_eq!(
            errno_of(&BlockError::Unsupported("x"), true),
            NbdErrno::NotSup
        );
        assert_eq!(
            errno_of(&BlockError::Offline("x".into()), false),
            NbdErrno::Io
        );
    }

    #[tokio::test]
    async fn split_respects_max_io() {
        let mut g = MemDev::new(1024, 512).geometry();
        g.max_io_bytes = 4096;
        let d: SharedBlockDev = Arc::new(MemDev::with_geometry(g));
        let data: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
        let c = execute(
            d.clone(),
            Command::Write {
                offset: 512,
                data: Bytes::from(data.clone()),
                fua: false,
            },
            false,
            false,
        )
        .await;
        assert!(matches!(c, Completion::Ok));
        let Completion::Read { pieces, .. } = execute(
            d.clone(),
            Command::Read {
                offset: 512,
                len: 20000,
                df: false,
            },
            false,
            false,
        )
        .await
        else {
            panic!()
        };
        assert!(pieces.len() > 1);
        let got: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(got, data);
    }
}

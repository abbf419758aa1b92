//! P and Q checked byte for byte against ISA-L's `pq_gen` (Debian's libisal2, loaded at
//! run time; `deploy/install-deps.sh test` installs it, and the test fails without it),
//! over many shapes and every kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use basalt_raid::parity::Kernel;
use std::ffi::{c_int, c_void, CString};

type PqGen = unsafe extern "C" fn(c_int, c_int, *mut *mut c_void) -> c_int;

fn load() -> Option<PqGen> {
    let lib = CString::new("libisal.so.2").ok()?;
    // SAFETY: dlopen with a valid C string; the handle stays open for the process.
    let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW) };
    if h.is_null() {
        return None;
    }
    let name = CString::new("pq_gen").ok()?;
    // SAFETY: h is a live handle.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    // SAFETY: pq_gen has this C signature (isa-l/raid.h).
    (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, PqGen>(p) })
}

#[test]
fn q_matches_isal_pq_gen() {
    let pq_gen = load().expect("libisal.so.2: run deploy/install-deps.sh test (Debian: libisal2)");
    let mut checked = 0;
    for disks in [2usize, 3, 4, 6, 10, 30] {
        for len in [32usize, 64, 4096, 65536 + 96] {
            let mut bufs: Vec<Vec<u8>> = (0..disks + 2)
                .map(|d| {
                    let mut x = (d as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64;
                    (0..len)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect()
                })
                .collect();
            // ISA-L wants 32-byte aligned buffers: copy into aligned ones.
            let mut aligned: Vec<basalt_blockdev::AlignedBuf> = bufs
                .iter()
                .map(|b| basalt_blockdev::AlignedBuf::copy_from(b))
                .collect();
            let mut ptrs: Vec<*mut c_void> =
                aligned.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
            // SAFETY: disks + 2 buffers of len bytes (a multiple of 32), 4096-aligned.
            let r = unsafe { pq_gen((disks + 2) as c_int, len as c_int, ptrs.as_mut_ptr()) };
            assert_eq!(r, 0);
            let (data, pq) = bufs.split_at_mut(disks);
            let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            let (p, q) = pq.split_at_mut(1);
            for k in Kernel::available() {
                if disks < 1 {
                    continue;
                }
                k.gen_pq(&refs, &mut p[0], &mut q[0]);
                assert_eq!(
                    p[0][..],
                    aligned[disks].as_slice()[..],
                    "P {disks}x{len} {}",
                    k.name()
                );
                assert_eq!(
                    q[0][..],
                    aligned[disks + 1].as_slice()[..],
                    "Q {disks}x{len} {}",
                    k.name()
                );
                checked += 1;
            }
        }
    }
    println!("{checked} shapes x kernels equal to ISA-L pq_gen");
}

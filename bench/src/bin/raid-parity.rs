//! `raid-parity`: Basalt's RAID6 parity kernels against ISA-L, side by side, one core.
//!
//! Workloads (4 data + 2 parity by default, 64 KiB per block, page-aligned buffers):
//! - `P+Q`: generate P and Q from the data. Basalt's `parity::Kernel::gen_pq` against
//!   ISA-L's `pq_gen`.
//! - `rebuild 2 data`: rebuild two lost data blocks from the two surviving data blocks,
//!   P and Q, in one pass. Basalt's `Kernel::lincomb` with the coefficients of
//!   `two_data_coefficients` against ISA-L's `ec_encode_data` with the decode matrix
//!   (`gf_invert_matrix` of the survivors' rows of the P/Q generator matrix), the way a
//!   user of ISA-L rebuilds RAID6.
//! - `P only`: XOR of the data, against ISA-L's `xor_gen`.
//!
//! Throughput counts every block an operation touches (data and parity, k + 2 blocks),
//! the convention of ISA-L's own `raid_perf`/`erasure_code_perf`; the ratio is what
//! matters. Each implementation runs for `--millis` per round; rounds alternate which
//! side goes first, and the table reports the best round of each (the least disturbed
//! by the other core's work). Results of both sides are checked equal before timing.
//!
//! ISA-L is loaded at run time from `libisal.so.2` (Debian: `libisal2`), so the bench
//! builds without it; it prints Basalt's figures alone when the library is missing.

use basalt_blockdev::AlignedBuf;
use basalt_raid::parity::{two_data_coefficients, Kernel};
use clap::Parser;
use std::ffi::{c_int, c_uchar, c_void, CString};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// RAID6 P+Q generation and two-disk reconstruction against ISA-L.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Data blocks per stripe.
    #[arg(long, default_value_t = 4)]
    data: usize,
    /// Block (chunk) size in KiB.
    #[arg(long, default_value_t = 64)]
    chunk_kib: usize,
    /// Milliseconds per implementation per round.
    #[arg(long, default_value_t = 400)]
    millis: u64,
    /// Rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Also time every slower kernel this CPU runs (scalar, AVX2).
    #[arg(long)]
    all_kernels: bool,
}

type PqGen = unsafe extern "C" fn(c_int, c_int, *mut *mut c_void) -> c_int;
type EcInitTables = unsafe extern "C" fn(c_int, c_int, *mut c_uchar, *mut c_uchar);
type EcEncodeData =
    unsafe extern "C" fn(c_int, c_int, c_int, *mut c_uchar, *mut *mut c_uchar, *mut *mut c_uchar);
type GfInvertMatrix = unsafe extern "C" fn(*mut c_uchar, *mut c_uchar, c_int) -> c_int;

/// The few ISA-L entry points the bench calls, resolved with dlopen.
struct Isal {
    pq_gen: PqGen,
    xor_gen: PqGen,
    ec_init_tables: EcInitTables,
    ec_encode_data: EcEncodeData,
    gf_invert_matrix: GfInvertMatrix,
}

impl Isal {
    fn load() -> Option<Isal> {
        let lib = CString::new("libisal.so.2").ok()?;
        // SAFETY: dlopen with a valid C string; the handle is never closed, so the
        // resolved functions stay valid for the life of the process.
        let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW) };
        if h.is_null() {
            return None;
        }
        let sym = |name: &str| -> Option<*mut c_void> {
            let c = CString::new(name).ok()?;
            // SAFETY: h is a live handle, c a valid C string.
            let p = unsafe { libc::dlsym(h, c.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        // SAFETY: each symbol has the C signature declared in ISA-L's headers
        // (raid.h, erasure_code.h), which the types above transcribe.
        unsafe {
            Some(Isal {
                pq_gen: std::mem::transmute::<*mut c_void, PqGen>(sym("pq_gen")?),
                xor_gen: std::mem::transmute::<*mut c_void, PqGen>(sym("xor_gen")?),
                ec_init_tables: std::mem::transmute::<*mut c_void, EcInitTables>(sym(
                    "ec_init_tables",
                )?),
                ec_encode_data: std::mem::transmute::<*mut c_void, EcEncodeData>(sym(
                    "ec_encode_data",
                )?),
                gf_invert_matrix: std::mem::transmute::<*mut c_void, GfInvertMatrix>(sym(
                    "gf_invert_matrix",
                )?),
            })
        }
    }
}

fn fill(buf: &mut AlignedBuf, seed: u64) {
    let mut x = seed | 1;
    for b in buf.as_mut_slice() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Runs `f` repeatedly for `dur`; returns operations per second.
fn time(dur: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up caches and the branch predictor.
    for _ in 0..8 {
        f();
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        for _ in 0..16 {
            f();
        }
        ops += 16;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

struct Row {
    name: String,
    basalt: f64,
    isal: Option<f64>,
}

fn main() {
    let args = Args::parse();
    let k = args.data;
    let len = args.chunk_kib * 1024;
    assert!(k >= 2, "need at least two data blocks");
    let isal = Isal::load();
    if isal.is_none() {
        eprintln!("libisal.so.2 not found (Debian: apt-get install libisal2); Basalt only");
    }
    let dur = Duration::from_millis(args.millis);
    let bytes_per_op = ((k + 2) * len) as f64;
    let mut data: Vec<AlignedBuf> = (0..k).map(|_| AlignedBuf::zeroed(len)).collect();
    for (i, d) in data.iter_mut().enumerate() {
        fill(d, i as u64 + 1);
    }
    let mut p = AlignedBuf::zeroed(len);
    let mut q = AlignedBuf::zeroed(len);
    let best = Kernel::best();
    let kernels: Vec<Kernel> = if args.all_kernels {
        Kernel::available()
    } else {
        vec![best]
    };

    // Reference parity (and a correctness check of ISA-L against us).
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    let (mut rp, mut rq) = (vec![0u8; len], vec![0u8; len]);
    Kernel::Scalar.gen_pq(&refs, &mut rp, &mut rq);
    if let Some(isal) = &isal {
        let mut ptrs: Vec<*mut c_void> = data
            .iter_mut()
            .map(|d| d.as_mut_ptr().cast())
            .chain([p.as_mut_ptr().cast(), q.as_mut_ptr().cast()])
            .collect();
        // SAFETY: k + 2 buffers of len bytes, 4096-aligned, as pq_gen requires.
        let r = unsafe { (isal.pq_gen)((k + 2) as c_int, len as c_int, ptrs.as_mut_ptr()) };
        assert_eq!(r, 0, "pq_gen failed");
        assert!(
            p.as_slice() == &rp[..] && q.as_slice() == &rq[..],
            "ISA-L's P/Q differ from Basalt's"
        );
        println!("check: ISA-L pq_gen output equals Basalt's P and Q byte for byte");
    }

    // Reconstruction inputs: lose data 0 and 1 (the worst case: both coefficients
    // non-trivial); survivors P, Q, D2.. in Basalt's order.
    let (x, y) = (0usize, 1usize);
    let coeffs = two_data_coefficients(k, x, y);
    let mut rebuilt: Vec<AlignedBuf> = (0..2).map(|_| AlignedBuf::zeroed(len)).collect();
    let mut pbuf = AlignedBuf::copy_from(&rp);
    let mut qbuf = AlignedBuf::copy_from(&rq);
    // ISA-L decode tables: survivors' rows of the generator [I; 1..1; 1,2,4..] inverted.
    let mut isal_tables = vec![0u8; 32 * k * 2];
    if let Some(isal) = &isal {
        let mut gen = vec![0u8; (k + 2) * k];
        for i in 0..k {
            gen[i * k + i] = 1;
            gen[k * k + i] = 1;
            gen[(k + 1) * k + i] = basalt_raid::gf::pow2(i);
        }
        // Survivors in ISA-L's source order: D2.., P, Q.
        let survivors: Vec<usize> = (0..k + 2).filter(|&r| r != x && r != y).collect();
        let mut sub = Vec::new();
        for &r in &survivors {
            sub.extend_from_slice(&gen[r * k..(r + 1) * k]);
        }
        let mut invm = vec![0u8; k * k];
        // SAFETY: k x k matrices.
        let r = unsafe { (isal.gf_invert_matrix)(sub.as_mut_ptr(), invm.as_mut_ptr(), k as c_int) };
        assert_eq!(r, 0, "singular decode matrix");
        let mut decode = Vec::new();
        decode.extend_from_slice(&invm[x * k..(x + 1) * k]);
        decode.extend_from_slice(&invm[y * k..(y + 1) * k]);
        // SAFETY: decode is 2 x k, tables 32 * k * 2 bytes.
        unsafe {
            (isal.ec_init_tables)(k as c_int, 2, decode.as_mut_ptr(), isal_tables.as_mut_ptr())
        };
    }

    let mut rows: Vec<Row> = Vec::new();
    for &kern in &kernels {
        let mut pq = (0.0f64, None::<f64>);
        let mut rec = (0.0f64, None::<f64>);
        let mut xr = (0.0f64, None::<f64>);
        for round in 0..args.rounds {
            let isal_first = round % 2 == 1;
            for side in 0..2 {
                let run_isal = (side == 0) == isal_first;
                if run_isal {
                    let Some(isal) = &isal else { continue };
                    let mut ptrs: Vec<*mut c_void> = data
                        .iter_mut()
                        .map(|d| d.as_mut_ptr().cast())
                        .chain([p.as_mut_ptr().cast(), q.as_mut_ptr().cast()])
                        .collect();
                    let r = time(dur, || {
                        // SAFETY: as for the check above.
                        unsafe { (isal.pq_gen)((k + 2) as c_int, len as c_int, ptrs.as_mut_ptr()) };
                    });
                    pq.1 = Some(pq.1.unwrap_or(0.0).max(r));
                    let mut xptrs: Vec<*mut c_void> = data
                        .iter_mut()
                        .map(|d| d.as_mut_ptr().cast())
                        .chain([p.as_mut_ptr().cast()])
                        .collect();
                    let r = time(dur, || {
                        // SAFETY: k + 1 aligned buffers of len bytes.
                        unsafe {
                            (isal.xor_gen)((k + 1) as c_int, len as c_int, xptrs.as_mut_ptr())
                        };
                    });
                    xr.1 = Some(xr.1.unwrap_or(0.0).max(r));
                    let mut srcs: Vec<*mut u8> = data[2..]
                        .iter_mut()
                        .map(|d| d.as_mut_ptr())
                        .chain([pbuf.as_mut_ptr(), qbuf.as_mut_ptr()])
                        .collect();
                    let mut outs: Vec<*mut u8> =
                        rebuilt.iter_mut().map(|d| d.as_mut_ptr()).collect();
                    let r = time(dur, || {
                        // SAFETY: k sources and 2 outputs of len bytes; tables from
                        // ec_init_tables for k x 2.
                        unsafe {
                            (isal.ec_encode_data)(
                                len as c_int,
                                k as c_int,
                                2,
                                isal_tables.as_mut_ptr(),
                                srcs.as_mut_ptr(),
                                outs.as_mut_ptr(),
                            )
                        };
                    });
                    rec.1 = Some(rec.1.unwrap_or(0.0).max(r));
                    assert!(
                        rebuilt[0].as_slice() == data[x].as_slice()
                            && rebuilt[1].as_slice() == data[y].as_slice(),
                        "ISA-L rebuilt wrong data"
                    );
                } else {
                    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
                    let r = time(dur, || {
                        kern.gen_pq(black_box(&refs), p.as_mut_slice(), q.as_mut_slice());
                    });
                    pq.0 = pq.0.max(r);
                    let r = time(dur, || kern.gen_p(black_box(&refs), p.as_mut_slice()));
                    xr.0 = xr.0.max(r);
                    let srcs: Vec<&[u8]> = [pbuf.as_slice(), qbuf.as_slice()]
                        .into_iter()
                        .chain(data[2..].iter().map(|d| d.as_slice()))
                        .collect();
                    let (a, b) = rebuilt.split_at_mut(1);
                    let r = time(dur, || {
                        kern.lincomb(
                            black_box(&coeffs),
                            &srcs,
                            &mut [a[0].as_mut_slice(), b[0].as_mut_slice()],
                            false,
                        );
                    });
                    rec.0 = rec.0.max(r);
                    assert!(
                        rebuilt[0].as_slice() == data[x].as_slice()
                            && rebuilt[1].as_slice() == data[y].as_slice(),
                        "Basalt rebuilt wrong data"
                    );
                }
            }
        }
        let tag = kern.name();
        rows.push(Row {
            name: format!("P+Q {k}+2 x {} KiB [{tag}]", len / 1024),
            basalt: pq.0,
            isal: pq.1,
        });
        rows.push(Row {
            name: format!("rebuild 2 data {k}+2 x {} KiB [{tag}]", len / 1024),
            basalt: rec.0,
            isal: rec.1,
        });
        rows.push(Row {
            name: format!("P only (xor) {k}+1 x {} KiB [{tag}]", len / 1024),
            basalt: xr.0 * (k + 1) as f64 / (k + 2) as f64,
            isal: xr.1.map(|v| v * (k + 1) as f64 / (k + 2) as f64),
        });
    }
    println!(
        "\none core, best of {} rounds of {} ms; GB/s = (blocks touched x block size) / time",
        args.rounds, args.millis
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "workload", "basalt GB/s", "ISA-L GB/s", "ratio"
    );
    for r in rows {
        let b = r.basalt * bytes_per_op / 1e9;
        match r.isal {
            Some(i) => {
                let i = i * bytes_per_op / 1e9;
                println!("{:<44} {:>12.2} {:>12.2} {:>7.2}x", r.name, b, i, b / i);
            }
            None => println!("{:<44} {:>12.2} {:>12} {:>8}", r.name, b, "-", "-"),
        }
    }
}

//! Parity kernels: P (XOR), Q (the GF(2^8) syndrome of md and ISA-L), multiply-add by a
//! constant, and linear combinations (the decode step of RAID6 reconstruction).
//!
//! Each routine has a scalar version (eight bytes at a time, SWAR) and vector versions
//! chosen once at run time from the CPU's features: AVX-512 (BW) with GFNI, and AVX2.
//! Q is computed by Horner's rule, `Q = ((D[n-1]·2 + D[n-2])·2 + ...)·2 + D[0]`, so
//! only multiplication by 2 is needed (a byte add plus a masked XOR of 0x1d), which is
//! what md and ISA-L's `pq_gen` do. Multiplication by other constants uses GFNI's
//! affine instruction with the constant's 8x8 bit matrix for the field 0x11d (GFNI's
//! own multiply uses the AES field 0x11b, so it cannot be used directly), or the
//! nibble-table shuffle without GFNI.
//!
//! Every routine takes equal-length slices; lengths need not be multiples of the vector
//! width (the tail goes through the scalar code). Buffers need no alignment.

use crate::gf;

/// A family of kernels. [`Kernel::best`] is what the array uses; the others exist so
/// that tests and benchmarks can run every variant the CPU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable code, eight bytes at a time.
    Scalar,
    /// AVX2 (x86_64).
    Avx2,
    /// AVX-512 F+BW with GFNI (x86_64).
    Avx512Gfni,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Kernel::available()
                .into_iter()
                .last()
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                v.push(Kernel::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("gfni")
            {
                v.push(Kernel::Avx512Gfni);
            }
        }
        v
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Gfni => "avx512+gfni",
        }
    }

    fn check(self) {
        assert!(
            Kernel::available().contains(&self),
            "kernel {} is not supported by this CPU",
            self.name()
        );
    }

    /// `p = XOR of data`.
    ///
    /// # Panics
    /// If `data` is empty, lengths differ, or the kernel is not available.
    pub fn gen_p(self, data: &[&[u8]], p: &mut [u8]) {
        assert!(!data.is_empty() && data.iter().all(|d| d.len() == p.len()));
        self.check();
        let done = match self {
            Kernel::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // SAFETY: AVX2 is available (checked); lengths are equal (asserted).
                unsafe { x86::gen_p_avx2(data, p) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Gfni => {
                // SAFETY: AVX-512 F is available (checked); lengths are equal.
                unsafe { x86::gen_p_avx512(data, p) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        p[done..].copy_from_slice(&data[0][done..]);
        for d in &data[1..] {
            scalar::xor_into(&mut p[done..], &d[done..]);
        }
    }

    /// `dst ^= src`.
    pub fn xor_into(self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len());
        let done = match self {
            Kernel::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512Gfni => {
                self.check();
                // SAFETY: the CPU supports AVX2 (checked); lengths are equal.
                unsafe { x86::xor_into_avx2(dst, src) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        scalar::xor_into(&mut dst[done..], &src[done..]);
    }

    /// P and Q of `data` (data index i gets coefficient 2^i in Q).
    ///
    /// # Panics
    /// If `data` is empty, lengths differ, or the kernel is not available.
    pub fn gen_pq(self, data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
        let len = p.len();
        assert!(!data.is_empty() && q.len() == len && data.iter().all(|d| d.len() == len));
        let done = match self {
            Kernel::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                self.check();
                // SAFETY: AVX2 is available (checked); lengths are equal (asserted).
                unsafe { x86::gen_pq_avx2(data, p, q) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Gfni => {
                self.check();
                // SAFETY: AVX-512 F+BW are available (checked); lengths are equal.
                unsafe { x86::gen_pq_avx512(data, p, q) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        scalar::gen_pq(data, p, q, done);
    }

    /// `dst ^= c · src`.
    pub fn mul_xor(self, c: u8, src: &[u8], dst: &mut [u8]) {
        match c {
            0 => {}
            1 => self.xor_into(dst, src),
            _ => self.lincomb(&[c], &[src], &mut [dst], true),
        }
    }

    /// `outs[r] (^)= sum over j of coeffs[r * k + j] · srcs[j]`, with `k = srcs.len()`;
    /// with `accumulate` the result is XORed into `outs`, otherwise it replaces them.
    ///
    /// # Panics
    /// If the shapes disagree or the kernel is not available.
    pub fn lincomb(self, coeffs: &[u8], srcs: &[&[u8]], outs: &mut [&mut [u8]], accumulate: bool) {
        let k = srcs.len();
        assert!(k > 0 && coeffs.len() == k * outs.len());
        let len = srcs[0].len();
        assert!(srcs.iter().all(|s| s.len() == len) && outs.iter().all(|o| o.len() == len));
        let mut row = 0;
        while row < outs.len() {
            let m = (outs.len() - row).min(2);
            let c = &coeffs[row * k..(row + m) * k];
            let o = &mut outs[row..row + m];
            let done = match self {
                Kernel::Scalar => 0,
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => {
                    self.check();
                    // SAFETY: AVX2 is available (checked); shapes checked above.
                    unsafe { x86::lincomb_avx2(c, srcs, o, accumulate) }
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Gfni => {
                    self.check();
                    // SAFETY: AVX-512 F+BW and GFNI are available (checked); shapes
                    // checked above.
                    unsafe { x86::lincomb_gfni(c, srcs, o, accumulate) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                _ => 0,
            };
            scalar::lincomb(c, srcs, o, accumulate, done);
            row += m;
        }
    }
}

/// `p = XOR of data` with the best kernel.
pub fn gen_p(data: &[&[u8]], p: &mut [u8]) {
    Kernel::best().gen_p(data, p)
}

/// P and Q with the best kernel.
pub fn gen_pq(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    Kernel::best().gen_pq(data, p, q)
}

/// `dst ^= src` with the best kernel.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    Kernel::best().xor_into(dst, src)
}

/// `dst ^= c · src` with the best kernel.
pub fn mul_xor(c: u8, src: &[u8], dst: &mut [u8]) {
    Kernel::best().mul_xor(c, src, dst)
}

/// Coefficients that rebuild two lost data blocks `x < y` of a RAID6 stripe with `k`
/// data blocks from the survivors, in one pass: the survivors are ordered
/// `[P, Q, D_i for i in 0..k, i != x, y]` and the result has two rows (`D_x`, `D_y`),
/// `k` coefficients each, for [`Kernel::lincomb`].
///
/// From `P + P_xy = D_x + D_y` and `Q + Q_xy = 2^x D_x + 2^y D_y` (where `P_xy`, `Q_xy`
/// are the syndromes of the surviving data): `D_x = a (P + P_xy) + b (Q + Q_xy)` with
/// `a = 2^(y-x) / (2^(y-x) + 1)` and `b = 2^-x / (2^(y-x) + 1)`, then `D_y = (P + P_xy)
/// + D_x`; expanding the sums gives one coefficient per survivor.
pub fn two_data_coefficients(k: usize, x: usize, y: usize) -> Vec<u8> {
    assert!(x < y && y < k);
    let gyx = gf::pow2(y - x);
    let denom = gf::inv(gyx ^ 1);
    let a = gf::mul(gyx, denom);
    let b = gf::mul(gf::inv(gf::pow2(x)), denom);
    let mut rx = vec![a, b];
    let mut ry = vec![a ^ 1, b];
    for i in (0..k).filter(|&i| i != x && i != y) {
        // D_i appears in P_xy with coefficient 1 and in Q_xy with 2^i.
        let c = a ^ gf::mul(b, gf::pow2(i));
        rx.push(c);
        ry.push(c ^ 1);
    }
    rx.extend(ry);
    rx
}

pub(crate) mod scalar {
    use crate::gf;

    fn load(s: &[u8], i: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&s[i..i + 8]);
        u64::from_ne_bytes(b)
    }

    pub(crate) fn xor_into(dst: &mut [u8], src: &[u8]) {
        let n = dst.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            let v = load(dst, i) ^ load(src, i);
            dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
            i += 8;
        }
        for j in n..dst.len() {
            dst[j] ^= src[j];
        }
    }

    /// P and Q from byte `start` on.
    pub(crate) fn gen_pq(data: &[&[u8]], p: &mut [u8], q: &mut [u8], start: usize) {
        let len = p.len();
        let last = data.len() - 1;
        let n = start + (len - start) / 8 * 8;
        let mut i = start;
        while i < n {
            let mut pv = load(data[last], i);
            let mut qv = pv;
            for d in data[..last].iter().rev() {
                let v = load(d, i);
                pv ^= v;
                qv = gf::mul2_u64(qv) ^ v;
            }
            p[i..i + 8].copy_from_slice(&pv.to_ne_bytes());
            q[i..i + 8].copy_from_slice(&qv.to_ne_bytes());
            i += 8;
        }
        for j in n..len {
            let mut pv = data[last][j];
            let mut qv = pv;
            for d in data[..last].iter().rev() {
                pv ^= d[j];
                qv = gf::mul(qv, 2) ^ d[j];
            }
            p[j] = pv;
            q[j] = qv;
        }
    }

    /// Up to two rows of a linear combination, from byte `start` on.
    pub(crate) fn lincomb(
        coeffs: &[u8],
        srcs: &[&[u8]],
        outs: &mut [&mut [u8]],
        accumulate: bool,
        start: usize,
    ) {
        let k = srcs.len();
        for (r, out) in outs.iter_mut().enumerate() {
            let out = &mut out[start..];
            if !accumulate {
                out.fill(0);
            }
            for (j, src) in srcs.iter().enumerate() {
                let c = coeffs[r * k + j];
                let src = &src[start..];
                match c {
                    0 => {}
                    1 => xor_into(out, src),
                    _ => {
                        let mut table = [0u8; 256];
                        for (x, t) in table.iter_mut().enumerate() {
                            *t = gf::mul(c, x as u8);
                        }
                        for (o, s) in out.iter_mut().zip(src) {
                            *o ^= table[*s as usize];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector kernels. Each returns how many leading bytes it did (a multiple of
    //! its width); the caller finishes the tail with the scalar code.
    use crate::gf;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2; `dst` and `src` have equal lengths.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn xor_into_avx2(dst: &mut [u8], src: &[u8]) -> usize {
        let n = dst.len() / 32 * 32;
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        let mut i = 0;
        while i < n {
            // SAFETY: i + 32 <= len for both slices; unaligned loads and stores.
            unsafe {
                let a = _mm256_loadu_si256(d.add(i).cast());
                let b = _mm256_loadu_si256(s.add(i).cast());
                _mm256_storeu_si256(d.add(i).cast(), _mm256_xor_si256(a, b));
            }
            i += 32;
        }
        n
    }

    /// # Safety
    /// The CPU must support AVX2; every slice has the length of `p`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gen_pq_avx2(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) -> usize {
        let n = p.len() / 64 * 64;
        let last = data.len() - 1;
        let poly = _mm256_set1_epi8(gf::POLY as i8);
        let zero = _mm256_setzero_si256();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 64 <= len of every slice.
            unsafe {
                let mut p0 = _mm256_loadu_si256(data[last].as_ptr().add(i).cast());
                let mut p1 = _mm256_loadu_si256(data[last].as_ptr().add(i + 32).cast());
                let (mut q0, mut q1) = (p0, p1);
                for d in data[..last].iter().rev() {
                    let d0 = _mm256_loadu_si256(d.as_ptr().add(i).cast());
                    let d1 = _mm256_loadu_si256(d.as_ptr().add(i + 32).cast());
                    let m0 = _mm256_and_si256(_mm256_cmpgt_epi8(zero, q0), poly);
                    let m1 = _mm256_and_si256(_mm256_cmpgt_epi8(zero, q1), poly);
                    q0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_add_epi8(q0, q0), m0), d0);
                    q1 = _mm256_xor_si256(_mm256_xor_si256(_mm256_add_epi8(q1, q1), m1), d1);
                    p0 = _mm256_xor_si256(p0, d0);
                    p1 = _mm256_xor_si256(p1, d1);
                }
                _mm256_storeu_si256(p.as_mut_ptr().add(i).cast(), p0);
                _mm256_storeu_si256(p.as_mut_ptr().add(i + 32).cast(), p1);
                _mm256_storeu_si256(q.as_mut_ptr().add(i).cast(), q0);
                _mm256_storeu_si256(q.as_mut_ptr().add(i + 32).cast(), q1);
            }
            i += 64;
        }
        n
    }

    /// # Safety
    /// The CPU must support AVX-512 F and BW; every slice has the length of `p`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn gen_pq_avx512(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) -> usize {
        const U: usize = 4;
        let n = p.len() / (64 * U) * (64 * U);
        let last = data.len() - 1;
        let poly = _mm512_set1_epi8(gf::POLY as i8);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 256 <= len of every slice.
            unsafe {
                let mut pv = [_mm512_setzero_si512(); U];
                for (u, v) in pv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(data[last].as_ptr().add(i + 64 * u).cast());
                }
                let mut qv = pv;
                for d in data[..last].iter().rev() {
                    for u in 0..U {
                        let dv = _mm512_loadu_si512(d.as_ptr().add(i + 64 * u).cast());
                        let m = _mm512_movepi8_mask(qv[u]);
                        let dbl = _mm512_add_epi8(qv[u], qv[u]);
                        // q = 2q ^ d ^ (poly where the top bit was set), one ternary op.
                        qv[u] = _mm512_ternarylogic_epi32(
                            dbl,
                            dv,
                            _mm512_maskz_mov_epi8(m, poly),
                            0x96,
                        );
                        pv[u] = _mm512_xor_si512(pv[u], dv);
                    }
                }
                for u in 0..U {
                    _mm512_storeu_si512(p.as_mut_ptr().add(i + 64 * u).cast(), pv[u]);
                    _mm512_storeu_si512(q.as_mut_ptr().add(i + 64 * u).cast(), qv[u]);
                }
            }
            i += 64 * U;
        }
        n
    }

    /// # Safety
    /// The CPU must support AVX-512 F; every slice has the length of `p`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gen_p_avx512(data: &[&[u8]], p: &mut [u8]) -> usize {
        const U: usize = 4;
        let n = p.len() / (64 * U) * (64 * U);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 256 <= len of every slice.
            unsafe {
                let mut pv = [_mm512_setzero_si512(); U];
                for (u, v) in pv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(data[0].as_ptr().add(i + 64 * u).cast());
                }
                for d in &data[1..] {
                    for (u, v) in pv.iter_mut().enumerate() {
                        let dv = _mm512_loadu_si512(d.as_ptr().add(i + 64 * u).cast());
                        *v = _mm512_xor_si512(*v, dv);
                    }
                }
                for (u, v) in pv.iter().enumerate() {
                    _mm512_storeu_si512(p.as_mut_ptr().add(i + 64 * u).cast(), *v);
                }
            }
            i += 64 * U;
        }
        n
    }

    /// # Safety
    /// The CPU must support AVX2; every slice has the length of `p`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gen_p_avx2(data: &[&[u8]], p: &mut [u8]) -> usize {
        const U: usize = 4;
        let n = p.len() / (32 * U) * (32 * U);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 128 <= len of every slice.
            unsafe {
                let mut pv = [_mm256_setzero_si256(); U];
                for (u, v) in pv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(data[0].as_ptr().add(i + 32 * u).cast());
                }
                for d in &data[1..] {
                    for (u, v) in pv.iter_mut().enumerate() {
                        let dv = _mm256_loadu_si256(d.as_ptr().add(i + 32 * u).cast());
                        *v = _mm256_xor_si256(*v, dv);
                    }
                }
                for (u, v) in pv.iter().enumerate() {
                    _mm256_storeu_si256(p.as_mut_ptr().add(i + 32 * u).cast(), *v);
                }
            }
            i += 32 * U;
        }
        n
    }

    /// One or two rows of a linear combination with GFNI affine multiplies.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F+BW and GFNI; shapes as in `Kernel::lincomb`, at
    /// most two rows.
    #[target_feature(enable = "avx512f,avx512bw,gfni")]
    pub(super) unsafe fn lincomb_gfni(
        coeffs: &[u8],
        srcs: &[&[u8]],
        outs: &mut [&mut [u8]],
        accumulate: bool,
    ) -> usize {
        let k = srcs.len();
        let len = srcs[0].len();
        let n = len / 64 * 64;
        let mats: Vec<__m512i> = coeffs
            .iter()
            .map(|&c| _mm512_set1_epi64(gf::affine_matrix(c) as i64))
            .collect();
        let two = outs.len() == 2;
        let (o0, o1): (*mut u8, *mut u8) = match outs {
            [a] => (a.as_mut_ptr(), std::ptr::null_mut()),
            [a, b] => (a.as_mut_ptr(), b.as_mut_ptr()),
            _ => return 0,
        };
        let mut i = 0;
        while i < n {
            // SAFETY: i + 64 <= len of every slice; o1 is only used with two rows.
            unsafe {
                let (mut a0, mut a1) = if accumulate {
                    (
                        _mm512_loadu_si512(o0.add(i).cast()),
                        if two {
                            _mm512_loadu_si512(o1.add(i).cast())
                        } else {
                            _mm512_setzero_si512()
                        },
                    )
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                for (j, s) in srcs.iter().enumerate() {
                    let x = _mm512_loadu_si512(s.as_ptr().add(i).cast());
                    a0 = _mm512_xor_si512(a0, _mm512_gf2p8affine_epi64_epi8::<0>(x, mats[j]));
                    if two {
                        a1 = _mm512_xor_si512(
                            a1,
                            _mm512_gf2p8affine_epi64_epi8::<0>(x, mats[k + j]),
                        );
                    }
                }
                _mm512_storeu_si512(o0.add(i).cast(), a0);
                if two {
                    _mm512_storeu_si512(o1.add(i).cast(), a1);
                }
            }
            i += 64;
        }
        n
    }

    /// One or two rows of a linear combination with nibble-table shuffles.
    ///
    /// # Safety
    /// The CPU must support AVX2; shapes as in `Kernel::lincomb`, at most two rows.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn lincomb_avx2(
        coeffs: &[u8],
        srcs: &[&[u8]],
        outs: &mut [&mut [u8]],
        accumulate: bool,
    ) -> usize {
        let k = srcs.len();
        let len = srcs[0].len();
        let n = len / 32 * 32;
        let tables: Vec<(__m256i, __m256i)> = coeffs
            .iter()
            .map(|&c| {
                let t = gf::nibble_tables(c);
                // SAFETY: t has 32 bytes; each load reads 16.
                unsafe {
                    let lo = _mm_loadu_si128(t.as_ptr().cast());
                    let hi = _mm_loadu_si128(t.as_ptr().add(16).cast());
                    (
                        _mm256_broadcastsi128_si256(lo),
                        _mm256_broadcastsi128_si256(hi),
                    )
                }
            })
            .collect();
        let mask = _mm256_set1_epi8(0x0f);
        let two = outs.len() == 2;
        let (o0, o1): (*mut u8, *mut u8) = match outs {
            [a] => (a.as_mut_ptr(), std::ptr::null_mut()),
            [a, b] => (a.as_mut_ptr(), b.as_mut_ptr()),
            _ => return 0,
        };
        let mut i = 0;
        while i < n {
            // SAFETY: i + 32 <= len of every slice; o1 is only used with two rows.
            unsafe {
                let (mut a0, mut a1) = if accumulate {
                    (
                        _mm256_loadu_si256(o0.add(i).cast()),
                        if two {
                            _mm256_loadu_si256(o1.add(i).cast())
                        } else {
                            _mm256_setzero_si256()
                        },
                    )
                } else {
                    (_mm256_setzero_si256(), _mm256_setzero_si256())
                };
                for (j, s) in srcs.iter().enumerate() {
                    let x = _mm256_loadu_si256(s.as_ptr().add(i).cast());
                    let lo = _mm256_and_si256(x, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi64(x, 4), mask);
                    let (tl, th) = tables[j];
                    a0 = _mm256_xor_si256(
                        a0,
                        _mm256_xor_si256(_mm256_shuffle_epi8(tl, lo), _mm256_shuffle_epi8(th, hi)),
                    );
                    if two {
                        let (tl, th) = tables[k + j];
                        a1 = _mm256_xor_si256(
                            a1,
                            _mm256_xor_si256(
                                _mm256_shuffle_epi8(tl, lo),
                                _mm256_shuffle_epi8(th, hi),
                            ),
                        );
                    }
                }
                _mm256_storeu_si256(o0.add(i).cast(), a0);
                if two {
                    _mm256_storeu_si256(o1.add(i).cast(), a1);
                }
            }
            i += 32;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Q written from the definition, byte by byte, with no code shared with the
    /// kernels: Q = sum of 2^i · D_i, multiplication by shift-and-add.
    fn reference_pq(data: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        fn mul(mut a: u8, mut b: u8) -> u8 {
            let mut r = 0;
            while b != 0 {
                if b & 1 == 1 {
                    r ^= a;
                }
                a = (a << 1) ^ if a & 0x80 != 0 { 0x1d } else { 0 };
                b >>= 1;
            }
            r
        }
        let len = data[0].len();
        let mut p = vec![0u8; len];
        let mut q = vec![0u8; len];
        let mut g = 1u8;
        for d in data {
            for j in 0..len {
                p[j] ^= d[j];
                q[j] ^= mul(g, d[j]);
            }
            g = mul(g, 2);
        }
        (p, q)
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pq_matches_reference(disks in 1usize..12, len in 0usize..700, seed: u64) {
            let data: Vec<Vec<u8>> = (0..disks).map(|i| bytes(seed + i as u64, len)).collect();
            let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            let (rp, rq) = reference_pq(&data);
            for k in Kernel::available() {
                let mut p = vec![0xaa; len];
                let mut q = vec![0x55; len];
                k.gen_pq(&refs, &mut p, &mut q);
                prop_assert_eq!(&p, &rp, "P with {}", k.name());
                prop_assert_eq!(&q, &rq, "Q with {}", k.name());
                let mut p2 = vec![0; len];
                k.gen_p(&refs, &mut p2);
                prop_assert_eq!(&p2, &rp);
            }
        }

        #[test]
        fn lincomb_matches_scalar(k in 1usize..8, rows in 1usize..4, len in 0usize..400,
                                  seed: u64, acc: bool) {
            let srcs: Vec<Vec<u8>> = (0..k).map(|i| bytes(seed ^ (i as u64 + 77), len)).collect();
            let refs: Vec<&[u8]> = srcs.iter().map(|d| &d[..]).collect();
            let coeffs = bytes(seed + 5, k * rows);
            let init = bytes(seed + 9, len);
            let mut expect: Vec<Vec<u8>> = vec![init.clone(); rows];
            for (r, e) in expect.iter_mut().enumerate() {
                if !acc { e.fill(0); }
                for j in 0..k {
                    for b in 0..len {
                        e[b] ^= gf::mul(coeffs[r * k + j], srcs[j][b]);
                    }
                }
            }
            for kern in Kernel::available() {
                let mut outs: Vec<Vec<u8>> = vec![init.clone(); rows];
                let mut o: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
                kern.lincomb(&coeffs, &refs, &mut o, acc);
                prop_assert_eq!(&outs, &expect, "{}", kern.name());
            }
        }

        #[test]
        fn two_data_recovery(k in 2usize..10, x0: usize, y0: usize, len in 1usize..300, seed: u64) {
            let x = x0 % k;
            let mut y = y0 % k;
            if y == x { y = (x + 1) % k; }
            let (x, y) = (x.min(y), x.max(y));
            let data: Vec<Vec<u8>> = (0..k).map(|i| bytes(seed + i as u64, len)).collect();
            let (p, q) = reference_pq(&data);
            let mut srcs: Vec<&[u8]> = vec![&p, &q];
            for (i, d) in data.iter().enumerate() {
                if i != x && i != y { srcs.push(d); }
            }
            let coeffs = two_data_coefficients(k, x, y);
            for kern in Kernel::available() {
                let mut dx = vec![0u8; len];
                let mut dy = vec![0u8; len];
                kern.lincomb(&coeffs, &srcs, &mut [&mut dx, &mut dy], false);
                prop_assert_eq!(&dx, &data[x]);
                prop_assert_eq!(&dy, &data[y]);
            }
        }
    }
}

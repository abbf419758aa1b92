//! Arithmetic in GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d) and
//! generator 2: the field of Linux md's RAID6 Q syndrome and of ISA-L.
//!
//! Tables are built at compile time. These scalar routines are the reference that the
//! SIMD kernels in [`crate::parity`] are tested against, and the fallback on CPUs without
//! vector units.

/// The reduction polynomial, without the x^8 term.
pub const POLY: u8 = 0x1d;

const fn build_exp() -> [u8; 512] {
    let mut t = [0u8; 512];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        t[i] = x as u8;
        t[i + 255] = x as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= 0x11d;
        }
        i += 1;
    }
    // Indices 510 and 511 are never produced by log(a) + log(b) <= 508.
    t
}

const fn build_log(exp: &[u8; 512]) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 255 {
        t[exp[i] as usize] = i as u8;
        i += 1;
    }
    t
}

/// `EXP[i]` = 2^i, doubled so that `EXP[log a + log b]` needs no reduction.
pub static EXP: [u8; 512] = build_exp();
/// `LOG[a]` = log2(a) for a != 0 (`LOG[0]` is meaningless).
pub static LOG: [u8; 256] = build_log(&EXP);

/// a * b.
#[inline]
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
    }
}

/// The inverse of a non-zero a.
///
/// # Panics
/// If `a` is zero.
#[inline]
pub fn inv(a: u8) -> u8 {
    assert!(a != 0, "zero has no inverse");
    EXP[(255 - LOG[a as usize] as usize) % 255]
}

/// a / b for non-zero b.
#[inline]
pub fn div(a: u8, b: u8) -> u8 {
    mul(a, inv(b))
}

/// 2^n (n taken mod 255).
#[inline]
pub fn pow2(n: usize) -> u8 {
    EXP[n % 255]
}

/// Multiplication by 2 of eight bytes at once (SWAR).
#[inline]
pub fn mul2_u64(x: u64) -> u64 {
    let hi = x & 0x8080_8080_8080_8080;
    let lo = (x & 0x7f7f_7f7f_7f7f_7f7f) << 1;
    lo ^ ((hi >> 7) * u64::from(POLY))
}

/// The 8x8 bit matrix of "multiply by c" in the layout `gf2p8affineqb` takes: byte
/// `7 - i` holds row i, whose bit j is bit i of `c * 2^j`.
pub fn affine_matrix(c: u8) -> u64 {
    let mut m = 0u64;
    for i in 0..8 {
        let mut row = 0u8;
        for j in 0..8 {
            if mul(c, 1 << j) & (1 << i) != 0 {
                row |= 1 << j;
            }
        }
        m |= u64::from(row) << (8 * (7 - i));
    }
    m
}

/// The two 16-entry tables of "multiply by c" for the nibble-shuffle method: low
/// nibbles, then high nibbles.
pub fn nibble_tables(c: u8) -> [u8; 32] {
    let mut t = [0u8; 32];
    for n in 0..16u8 {
        t[n as usize] = mul(c, n);
        t[16 + n as usize] = mul(c, n << 4);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Multiplication by shift and add, written separately from the tables.
    fn slow_mul(mut a: u8, mut b: u8) -> u8 {
        let mut r = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                r ^= a;
            }
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= POLY;
            }
            b >>= 1;
        }
        r
    }

    #[test]
    fn tables_match_shift_and_add() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), slow_mul(a, b), "{a} * {b}");
            }
            if a != 0 {
                assert_eq!(mul(a, inv(a)), 1);
            }
        }
        // 2 generates the whole multiplicative group.
        let mut seen = [false; 256];
        for i in 0..255 {
            seen[pow2(i) as usize] = true;
        }
        assert_eq!(seen.iter().filter(|&&s| s).count(), 255);
        // Known values from the Linux md tables.
        assert_eq!(pow2(8), 0x1d);
        assert_eq!(mul(0x80, 2), 0x1d);
    }

    #[test]
    fn swar_and_matrix_agree() {
        for a in 0..=255u8 {
            let x = u64::from_le_bytes([a, a ^ 0x80, 1, 0x80, 0xff, 0, 0x7f, a.rotate_left(3)]);
            let y = mul2_u64(x).to_le_bytes();
            for (k, b) in x.to_le_bytes().iter().enumerate() {
                assert_eq!(y[k], mul(*b, 2));
            }
            let m = affine_matrix(a);
            for x in 0..=255u8 {
                // Software gf2p8affineqb.
                let mut r = 0u8;
                for i in 0..8 {
                    let row = (m >> (8 * (7 - i))) as u8;
                    if (row & x).count_ones() % 2 == 1 {
                        r |= 1 << i;
                    }
                }
                assert_eq!(r, mul(a, x));
            }
            let t = nibble_tables(a);
            for x in 0..=255u8 {
                assert_eq!(t[(x & 15) as usize] ^ t[16 + (x >> 4) as usize], mul(a, x));
            }
        }
    }
}

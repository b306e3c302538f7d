//! The S-box substitution of ROI pixels (paper 003, section 2.2, Table 1),
//! generalised from 8-bit pixels to any payload width of 2..=16 bits.
//!
//! For 8-bit payloads it is exactly the Rijndael S-box. For other widths a
//! bijection on `[0, 2^bits)` is built by cycle walking over a base
//! permutation: the Rijndael S-box itself for widths up to 8, and for wider
//! values the two-byte permutation `(a, b) -> (S[a], S[b ^ S[a]])`. Cycle
//! walking (apply the base permutation until the value falls back into the
//! domain) of a permutation is a permutation of the sub-domain; the tables
//! are built once, in O(2^16).

/// The Rijndael S-box, computed from its definition (multiplicative inverse
/// in GF(2^8) followed by the affine map), not typed in.
pub fn rijndael() -> [u8; 256] {
    let mut sbox = [0u8; 256];
    let (mut p, mut q) = (1u8, 1u8);
    loop {
        // p <- p * 3 in GF(2^8); q <- q / 3, so q stays p's inverse.
        p = p ^ (p << 1) ^ if p & 0x80 != 0 { 0x1B } else { 0 };
        q ^= q << 1;
        q ^= q << 2;
        q ^= q << 4;
        if q & 0x80 != 0 {
            q ^= 0x09;
        }
        let x = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
        sbox[p as usize] = x ^ 0x63;
        if p == 1 {
            break;
        }
    }
    sbox[0] = 0x63;
    sbox
}

/// A bijection on `bits`-bit values and its inverse.
#[derive(Clone, Debug)]
pub struct SBox {
    bits: u8,
    /// Full 16-bit tables (entries past `2^bits` unused), so a lookup by
    /// any `u16` needs no bounds check.
    forward: Box<[u16; 1 << 16]>,
    inverse: Box<[u16; 1 << 16]>,
}

impl SBox {
    /// Builds the substitution for `bits` in 1..=16.
    pub fn new(bits: u8) -> SBox {
        assert!((1..=16).contains(&bits), "S-box width must be 1..=16");
        let s = rijndael();
        let base: Box<dyn Fn(u32) -> u32> = if bits <= 8 {
            Box::new(move |v| s[v as usize] as u32)
        } else {
            Box::new(move |v| {
                let a = s[(v >> 8) as usize];
                let b = s[((v as u8) ^ a) as usize];
                ((a as u32) << 8) | b as u32
            })
        };
        let size = 1u32 << bits;
        let table = || -> Box<[u16; 1 << 16]> {
            vec![0u16; 1 << 16]
                .into_boxed_slice()
                .try_into()
                .expect("65536 entries")
        };
        let mut forward = table();
        let mut inverse = table();
        for v in 0..size {
            let mut y = base(v);
            while y >= size {
                y = base(y);
            }
            forward[v as usize] = y as u16;
            inverse[y as usize] = v as u16;
        }
        SBox {
            bits,
            forward,
            inverse,
        }
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Substitutes `v` (must be below `2^bits`).
    #[inline]
    pub fn forward(&self, v: u16) -> u16 {
        self.forward[v as usize]
    }

    /// Undoes [`SBox::forward`].
    #[inline]
    pub fn inverse(&self, v: u16) -> u16 {
        self.inverse[v as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_table_1_of_the_paper() {
        let s = rijndael();
        assert_eq!(
            &s[..16],
            &[
                99, 124, 119, 123, 242, 107, 111, 197, 48, 1, 103, 43, 254, 215, 171, 118
            ]
        );
        assert_eq!(s[0x10], 202);
        assert_eq!(s[0x53], 0xED);
        assert_eq!(s[0xF0], 140);
        assert_eq!(s[0xFF], 22);
    }

    #[test]
    fn every_width_is_a_bijection() {
        for bits in 1..=16u8 {
            let sb = SBox::new(bits);
            let size = 1usize << bits;
            let mut seen = vec![false; size];
            for v in 0..size as u32 {
                let y = sb.forward(v as u16);
                assert!(
                    (y as usize) < size,
                    "bits {bits}: {v} -> {y} leaves the domain"
                );
                assert!(!seen[y as usize], "bits {bits}: collision at {y}");
                seen[y as usize] = true;
                assert_eq!(sb.inverse(y), v as u16);
            }
        }
        let eight = SBox::new(8);
        let s = rijndael();
        assert!((0..256).all(|v| eight.forward(v) == s[v as usize] as u16));
    }
}

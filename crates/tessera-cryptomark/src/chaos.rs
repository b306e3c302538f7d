//! The paper profile's diffusion (paper 003, section 3.1 step 7, eq. 5-10):
//! Sine-Sine (SSS, eq. 7) and Chebyshev-Chebyshev (CCS, eq. 9) maps keyed
//! by 64-bit halves of a 128-bit share key, reduced to integers by eq. 8,
//! and the additive-then-XOR diffusion of eq. 10.
//!
//! NOT FOR PRODUCTION: the keys are derived from the image's own hashes and
//! floating-point chaotic maps are not a vetted cipher. `libm` is used for
//! sin/cos/acos so sequences are bit-identical on every platform.

use std::f64::consts::PI;

/// The integers of eq. 5 after the constraints of eq. 6.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChaosParams {
    pub u: f64,
    pub k: i32,
    pub n0: usize,
    pub x0: f64,
}

impl ChaosParams {
    /// Eq. 5-6 on the 64 bits `h_1 .. h_64` (h_1 is the most significant bit
    /// of `bits`): u = h1h2h3, k = h4..h7, N0 = h8..h19, x0 = 1e-14 x h20..h64.
    pub fn from_bits(bits: u64) -> ChaosParams {
        let u = (bits >> 61) & 0x7;
        let k = (bits >> 57) & 0xF;
        let n0 = (bits >> 45) & 0xFFF;
        let x = bits & ((1u64 << 45) - 1);
        ChaosParams {
            u: if u == 0 { 0.5212882 } else { u as f64 },
            k: if k >= 8 { k as i32 } else { k as i32 + 12 },
            n0: if n0 >= 3000 {
                n0 as usize
            } else {
                n0 as usize + 1000
            },
            x0: 1e-14 * x as f64,
        }
    }
}

/// Which chaotic map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// Eq. 7: x' = frac(u sin(pi x) 2^k).
    SineSine,
    /// Eq. 9: x' = frac(cos((u + 1) arccos x) 2^k).
    ChebyshevChebyshev,
}

#[inline]
fn frac(y: f64) -> f64 {
    y - libm::floor(y)
}

#[inline]
fn step(map: Map, x: f64, p: &ChaosParams, scale: f64) -> f64 {
    match map {
        Map::SineSine => frac(p.u * libm::sin(PI * x) * scale),
        Map::ChebyshevChebyshev => frac(libm::cos((p.u + 1.0) * libm::acos(x)) * scale),
    }
}

/// Iterates `map` N0 + n times from x0 and returns the last n values reduced
/// by eq. 8: `floor(frac(|x|) * 10^14) mod modulus`.
pub fn sequence(map: Map, p: &ChaosParams, n: usize, modulus: u64) -> Vec<u16> {
    let scale = libm::ldexp(1.0, p.k);
    let mut x = p.x0;
    for _ in 0..p.n0 {
        x = step(map, x, p, scale);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        x = step(map, x, p, scale);
        let a = libm::fabs(x);
        let v = libm::floor((a - libm::floor(a)) * 1e14) as u64;
        out.push((v % modulus) as u16);
    }
    out
}

/// A running chaotic sequence: yields the values of [`sequence`] one by one,
/// so a whole image can be diffused without holding A and B in memory.
pub struct Stream {
    map: Map,
    p: ChaosParams,
    scale: f64,
    x: f64,
    modulus: u64,
}

impl Stream {
    pub fn new(map: Map, p: ChaosParams, modulus: u64) -> Stream {
        let scale = libm::ldexp(1.0, p.k);
        let mut x = p.x0;
        for _ in 0..p.n0 {
            x = step(map, x, &p, scale);
        }
        Stream {
            map,
            p,
            scale,
            x,
            modulus,
        }
    }

    /// Streams A (SSS on key bits 1-64) and B (CCS on key bits 65-128).
    pub fn pair(key: &[u8; 16], modulus: u64) -> (Stream, Stream) {
        let hi = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
        let lo = u64::from_be_bytes(key[8..].try_into().expect("8 bytes"));
        (
            Stream::new(Map::SineSine, ChaosParams::from_bits(hi), modulus),
            Stream::new(Map::ChebyshevChebyshev, ChaosParams::from_bits(lo), modulus),
        )
    }

    #[inline]
    pub fn next_value(&mut self) -> u16 {
        self.x = step(self.map, self.x, &self.p, self.scale);
        let a = libm::fabs(self.x);
        let v = libm::floor((a - libm::floor(a)) * 1e14) as u64;
        (v % self.modulus) as u16
    }
}

/// Eq. 10 over a whole plane, generating A and B on the fly.
pub fn diffuse_stream(plane: &mut [u16], key: &[u8; 16], modulus: u64) {
    let (mut a, mut b) = Stream::pair(key, modulus);
    let mask = (modulus - 1) as u16;
    for p in plane.iter_mut() {
        *p = (p.wrapping_add(a.next_value()) & mask) ^ b.next_value();
    }
}

/// Inverse of [`diffuse_stream`].
pub fn undiffuse_stream(share: &mut [u16], key: &[u8; 16], modulus: u64) {
    let (mut a, mut b) = Stream::pair(key, modulus);
    let mask = (modulus - 1) as u16;
    for s in share.iter_mut() {
        let x = a.next_value();
        *s = (*s ^ b.next_value()).wrapping_sub(x) & mask;
    }
}

/// The matrices A (SSS, key bits 1-64) and B (CCS, key bits 65-128) for a
/// 128-bit share key.
pub fn matrices(key: &[u8; 16], n: usize, modulus: u64) -> (Vec<u16>, Vec<u16>) {
    let hi = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(key[8..].try_into().expect("8 bytes"));
    let a = sequence(Map::SineSine, &ChaosParams::from_bits(hi), n, modulus);
    let b = sequence(
        Map::ChebyshevChebyshev,
        &ChaosParams::from_bits(lo),
        n,
        modulus,
    );
    (a, b)
}

/// Eq. 10: S = ((P + A) mod m) XOR B, in place.
pub fn diffuse(plane: &mut [u16], a: &[u16], b: &[u16], modulus: u64) {
    let mask = (modulus - 1) as u16;
    for ((p, &x), &y) in plane.iter_mut().zip(a).zip(b) {
        *p = (p.wrapping_add(x) & mask) ^ y;
    }
}

/// Inverse of eq. 10: P = ((S XOR B) - A) mod m, in place.
pub fn undiffuse(share: &mut [u16], a: &[u16], b: &[u16], modulus: u64) {
    let mask = (modulus - 1) as u16;
    for ((s, &x), &y) in share.iter_mut().zip(a).zip(b) {
        *s = (*s ^ y).wrapping_sub(x) & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq6_constraints_hold() {
        let p = ChaosParams::from_bits(0);
        assert_eq!(p.u, 0.5212882);
        assert_eq!(p.k, 12);
        assert_eq!(p.n0, 1000);
        assert_eq!(p.x0, 0.0);
        let p = ChaosParams::from_bits(u64::MAX);
        assert_eq!(p.u, 7.0);
        assert_eq!(p.k, 15);
        assert_eq!(p.n0, 4095);
        assert!((p.x0 - 0.35184372088831).abs() < 1e-12);
    }

    #[test]
    fn maps_are_deterministic_and_key_sensitive() {
        let key = *b"0123456789abcdef";
        let (a1, b1) = matrices(&key, 1000, 256);
        let (a2, b2) = matrices(&key, 1000, 256);
        assert_eq!(a1, a2);
        assert_eq!(b1, b2);
        let mut flipped = key;
        flipped[15] ^= 1;
        let (a3, b3) = matrices(&flipped, 1000, 256);
        assert_eq!(a1, a3, "the last bit only feeds the CCS half");
        let same = b1.iter().zip(&b3).filter(|(x, y)| x == y).count();
        assert!(
            same < 20,
            "{same} of 1000 CCS values unchanged after a key bit flip"
        );
    }

    #[test]
    fn diffusion_inverts() {
        let key = [7u8; 16];
        for modulus in [256u64, 65536] {
            let (a, b) = matrices(&key, 300, modulus);
            let orig: Vec<u16> = (0..300u32)
                .map(|i| (i * 37 % modulus as u32) as u16)
                .collect();
            let mut s = orig.clone();
            diffuse(&mut s, &a, &b, modulus);
            assert_ne!(s, orig);
            undiffuse(&mut s, &a, &b, modulus);
            assert_eq!(s, orig);
            let mut streamed = orig.clone();
            diffuse_stream(&mut streamed, &key, modulus);
            let mut direct = orig.clone();
            diffuse(&mut direct, &a, &b, modulus);
            assert_eq!(streamed, direct);
            undiffuse_stream(&mut streamed, &key, modulus);
            assert_eq!(streamed, orig);
        }
    }
}

//! The paper profile's diffusion (paper 003, section 3.1 step 7, eq. 5-10):
//! Sine-Sine (SSS, eq. 7) and Chebyshev-Chebyshev (CCS, eq. 9) maps,
//! reduced to integers by eq. 8, and the additive-then-XOR diffusion of
//! eq. 10.
//!
//! The maps and eq. 5-6 are the paper's; the key schedule around them is
//! ours (issue 16, docs/CRYPTOMARK.md "Paper key schedule"): each map's 64
//! parameter bits come from a SHA-256 of the whole 128-bit share key, odd
//! `u` is kept out of the Chebyshev map, and every step of the orbit is
//! dithered below the map's resolution and guarded away from the fixed
//! point 0, so no key yields a collapsed or short-period orbit.
//!
//! NOT FOR PRODUCTION: the keys are derived from the image's own hashes and
//! floating-point chaotic maps are not a vetted cipher. `libm` is used for
//! sin/cos/acos so sequences are bit-identical on every platform.

use std::f64::consts::PI;

use sha2::{Digest, Sha256};

/// Domain label of the key schedule; a new schedule gets a new label.
const SCHEDULE_LABEL: &[u8] = b"tessera/cryptomark/paper-chaos/v2";

/// States closer than this to 0 or 1 are moved (rule 4 of the schedule).
/// 0 is a fixed point of both maps; a state rounded to exactly 0 (the sine
/// map at 1/2 for integer u, the Chebyshev map at its critical points)
/// would stay there, and in the basin of the Chebyshev map's
/// superattracting 0 (odd u) the state squares towards 0 and crosses this
/// bound within a few steps.
const GUARD: f64 = 1.0 / 65536.0;

/// Mantissa bits of each state XORed with the step counter (rule 3).
const DITHER_BITS: u32 = 20;
const DITHER_MASK: u64 = (1 << DITHER_BITS) - 1;

/// Odd multiplier spreading the step counter over the dither bits (a
/// bijection on the counter modulo 2^DITHER_BITS).
const DITHER_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Golden-ratio step between successive guard moves, so repeated moves
/// never land on the same point.
const GOLDEN: f64 = 0.618_033_988_749_894_9;

/// The integers of eq. 5 after the constraints of eq. 6, plus the offset
/// of the guard moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChaosParams {
    pub u: f64,
    pub k: i32,
    pub n0: usize,
    pub x0: f64,
    /// Key-derived offset in [0.25, 0.75) added when the orbit nears 0 or 1.
    pub theta: f64,
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
            theta: 0.5,
        }
    }

    /// The key schedule: `map`'s parameters for a 128-bit share key.
    ///
    /// 1. Eq. 5-6 read 64 bits of `SHA-256(label || map || key)`, so every
    ///    key bit moves every parameter of both maps (the paper gives bits
    ///    1-64 to SSS and 65-128 to CCS: a flipped bit then changed one map
    ///    only, and a flipped low bit of x0 only the last digits of x0).
    /// 2. CCS: an odd integer u becomes u + 1 (7 becomes 6). For odd u,
    ///    `T_(u+1)` is even, 0 is its critical point and eq. 9 maps 0 to
    ///    itself: a superattracting fixed point that swallowed whole orbits.
    ///    For even u, 0 is repelling (multiplier (u+1) 2^k).
    pub fn from_key(map: Map, key: &[u8; 16]) -> ChaosParams {
        let digest = Sha256::new()
            .chain_update(SCHEDULE_LABEL)
            .chain_update([map.label()])
            .chain_update(key)
            .finalize();
        let word = |i: usize| u64::from_be_bytes(digest[i..i + 8].try_into().expect("8 bytes"));
        let mut p = ChaosParams::from_bits(word(0));
        if map == Map::ChebyshevChebyshev && p.u >= 1.0 && p.u as u64 % 2 == 1 {
            p.u = if p.u >= 7.0 { 6.0 } else { p.u + 1.0 };
        }
        p.theta = 0.25 + 0.5 * (word(8) >> 11) as f64 / (1u64 << 53) as f64;
        p
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

impl Map {
    fn label(self) -> u8 {
        match self {
            Map::SineSine => 1,
            Map::ChebyshevChebyshev => 2,
        }
    }
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

/// Eq. 8: `floor(frac(|x|) * 10^14) mod modulus`.
#[inline]
fn reduce(x: f64, modulus: u64) -> u16 {
    let a = libm::fabs(x);
    let v = libm::floor((a - libm::floor(a)) * 1e14) as u64;
    (v % modulus) as u16
}

/// Returns `n` values of the keyed sequence of `map` (see [`Stream`]).
pub fn sequence(map: Map, key: &[u8; 16], n: usize, modulus: u64) -> Vec<u16> {
    let mut s = Stream::new(map, ChaosParams::from_key(map, key), modulus);
    (0..n).map(|_| s.next_value()).collect()
}

/// A running chaotic sequence: yields the values one by one, so a whole
/// image can be diffused without holding A and B in memory.
///
/// Each step evaluates the paper's map on the state, `t = F(x)`, and
/// outputs `t` through eq. 8. The next state is `t` with its lowest
/// [`DITHER_BITS`] mantissa bits XORed with the step counter (rule 3), then
/// moved by `theta` if it lies within [`GUARD`] of 0 or 1 (rule 4). The
/// transient of N0 steps is discarded (eq. 5, rule 5).
pub struct Stream {
    map: Map,
    p: ChaosParams,
    scale: f64,
    x: f64,
    steps: u64,
    moves: u64,
    modulus: u64,
}

impl Stream {
    pub fn new(map: Map, p: ChaosParams, modulus: u64) -> Stream {
        let mut s = Stream {
            map,
            p,
            scale: libm::ldexp(1.0, p.k),
            x: p.x0,
            steps: 0,
            moves: 0,
            modulus,
        };
        s.x = s.guard(s.x);
        for _ in 0..p.n0 {
            s.next_state();
        }
        s
    }

    /// Streams A (SSS) and B (CCS) for a 128-bit share key.
    pub fn pair(key: &[u8; 16], modulus: u64) -> (Stream, Stream) {
        (
            Stream::new(
                Map::SineSine,
                ChaosParams::from_key(Map::SineSine, key),
                modulus,
            ),
            Stream::new(
                Map::ChebyshevChebyshev,
                ChaosParams::from_key(Map::ChebyshevChebyshev, key),
                modulus,
            ),
        )
    }

    /// Moves a state that lies within [`GUARD`] of 0 or 1 (or is not a
    /// number in [0, 1) at all) by `theta` plus a golden-ratio multiple of
    /// the number of moves so far.
    #[inline]
    fn guard(&mut self, mut x: f64) -> f64 {
        while !(GUARD..=1.0 - GUARD).contains(&x) {
            self.moves += 1;
            let x1 = if x.is_finite() { x } else { 0.0 };
            x = frac(x1 + self.p.theta + frac(self.moves as f64 * GOLDEN));
        }
        x
    }

    /// One step of the map: returns `t = F(x)` (the value eq. 8 reads) and
    /// advances the state to the dithered, guarded `t`.
    #[inline]
    pub fn next_state(&mut self) -> f64 {
        let t = step(self.map, self.x, &self.p, self.scale);
        let d = self.steps.wrapping_mul(DITHER_MUL) & DITHER_MASK;
        self.steps += 1;
        // t is in [0, 1]: XOR of low mantissa bits stays in t's binade.
        let dithered = f64::from_bits(t.to_bits() ^ d);
        self.x = self.guard(dithered);
        t
    }

    #[inline]
    pub fn next_value(&mut self) -> u16 {
        reduce(self.next_state(), self.modulus)
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

/// The matrices A (SSS) and B (CCS) for a 128-bit share key.
pub fn matrices(key: &[u8; 16], n: usize, modulus: u64) -> (Vec<u16>, Vec<u16>) {
    (
        sequence(Map::SineSine, key, n, modulus),
        sequence(Map::ChebyshevChebyshev, key, n, modulus),
    )
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
    use proptest::prelude::*;

    /// The side of the image the period tests cover: 512 x 512 samples.
    const IMAGE: usize = 512 * 512;

    /// Fails when two positions of the state sequence start the same pair
    /// of consecutive states: for a deterministic map that is a cycle, and
    /// any period shorter than the sequence shows up as such a repeat.
    fn assert_no_repeated_window(label: &str, mut s: Stream, n: usize) {
        let t: Vec<u64> = (0..n).map(|_| s.next_state().to_bits()).collect();
        let mut pairs: Vec<(u64, u64, usize)> = t
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[0], w[1], i))
            .collect();
        pairs.sort_unstable();
        for w in pairs.windows(2) {
            assert!(
                (w[0].0, w[0].1) != (w[1].0, w[1].1),
                "{label}: states at {} and {} repeat (period {})",
                w[0].2,
                w[1].2,
                w[1].2.abs_diff(w[0].2)
            );
        }
    }

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
    fn every_key_bit_moves_both_maps() {
        let key = *b"0123456789abcdef";
        let base = [Map::SineSine, Map::ChebyshevChebyshev].map(|m| ChaosParams::from_key(m, &key));
        for bit in 0..128 {
            let mut k = key;
            k[bit / 8] ^= 0x80 >> (bit % 8);
            for (m, b) in [Map::SineSine, Map::ChebyshevChebyshev]
                .into_iter()
                .zip(base)
            {
                let p = ChaosParams::from_key(m, &k);
                assert!(
                    p.x0 != b.x0 && p.theta != b.theta,
                    "bit {bit} leaves {m:?} x0 or theta unchanged"
                );
            }
        }
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
        for (name, x, y) in [("SSS", &a1, &a3), ("CCS", &b1, &b3)] {
            let same = x.iter().zip(y).filter(|(x, y)| x == y).count();
            assert!(
                same < 20,
                "{name}: {same} of 1000 values unchanged after the last key bit flipped"
            );
        }
    }

    /// Issue 16: the Chebyshev map with u = 1, k = 12 fell into the fixed
    /// point 0 after 4,839 outputs. Even with those parameters given
    /// directly (the schedule never picks an odd u for CCS), the guard
    /// keeps the orbit alive for a whole 512x512 image.
    #[test]
    fn chebyshev_u1_k12_never_collapses() {
        for x in [1u64, 0x1234_5678_9abc, 0x1FFF_FFFF_FFFF] {
            let bits = (1u64 << 61) | (12 << 57) | (0x7FF << 45) | x;
            let p = ChaosParams::from_bits(bits);
            assert_eq!((p.u, p.k), (1.0, 12));
            let mut s = Stream::new(Map::ChebyshevChebyshev, p, 256);
            let zeros = (0..IMAGE).filter(|_| s.next_state() < GUARD).count();
            assert!(zeros < IMAGE / 1000, "x0 bits {x:#x}: {zeros} states at 0");
            assert_no_repeated_window(
                &format!("CCS u=1 k=12 x0 bits {x:#x}"),
                Stream::new(Map::ChebyshevChebyshev, p, 256),
                IMAGE,
            );
        }
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Issue 16: the sequences for one 512x512 image repeat nowhere
        /// (the paper's sine map showed periods of 30,872 and 3,296).
        #[test]
        fn sequences_for_one_image_have_no_short_period(key in any::<[u8; 16]>()) {
            for map in [Map::SineSine, Map::ChebyshevChebyshev] {
                let p = ChaosParams::from_key(map, &key);
                prop_assert!(map == Map::SineSine || p.u < 1.0 || (p.u as u64).is_multiple_of(2));
                assert_no_repeated_window(&format!("{map:?} {p:?}"), Stream::new(map, p, 256), IMAGE);
            }
        }
    }
}

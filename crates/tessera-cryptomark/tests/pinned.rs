//! Pinned outputs (issue 14): SHA-256 digests of the shares that protect
//! writes for fixed inputs, in both profiles, and of the paper profile's
//! chaotic sequences. Taken before the protect and restore kernels were
//! optimized: a faster kernel must write the same bytes, so shares stored
//! by earlier versions still restore and the paper profile stays the
//! paper's.

use sha2::{Digest, Sha256};
use tessera_cryptomark::chaos::{ChaosParams, Map, Stream, matrices};
use tessera_cryptomark::{
    PaperKeys, Profile, ProtectKey, Protected, RestoreKey, StudyKey, hex, protect, restore,
};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, ImageSpec, PixelFormat, Rect};

use crate::{KEY, SALT, formats};

/// A fixed generator (splitmix64), so the inputs do not depend on any
/// crate's random number algorithms.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Canonical samples, or (`junk`) arbitrary bits in the whole container.
fn image(format: PixelFormat, w: u32, h: u32, frames: u32, seed: u64, junk: bool) -> Image {
    let spec = ImageSpec {
        width: w,
        height: h,
        frames,
        format,
    };
    let mut g = Mix(seed);
    let (lo, hi) = format.value_range();
    let span = (hi - lo) as u64 + 1;
    let samples = (0..spec.sample_count())
        .map(|_| {
            let r = g.next();
            if junk {
                r as u16 & format.container_mask()
            } else {
                format.word(lo + (r % span) as i32)
            }
        })
        .collect();
    Image::new(spec, samples).expect("image")
}

fn protect_in(profile: Profile, image: &Image, roi: Rect) -> Protected {
    let key = StudyKey::from_bytes(KEY);
    let k = match profile {
        Profile::Secure => ProtectKey::Secure {
            key: &key,
            salt: SALT,
        },
        Profile::Paper => ProtectKey::Paper,
    };
    protect(image, roi, "pinned", k).expect("protect")
}

/// Digest of the header, both shares and the paper keys; also checks that
/// restore gives the image back.
fn absorb(h: &mut Sha256, image: &Image, p: &Protected) {
    h.update(p.header.to_json());
    for s in &p.shares {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    }
    if let Some(k) = &p.paper_keys {
        h.update(k.to_text());
    }
    let key = StudyKey::from_bytes(KEY);
    let rk = match p.paper_keys.as_ref() {
        Some(k) => RestoreKey::Paper(k),
        None => RestoreKey::Secure(&key),
    };
    let r = restore(&p.header, &p.shares[0], &p.shares[1], rk).expect("restore");
    assert!(r.report.is_intact(), "{:?}", r.report);
    assert!(r.image == *image, "restore differs from the original");
}

/// Every format, canonical and junk words, two frames, a ROI off the
/// 16-pixel lattice (edge tiles, partial blocks), an empty ROI and a
/// whole-image ROI.
fn small_cases_digest(profile: Profile) -> String {
    let mut h = Sha256::new();
    for (i, format) in formats().into_iter().enumerate() {
        for junk in [false, true] {
            let img = image(format, 75, 53, 2, 1000 + i as u64 * 2 + junk as u64, junk);
            for roi in [
                Rect::new(5, 9, 60, 40),
                Rect::default(),
                Rect::new(0, 0, 75, 53),
                Rect::new(70, 50, 5, 3),
            ] {
                absorb(&mut h, &img, &protect_in(profile, &img, roi));
            }
        }
    }
    hex(&h.finalize())
}

/// The benchmark's slice: a 512x512 12-bit head phantom (large enough for
/// the parallel bands) and a 16-bit random slice of two frames.
fn slice_digest(profile: Profile) -> String {
    let mut h = Sha256::new();
    let phantom = head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 42).expect("phantom");
    absorb(
        &mut h,
        &phantom,
        &protect_in(profile, &phantom, Rect::new(64, 48, 384, 416)),
    );
    let img = image(PixelFormat::gray16(16, false), 300, 260, 2, 7, true);
    absorb(
        &mut h,
        &img,
        &protect_in(profile, &img, Rect::new(33, 17, 200, 211)),
    );
    hex(&h.finalize())
}

#[test]
fn secure_protect_output_is_pinned() {
    assert_eq!(
        small_cases_digest(Profile::Secure),
        "fbbd0a1ea6a8c87529be1688c9bcd3aec8605fd9c33a121dba75dac5ae2471f9"
    );
    assert_eq!(
        slice_digest(Profile::Secure),
        "a04f9c003740b744eda55995c22476129cd3fa205ebe4108745eadc6a5cfde6a"
    );
}

#[test]
fn paper_protect_output_is_pinned() {
    assert_eq!(
        small_cases_digest(Profile::Paper),
        "3a49eec8d410d3e60938ff28ea0913cddf7acf9bd11141afd958e44feefc9338"
    );
    assert_eq!(
        slice_digest(Profile::Paper),
        "d5b7f8e25f5e2521fdedf76e90de990f540765987cc1ca5a3fc26b6271cec930"
    );
}

#[test]
fn paper_protect_with_given_keys_is_pinned() {
    let keys = PaperKeys {
        share1: *b"0123456789abcdef",
        share2: *b"fedcba9876543210",
    };
    let mut h = Sha256::new();
    for format in [PixelFormat::GRAY8, PixelFormat::gray16(12, false)] {
        let img = image(format, 130, 70, 1, 5, false);
        let p = protect(
            &img,
            Rect::new(3, 4, 100, 50),
            "pinned",
            ProtectKey::PaperWithKeys(&keys),
        )
        .expect("protect");
        absorb(&mut h, &img, &p);
    }
    assert_eq!(
        hex(&h.finalize()),
        "dcfa820e0395088793f20c3a9ab08528ac2f29cfdb5891c93f9fcfc61ae6dc26"
    );
}

/// The chaotic sequences A and B (eq. 7-9 and the key schedule) for a few
/// keys and both moduli, 200,000 values each.
#[test]
fn chaos_sequences_are_pinned() {
    let mut h = Sha256::new();
    for key in [[0u8; 16], [0xFF; 16], *b"0123456789abcdef", [0x5A; 16]] {
        for modulus in [256u64, 65536] {
            let (a, b) = matrices(&key, 200_000, modulus);
            for v in a.iter().chain(&b) {
                h.update(v.to_le_bytes());
            }
        }
    }
    assert_eq!(
        hex(&h.finalize()),
        "50599cc4170e6b426b35e4ded39c2bbbab267df5714f9729791aa5b3d7dc42e6"
    );
}

/// Both maps for every u of eq. 6 (including u = 0's 0.5212882 and the odd
/// u the key schedule keeps out of the Chebyshev map), several k and x0.
#[test]
fn chaos_parameter_sweep_is_pinned() {
    let mut h = Sha256::new();
    for map in [Map::SineSine, Map::ChebyshevChebyshev] {
        for u in 0u64..8 {
            for k in [0u64, 5, 9, 15] {
                for x in [0u64, 1, 0x1234_5678_9abc, (1 << 45) - 1] {
                    let bits = (u << 61) | (k << 57) | (0x123 << 45) | x;
                    let mut p = ChaosParams::from_bits(bits);
                    p.theta = 0.25 + (u * 16 + k) as f64 / 512.0;
                    let mut s = Stream::new(map, p, 65536);
                    for _ in 0..5_000 {
                        h.update(s.next_state().to_bits().to_le_bytes());
                        h.update(s.next_value().to_le_bytes());
                    }
                }
            }
        }
    }
    assert_eq!(
        hex(&h.finalize()),
        "20af07de967ce6cb0a9d96dde7c8f6fb41109b80925c4f73318a4020f500b227"
    );
}

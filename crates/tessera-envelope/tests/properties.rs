//! Properties of the sealed envelope: round trip, every flipped bit of the
//! sealed value (header, nonce, ciphertext, tag) or of the context (the
//! caller's part of the AAD) refused, a wrong purpose or key refused; the
//! same for the two-layer form.

use proptest::prelude::*;
use ring::rand::SystemRandom;
use tessera_envelope::{
    EnvelopeError, HEADER_LEN, NONCE_BYTES, OVERHEAD, Purpose, open, open_layered, seal,
    seal_layered,
};

fn purpose() -> impl Strategy<Value = Purpose> {
    prop::sample::select(Purpose::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn seal_open_round_trip(
        key in any::<[u8; 32]>(),
        p in purpose(),
        ctx in prop::collection::vec(any::<u8>(), 0..64),
        plain in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let rng = SystemRandom::new();
        let s = seal(&key, p, &ctx, &plain, &rng).unwrap();
        prop_assert_eq!(s.len(), plain.len() + OVERHEAD);
        let opened = open(&key, p, &ctx, &s).unwrap();
        prop_assert_eq!(opened.as_slice(), plain.as_slice());
        // Two seals of the same value differ (random nonce).
        let t = seal(&key, p, &ctx, &plain, &rng).unwrap();
        prop_assert_ne!(&s[HEADER_LEN..HEADER_LEN + NONCE_BYTES], &t[HEADER_LEN..HEADER_LEN + NONCE_BYTES]);
    }

    /// Any single flipped bit anywhere in the sealed value is refused:
    /// header (magic, version, purpose), nonce, ciphertext, tag.
    #[test]
    fn any_flipped_bit_of_the_sealed_value_is_refused(
        key in any::<[u8; 32]>(),
        p in purpose(),
        ctx in prop::collection::vec(any::<u8>(), 0..32),
        plain in prop::collection::vec(any::<u8>(), 0..128),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let s = seal(&key, p, &ctx, &plain, &SystemRandom::new()).unwrap();
        let mut bad = s.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(open(&key, p, &ctx, &bad).is_err(), "flipped bit {} of byte {}", bit, i);
        if i >= HEADER_LEN {
            prop_assert_eq!(open(&key, p, &ctx, &bad), Err(EnvelopeError::Forged));
        }
    }

    /// Any flipped bit of the context (the caller's AAD), a longer or a
    /// shorter context, is refused.
    #[test]
    fn any_change_of_the_context_is_refused(
        key in any::<[u8; 32]>(),
        p in purpose(),
        ctx in prop::collection::vec(any::<u8>(), 1..32),
        plain in prop::collection::vec(any::<u8>(), 0..64),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let s = seal(&key, p, &ctx, &plain, &SystemRandom::new()).unwrap();
        let mut other = ctx.clone();
        other[pos.index(ctx.len())] ^= 1 << bit;
        prop_assert_eq!(open(&key, p, &other, &s), Err(EnvelopeError::Forged));
        let mut longer = ctx.clone();
        longer.push(0);
        prop_assert_eq!(open(&key, p, &longer, &s), Err(EnvelopeError::Forged));
        prop_assert_eq!(open(&key, p, &ctx[..ctx.len() - 1], &s), Err(EnvelopeError::Forged));
    }

    /// Opening for another purpose is refused, and so is a value whose
    /// header was re-labelled with that purpose (the header is in the AAD).
    #[test]
    fn wrong_purpose_is_refused(
        key in any::<[u8; 32]>(),
        p in purpose(),
        q in purpose(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(p != q);
        let s = seal(&key, p, b"ctx", &plain, &SystemRandom::new()).unwrap();
        prop_assert_eq!(
            open(&key, q, b"ctx", &s),
            Err(EnvelopeError::WrongPurpose { expected: q, found: Some(p) })
        );
        let mut relabelled = s.clone();
        relabelled[HEADER_LEN - 1] = q.id();
        prop_assert_eq!(open(&key, q, b"ctx", &relabelled), Err(EnvelopeError::Forged));
    }

    #[test]
    fn wrong_key_is_refused(
        key in any::<[u8; 32]>(),
        other in any::<[u8; 32]>(),
        p in purpose(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(key != other);
        let s = seal(&key, p, b"ctx", &plain, &SystemRandom::new()).unwrap();
        prop_assert_eq!(open(&other, p, b"ctx", &s), Err(EnvelopeError::Forged));
    }

    /// The two-layer form: round trip; any flipped bit (in either layer),
    /// another context, purpose or key-encryption key refused.
    #[test]
    fn layered_round_trip_and_refusals(
        kek in any::<[u8; 32]>(),
        p in purpose(),
        plain in prop::collection::vec(any::<u8>(), 0..256),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let s = seal_layered(&kek, p, b"obj|part", &plain, &SystemRandom::new()).unwrap();
        let opened = open_layered(&kek, p, b"obj|part", &s).unwrap();
        prop_assert_eq!(opened.as_slice(), plain.as_slice());
        let mut bad = s.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(open_layered(&kek, p, b"obj|part", &bad).is_err());
        prop_assert!(open_layered(&kek, p, b"obj|other", &s).is_err());
        let mut k2 = kek;
        k2[0] ^= 1;
        prop_assert!(open_layered(&k2, p, b"obj|part", &s).is_err());
        let q = Purpose::ALL[(Purpose::ALL.iter().position(|x| *x == p).unwrap() + 1) % Purpose::ALL.len()];
        prop_assert!(open_layered(&kek, q, b"obj|part", &s).is_err());
        prop_assert!(open_layered(&kek, p, b"obj|part", &s[..s.len() - 1]).is_err());
    }
}

//! k-of-n erasure coding of the objects Tessera stores (pixel shares,
//! sealed pixels, metadata envelopes): an object is cut into `k` data
//! fragments and `m` parity fragments (Reed-Solomon over GF(2^16),
//! Leopard-RS, `reed-solomon-simd`), one per storage node, and any `k` of
//! the `n = k + m` rebuild it exactly.
//!
//! Every fragment is self-describing and bound to what it belongs to: its
//! header names the object id, its index, `k`, `m`, the object's length and
//! the object's SHA-256. A node cannot pass one fragment off as another
//! (another object's, or another index of the same object): [`decode`]
//! refuses a fragment whose header does not match what the caller asks for,
//! and checks the rebuilt object against the SHA-256 the fragments carry
//! (and the caller's own record of each fragment's hash catches a node that
//! forges a whole consistent set).
//!
//! Pure: no I/O, no async, no protos.

#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};

/// Fragment header magic and format version.
pub const MAGIC: [u8; 4] = *b"TSF1";

/// Longest object id a header carries.
pub const MAX_OBJECT_ID: usize = 255;

/// Most fragments an object may have (one per storage node).
pub const MAX_FRAGMENTS: usize = 64;

/// `k` data fragments and `m` parity fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scheme {
    /// Data fragments: any `k` fragments rebuild the object.
    pub k: usize,
    /// Parity fragments: up to `m` may be lost.
    pub m: usize,
}

/// Why an object could not be encoded or rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    #[error("erasure scheme {k}+{m}: {why}")]
    Scheme { k: usize, m: usize, why: String },
    #[error("object id {0:?}: 1..=255 bytes")]
    ObjectId(String),
    #[error("fragment {index}: {why}")]
    Fragment { index: usize, why: String },
    #[error("{have} usable fragments of {need} needed")]
    TooFew { have: usize, need: usize },
    #[error("the rebuilt object does not match its SHA-256")]
    Digest,
    #[error("reed-solomon: {0}")]
    Codec(String),
}

impl Scheme {
    pub fn new(k: usize, m: usize) -> Result<Self, ErasureError> {
        let s = Scheme { k, m };
        s.check()?;
        Ok(s)
    }

    /// `k + m`.
    pub fn n(&self) -> usize {
        self.k + self.m
    }

    fn check(&self) -> Result<(), ErasureError> {
        let bad = |why: &str| ErasureError::Scheme {
            k: self.k,
            m: self.m,
            why: why.to_owned(),
        };
        if self.k == 0 {
            return Err(bad("at least one data fragment"));
        }
        if self.n() > MAX_FRAGMENTS {
            return Err(bad("at most 64 fragments"));
        }
        Ok(())
    }

    /// Bytes of each fragment's payload for an object of `len` bytes
    /// (even, as Leopard-RS needs; at least 2).
    pub fn shard_len(&self, len: u64) -> usize {
        let per = len.div_ceil(self.k as u64).max(1) as usize;
        per + per % 2
    }
}

/// What a fragment's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentHeader {
    pub object_id: String,
    pub index: usize,
    pub scheme: Scheme,
    pub object_len: u64,
    pub object_sha256: [u8; 32],
}

const FIXED: usize = 4 + 1 + 1 + 1 + 1 + 8 + 32 + 1; // magic, version, k, m, index, len, sha, id_len

impl FragmentHeader {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(1);
        out.push(self.scheme.k as u8);
        out.push(self.scheme.m as u8);
        out.push(self.index as u8);
        out.extend_from_slice(&self.object_len.to_le_bytes());
        out.extend_from_slice(&self.object_sha256);
        out.push(self.object_id.len() as u8);
        out.extend_from_slice(self.object_id.as_bytes());
    }
}

/// Splits a fragment into its header and payload, checking the framing.
pub fn parse(fragment: &[u8]) -> Result<(FragmentHeader, &[u8]), ErasureError> {
    let bad = |why: &str| ErasureError::Fragment {
        index: usize::MAX,
        why: why.to_owned(),
    };
    if fragment.len() < FIXED || fragment[..4] != MAGIC {
        return Err(bad("not a Tessera fragment (magic)"));
    }
    if fragment[4] != 1 {
        return Err(bad("unknown fragment version"));
    }
    let (k, m, index) = (
        fragment[5] as usize,
        fragment[6] as usize,
        fragment[7] as usize,
    );
    let mut len = [0u8; 8];
    len.copy_from_slice(&fragment[8..16]);
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&fragment[16..48]);
    let id_len = fragment[48] as usize;
    let rest = &fragment[FIXED..];
    if id_len == 0 || rest.len() < id_len {
        return Err(bad("truncated object id"));
    }
    let object_id = std::str::from_utf8(&rest[..id_len])
        .map_err(|_| bad("object id is not UTF-8"))?
        .to_owned();
    let scheme = Scheme::new(k, m)?;
    if index >= scheme.n() {
        return Err(bad("index outside the scheme"));
    }
    let header = FragmentHeader {
        object_id,
        index,
        scheme,
        object_len: u64::from_le_bytes(len),
        object_sha256: sha,
    };
    let payload = &rest[id_len..];
    if payload.len() != scheme.shard_len(header.object_len) {
        return Err(ErasureError::Fragment {
            index,
            why: format!(
                "payload of {} bytes, the header implies {}",
                payload.len(),
                scheme.shard_len(header.object_len)
            ),
        });
    }
    Ok((header, payload))
}

/// Encodes `data` (the object `object_id`) into `scheme.n()` fragments,
/// index order: `k` data fragments, then `m` parity fragments.
pub fn encode(object_id: &str, scheme: Scheme, data: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
    encode_hashed(object_id, scheme, data, Sha256::digest(data).into())
}

/// [`encode`] for a caller that already holds the object's SHA-256 (it is
/// not computed again; a wrong digest makes every [`decode`] fail).
pub fn encode_hashed(
    object_id: &str,
    scheme: Scheme,
    data: &[u8],
    object_sha256: [u8; 32],
) -> Result<Vec<Vec<u8>>, ErasureError> {
    let (mut out, header) = data_fragments(object_id, scheme, data, object_sha256)?;
    add_parity(&mut out, header)?;
    Ok(out)
}

/// [`encode_hashed`] that takes the object and lets it go as soon as its
/// bytes are in the data fragments, before the parity is computed: at most
/// about twice the object is held at once, plus the parity.
pub fn encode_owned(
    object_id: &str,
    scheme: Scheme,
    data: Vec<u8>,
    object_sha256: [u8; 32],
) -> Result<Vec<Vec<u8>>, ErasureError> {
    let (mut out, header) = data_fragments(object_id, scheme, &data, object_sha256)?;
    drop(data);
    add_parity(&mut out, header)?;
    Ok(out)
}

/// The `k` data fragments, each its header and its slice of `data` (the
/// last one zero-padded), written in place; and the header the parity
/// fragments get.
fn data_fragments(
    object_id: &str,
    scheme: Scheme,
    data: &[u8],
    object_sha256: [u8; 32],
) -> Result<(Vec<Vec<u8>>, FragmentHeader), ErasureError> {
    scheme.check()?;
    if object_id.is_empty() || object_id.len() > MAX_OBJECT_ID {
        return Err(ErasureError::ObjectId(object_id.to_owned()));
    }
    let shard = scheme.shard_len(data.len() as u64);
    let mut header = FragmentHeader {
        object_id: object_id.to_owned(),
        index: 0,
        scheme,
        object_len: data.len() as u64,
        object_sha256,
    };
    let len = FIXED + object_id.len() + shard;
    let mut out = Vec::with_capacity(scheme.n());
    for i in 0..scheme.k {
        header.index = i;
        let mut f = Vec::with_capacity(len);
        header.encode(&mut f);
        let start = (i * shard).min(data.len());
        let end = ((i + 1) * shard).min(data.len());
        f.extend_from_slice(&data[start..end]);
        f.resize(len, 0);
        out.push(f);
    }
    Ok((out, header))
}

/// Appends the `m` parity fragments, computed over the data fragments'
/// payloads.
fn add_parity(out: &mut Vec<Vec<u8>>, mut header: FragmentHeader) -> Result<(), ErasureError> {
    let scheme = header.scheme;
    if scheme.m == 0 {
        return Ok(());
    }
    let prefix = FIXED + header.object_id.len();
    let parity = reed_solomon_simd::encode(scheme.k, scheme.m, out.iter().map(|f| &f[prefix..]))
        .map_err(|e| ErasureError::Codec(e.to_string()))?;
    for payload in parity {
        header.index = out.len();
        let mut f = Vec::with_capacity(prefix + payload.len());
        header.encode(&mut f);
        f.extend_from_slice(&payload);
        out.push(f);
    }
    Ok(())
}

/// Rebuilds the object `object_id` from any `k` of its fragments, given as
/// `(index the caller stored it under, bytes)`. A fragment whose header
/// names another object, another index or another scheme is refused (the
/// error names it); the rebuilt object must match the SHA-256 the headers
/// carry.
pub fn decode(
    object_id: &str,
    scheme: Scheme,
    fragments: &[(usize, &[u8])],
) -> Result<Vec<u8>, ErasureError> {
    scheme.check()?;
    let mut first: Option<FragmentHeader> = None;
    let mut originals: Vec<(usize, &[u8])> = Vec::new();
    let mut recovery: Vec<(usize, &[u8])> = Vec::new();
    let mut seen = vec![false; scheme.n()];
    for &(index, bytes) in fragments {
        let (h, payload) = parse(bytes).map_err(|e| match e {
            ErasureError::Fragment { why, .. } => ErasureError::Fragment { index, why },
            other @ (ErasureError::Scheme { .. }
            | ErasureError::ObjectId(_)
            | ErasureError::TooFew { .. }
            | ErasureError::Digest
            | ErasureError::Codec(_)) => other,
        })?;
        let wrong = |why: String| ErasureError::Fragment { index, why };
        if h.object_id != object_id {
            return Err(wrong(format!("belongs to object {:?}", h.object_id)));
        }
        if h.index != index {
            return Err(wrong(format!("is fragment {} of the object", h.index)));
        }
        if h.scheme != scheme {
            return Err(wrong(format!("is coded {}+{}", h.scheme.k, h.scheme.m)));
        }
        if let Some(f) = &first {
            if f.object_len != h.object_len || f.object_sha256 != h.object_sha256 {
                return Err(wrong("disagrees with the other fragments' object".into()));
            }
        } else {
            first = Some(h.clone());
        }
        if std::mem::replace(&mut seen[index], true) {
            return Err(wrong("given twice".into()));
        }
        if index < scheme.k {
            originals.push((index, payload));
        } else {
            recovery.push((index - scheme.k, payload));
        }
    }
    let have = originals.len() + recovery.len();
    let Some(head) = first else {
        return Err(ErasureError::TooFew {
            have: 0,
            need: scheme.k,
        });
    };
    if have < scheme.k {
        return Err(ErasureError::TooFew {
            have,
            need: scheme.k,
        });
    }
    let len = usize::try_from(head.object_len).map_err(|_| ErasureError::Digest)?;
    let shard = scheme.shard_len(head.object_len);
    let mut shards: Vec<Option<Vec<u8>>> = vec![None; scheme.k];
    for (i, p) in &originals {
        shards[*i] = Some(p.to_vec());
    }
    if originals.len() < scheme.k {
        let restored = reed_solomon_simd::decode(
            scheme.k,
            scheme.m,
            originals.iter().copied(),
            recovery.iter().copied(),
        )
        .map_err(|e| ErasureError::Codec(e.to_string()))?;
        for (i, s) in restored {
            if i < scheme.k {
                shards[i] = Some(s);
            }
        }
    }
    let mut out = Vec::with_capacity(scheme.k * shard);
    for (i, s) in shards.into_iter().enumerate() {
        let s = s.ok_or(ErasureError::Fragment {
            index: i,
            why: "not restored".into(),
        })?;
        out.extend_from_slice(&s);
    }
    out.truncate(len);
    if Sha256::digest(&out)[..] != head.object_sha256 {
        return Err(ErasureError::Digest);
    }
    Ok(out)
}

/// The storage object id of fragment `index` of `object_id`.
pub fn fragment_object_id(object_id: &str, index: usize) -> String {
    format!("{object_id}.f{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn any_k_of_n_rebuild_exactly() {
        let data: Vec<u8> = (0..10_001u32).map(|i| (i * 31 % 251) as u8).collect();
        for (k, m) in [(3, 2), (2, 1), (2, 0), (1, 1), (4, 3)] {
            let s = Scheme::new(k, m).unwrap();
            let frags = encode("st-1.s1", s, &data).unwrap();
            assert_eq!(frags.len(), k + m);
            for set in subsets(k + m, k) {
                let given: Vec<(usize, &[u8])> =
                    set.iter().map(|&i| (i, frags[i].as_slice())).collect();
                assert_eq!(
                    decode("st-1.s1", s, &given).unwrap(),
                    data,
                    "{k}+{m} {set:?}"
                );
            }
        }
    }

    /// The fragments as the first encoder wrote them (each data shard
    /// copied out and padded, parity over those copies, then header +
    /// payload): fragments built in place must be these bytes exactly.
    fn reference_fragments(id: &str, s: Scheme, data: &[u8]) -> Vec<Vec<u8>> {
        let shard = s.shard_len(data.len() as u64);
        let originals: Vec<Vec<u8>> = (0..s.k)
            .map(|i| {
                let mut v =
                    data[(i * shard).min(data.len())..((i + 1) * shard).min(data.len())].to_vec();
                v.resize(shard, 0);
                v
            })
            .collect();
        let parity = if s.m == 0 {
            Vec::new()
        } else {
            reed_solomon_simd::encode(s.k, s.m, &originals).unwrap()
        };
        let mut header = FragmentHeader {
            object_id: id.into(),
            index: 0,
            scheme: s,
            object_len: data.len() as u64,
            object_sha256: Sha256::digest(data).into(),
        };
        originals
            .into_iter()
            .chain(parity)
            .enumerate()
            .map(|(i, p)| {
                header.index = i;
                let mut f = Vec::new();
                header.encode(&mut f);
                f.extend_from_slice(&p);
                f
            })
            .collect()
    }

    #[test]
    fn fragments_built_in_place_are_the_same_bytes() {
        for len in [0usize, 1, 5, 64, 10_001, 65_536 + 3] {
            let data: Vec<u8> = (0..len as u32).map(|i| (i * 131 % 253) as u8).collect();
            for (k, m) in [(3, 2), (2, 1), (2, 0), (4, 3)] {
                let s = Scheme::new(k, m).unwrap();
                let want = reference_fragments("st-9.s2", s, &data);
                assert_eq!(
                    encode("st-9.s2", s, &data).unwrap(),
                    want,
                    "{k}+{m}, {len} bytes"
                );
                let sha = Sha256::digest(&data).into();
                assert_eq!(
                    encode_owned("st-9.s2", s, data.clone(), sha).unwrap(),
                    want,
                    "owned {k}+{m}, {len} bytes"
                );
            }
        }
    }

    #[test]
    fn fewer_than_k_is_refused() {
        let s = Scheme::new(3, 2).unwrap();
        let frags = encode("o", s, b"hello world").unwrap();
        let given = [(0, frags[0].as_slice()), (4, frags[4].as_slice())];
        assert_eq!(
            decode("o", s, &given),
            Err(ErasureError::TooFew { have: 2, need: 3 })
        );
        assert!(matches!(
            decode("o", s, &[]),
            Err(ErasureError::TooFew { .. })
        ));
    }

    #[test]
    fn a_fragment_cannot_pass_for_another() {
        let s = Scheme::new(3, 2).unwrap();
        let a = encode("st-a.s1", s, &[7u8; 1000]).unwrap();
        let b = encode("st-b.s1", s, &[9u8; 1000]).unwrap();
        // Another object's fragment under this object's id.
        let e = decode("st-a.s1", s, &[(0, &a[0]), (1, &b[1]), (2, &a[2])]).unwrap_err();
        assert!(matches!(e, ErasureError::Fragment { index: 1, .. }), "{e}");
        // Another index of the same object.
        let e = decode("st-a.s1", s, &[(0, &a[0]), (1, &a[2]), (3, &a[3])]).unwrap_err();
        assert!(matches!(e, ErasureError::Fragment { index: 1, .. }), "{e}");
        // A flipped payload byte: the object's digest fails.
        let mut bad = a[1].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = decode("st-a.s1", s, &[(0, &a[0]), (1, &bad), (2, &a[2])]).unwrap_err();
        assert_eq!(e, ErasureError::Digest);
        // Garbage.
        let e = decode("st-a.s1", s, &[(0, b"junk".as_slice())]).unwrap_err();
        assert!(matches!(e, ErasureError::Fragment { index: 0, .. }), "{e}");
    }

    #[test]
    fn bad_schemes_and_ids() {
        assert!(Scheme::new(0, 2).is_err());
        assert!(Scheme::new(40, 40).is_err());
        assert!(encode("", Scheme::new(2, 1).unwrap(), b"x").is_err());
        assert!(encode(&"x".repeat(256), Scheme::new(2, 1).unwrap(), b"x").is_err());
    }

    #[test]
    fn empty_and_tiny_objects() {
        for data in [&b""[..], b"a", b"ab", b"abc"] {
            let s = Scheme::new(3, 2).unwrap();
            let f = encode("t", s, data).unwrap();
            let given = [
                (1, f[1].as_slice()),
                (3, f[3].as_slice()),
                (4, f[4].as_slice()),
            ];
            assert_eq!(decode("t", s, &given).unwrap(), data);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn round_trip_with_losses(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            k in 1usize..6,
            m in 0usize..4,
            seed in any::<u64>(),
        ) {
            let s = Scheme::new(k, m).unwrap();
            let frags = encode("p", s, &data).unwrap();
            // Drop m fragments chosen by the seed.
            let mut idx: Vec<usize> = (0..k + m).collect();
            let mut x = seed;
            for i in (1..idx.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (x >> 33) as usize % (i + 1));
            }
            let given: Vec<(usize, &[u8])> = idx[..k].iter().map(|&i| (i, frags[i].as_slice())).collect();
            prop_assert_eq!(decode("p", s, &given).unwrap(), data);
        }
    }
}

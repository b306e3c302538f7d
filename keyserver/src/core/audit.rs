//! The audit log: a hash chain of records plus Ed25519-signed checkpoints.
//!
//! Record encoding (the bytes that are hashed), integers big-endian:
//!
//! ```text
//! "TSA1" | seq u64 | prev_hash [32] | timestamp_ms u64
//!        | len u32 | actor | len u32 | event | len u32 | study | len u32 | detail
//! ```
//!
//! `hash = SHA-256("tessera-audit-v1" | encoding)`, and the stored value is
//! `encoding | hash`. Since each encoding holds the previous hash, editing,
//! removing or reordering any record breaks the chain from there on. Strings
//! are stored as plain UTF-8 so an operator (and the e2e test) can find a
//! record in the database file; a flipped byte in a record changes its hash.
//!
//! Truncation of the tail is caught by the signed head (rewritten at every
//! group commit) and by the checkpoints (every K records), which sign
//! `"tessera-audit-checkpoint-v1" | seq | hash`.

use sha2::{Digest, Sha256};

use crate::core::crypto::verify_signature;

/// SHA-256 output.
pub type Hash = [u8; 32];

const MAGIC: &[u8; 4] = b"TSA1";
const HASH_DOMAIN: &[u8] = b"tessera-audit-v1";
const CHECKPOINT_DOMAIN: &[u8] = b"tessera-audit-checkpoint-v1";

/// What happened. The text form is what the record stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    /// The keyserver created its first master secret.
    MasterCreated,
    /// A new master secret version was added.
    MasterRotated,
    /// The gateway registered a study.
    StudyRegistered,
    /// A trusted service derived a study key.
    KeyDerived,
    /// A derivation was refused (attributes did not match).
    DeriveRefused,
    /// A user (or the gateway for a user) requested a study key.
    KeyRequested,
    /// A key request was refused (attributes did not match).
    RequestRefused,
    /// The owner approved a request.
    GrantApproved,
    /// An approval was refused (self-approval, not the owner, decided already).
    ApprovalRefused,
    /// The owner denied a request.
    RequestDenied,
    /// A key was released to its requester.
    KeyReleased,
    /// A fetch was refused (pending, denied, expired, used up, revoked, wrong identity).
    FetchRefused,
    /// A grant was revoked.
    GrantRevoked,
    /// The gateway spent one use of a user's grant to serve that user.
    GrantRedeemed,
    /// A redemption (or a grant check by a caller other than the gateway)
    /// was refused.
    RedeemRefused,
    /// A study's key material was destroyed (crypto-shredding).
    StudyForgotten,
    /// A request to forget a study was refused.
    ForgetRefused,
    /// A study registration was refused (caller is not the gateway).
    RegisterRefused,
    /// A denial was refused (not the owner, already decided).
    DenialRefused,
    /// A revocation was refused (not the owner, not an approved grant).
    RevokeRefused,
    /// An owner added a delegate (may store studies on the owner's behalf).
    DelegateAdded,
    /// An owner removed a delegate.
    DelegateRemoved,
    /// A delegate operation was refused.
    DelegateRefused,
    /// An administrator acknowledged a broken chain (`keyserver
    /// audit-recover`); the chain verifies again from this entry.
    AuditRecovered,
    /// The authorization layer refused a caller (no admitted role, or an
    /// RPC outside the matrix) before any handler ran.
    AccessRefused,
    /// An owner created a standing approval.
    StandingCreated,
    /// An owner changed a standing approval (expiry, budget).
    StandingUpdated,
    /// An owner revoked a standing approval.
    StandingRevoked,
    /// A standing-approval operation was refused.
    StandingRefused,
    /// A break-glass attempt was refused (no permission, no reason,
    /// disabled by the owner).
    BreakGlassRefused,
    /// An owner allowed or forbade break-glass on its studies.
    BreakGlassSet,
    /// A break-glass use was marked reviewed.
    BreakGlassReviewed,
    /// A review was refused.
    ReviewRefused,
    /// An owner set its webhook URL.
    WebhookSet,
    /// An owner cleared its webhook URL.
    WebhookCleared,
    /// A webhook POST was answered 2xx.
    WebhookDelivered,
    /// A webhook was not delivered after its last try.
    WebhookFailed,
    /// A webhook was dropped unsent: the delivery queue was full.
    WebhookDropped,
}

impl AuditEvent {
    /// Stable text name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MasterCreated => "master.created",
            Self::MasterRotated => "master.rotated",
            Self::StudyRegistered => "study.registered",
            Self::KeyDerived => "key.derived",
            Self::DeriveRefused => "derive.refused",
            Self::KeyRequested => "key.requested",
            Self::RequestRefused => "request.refused",
            Self::GrantApproved => "grant.approved",
            Self::ApprovalRefused => "approval.refused",
            Self::RequestDenied => "request.denied",
            Self::KeyReleased => "key.released",
            Self::FetchRefused => "fetch.refused",
            Self::GrantRevoked => "grant.revoked",
            Self::GrantRedeemed => "grant.redeemed",
            Self::RedeemRefused => "redeem.refused",
            Self::StudyForgotten => "study.forgotten",
            Self::ForgetRefused => "forget.refused",
            Self::RegisterRefused => "register.refused",
            Self::DenialRefused => "deny.refused",
            Self::RevokeRefused => "revoke.refused",
            Self::DelegateAdded => "delegate.added",
            Self::DelegateRemoved => "delegate.removed",
            Self::DelegateRefused => "delegate.refused",
            Self::AuditRecovered => "audit.recovered",
            Self::AccessRefused => "access.refused",
            Self::StandingCreated => "standing.created",
            Self::StandingUpdated => "standing.updated",
            Self::StandingRevoked => "standing.revoked",
            Self::StandingRefused => "standing.refused",
            Self::BreakGlassRefused => "breakglass.refused",
            Self::BreakGlassSet => "breakglass.set",
            Self::BreakGlassReviewed => "breakglass.reviewed",
            Self::ReviewRefused => "review.refused",
            Self::WebhookSet => "webhook.set",
            Self::WebhookCleared => "webhook.cleared",
            Self::WebhookDelivered => "webhook.delivered",
            Self::WebhookFailed => "webhook.failed",
            Self::WebhookDropped => "webhook.dropped",
        }
    }
}

/// An entry before it is sequenced and hashed.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Caller identity.
    pub actor: String,
    /// Event.
    pub event: AuditEvent,
    /// Study id, or empty.
    pub study: String,
    /// Free-form `key=value` details; never patient data or key material.
    pub detail: String,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1-based, contiguous.
    pub seq: u64,
    /// Hash of entry `seq - 1` (zeros for the first).
    pub prev_hash: Hash,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Caller identity.
    pub actor: String,
    /// Event name.
    pub event: String,
    /// Study id or empty.
    pub study: String,
    /// Details.
    pub detail: String,
    /// This entry's hash.
    pub hash: Hash,
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes the hashed part of an entry.
pub fn encode_body(seq: u64, prev_hash: &Hash, timestamp_ms: u64, e: &NewEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.actor.len() + e.study.len() + e.detail.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(prev_hash);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    push_str(&mut out, &e.actor);
    push_str(&mut out, e.event.as_str());
    push_str(&mut out, &e.study);
    push_str(&mut out, &e.detail);
    out
}

/// Hash of an encoded body.
pub fn hash_body(body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(body);
    h.finalize().into()
}

/// Builds the stored record (`body | hash`) and returns it with its hash.
pub fn seal(seq: u64, prev_hash: &Hash, timestamp_ms: u64, e: &NewEntry) -> (Vec<u8>, Hash) {
    let mut rec = encode_body(seq, prev_hash, timestamp_ms, e);
    let hash = hash_body(&rec);
    rec.extend_from_slice(&hash);
    (rec, hash)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.u32()?).ok()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
}

/// Decodes a stored record. Does not check its hash (see [`verify_chain`]).
pub fn decode(rec: &[u8]) -> Option<AuditEntry> {
    if rec.len() < 32 {
        return None;
    }
    let (body, hash) = rec.split_at(rec.len() - 32);
    let mut r = Reader { b: body };
    if r.take(4)? != MAGIC {
        return None;
    }
    let seq = r.u64()?;
    let prev_hash: Hash = r.take(32)?.try_into().ok()?;
    let timestamp_ms = r.u64()?;
    let actor = r.string()?;
    let event = r.string()?;
    let study = r.string()?;
    let detail = r.string()?;
    if !r.b.is_empty() {
        return None;
    }
    Some(AuditEntry {
        seq,
        prev_hash,
        timestamp_ms,
        actor,
        event,
        study,
        detail,
        hash: hash.try_into().ok()?,
    })
}

/// The message a checkpoint or head signature covers.
pub fn checkpoint_message(seq: u64, hash: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 40);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

/// A signed `(seq, hash)` pair: a checkpoint or the chain head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Sequence number of the signed entry.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
    /// Ed25519 signature over [`checkpoint_message`].
    pub signature: Vec<u8>,
}

impl SignedHead {
    /// `seq | hash | signature`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.signature.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.hash);
        v.extend_from_slice(&self.signature);
        v
    }
    /// Inverse of [`SignedHead::encode`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader { b };
        let seq = r.u64()?;
        let hash = r.take(32)?.try_into().ok()?;
        Some(Self {
            seq,
            hash,
            signature: r.b.to_vec(),
        })
    }
    /// True when the signature over `(seq, hash)` verifies.
    pub fn valid(&self, public_key: &[u8]) -> bool {
        verify_signature(
            public_key,
            &checkpoint_message(self.seq, &self.hash),
            &self.signature,
        )
    }
}

/// Outcome of [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Entries read.
    pub entries: u64,
    /// First broken entry (edited, missing, reordered, unsigned tail), if any.
    pub first_broken_seq: Option<u64>,
    /// What is wrong, empty when ok.
    pub problem: String,
    /// Hash of the last entry.
    pub head_hash: Hash,
    /// Checkpoints whose signature and hash matched.
    pub checkpoints_verified: u64,
    /// Highest checkpoint seen.
    pub last_checkpoint_seq: u64,
    /// The first break before the last recovery entry (acknowledged by an
    /// administrator), if any: `(seq, problem)`.
    pub acknowledged: Option<(u64, String)>,
}

/// Where [`verify_chain`] starts and which breaks an administrator already
/// acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyFrom {
    /// First entry given (1: the whole log). From a later entry, that
    /// entry's link to its predecessor is trusted (its own hash and any
    /// checkpoint on it are checked).
    pub seq: u64,
    /// Breaks at entries below this (the last signed recovery entry) were
    /// acknowledged with `keyserver audit-recover`: reported in
    /// `acknowledged`, not failing the report.
    pub acknowledged_before: u64,
}

impl VerifyFrom {
    /// The whole log, nothing acknowledged.
    pub const START: Self = Self {
        seq: 1,
        acknowledged_before: 0,
    };
}

/// Recomputes the chain over `(key seq, stored record)` pairs in key order
/// and checks checkpoints and the signed head against it.
pub fn verify_chain<I, E>(
    records: I,
    checkpoints: &[(u64, Vec<u8>)],
    head: Option<&[u8]>,
    public_key: &[u8],
    from: VerifyFrom,
) -> Result<VerifyReport, E>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>), E>>,
{
    let mut report = VerifyReport {
        ok: true,
        entries: 0,
        first_broken_seq: None,
        problem: String::new(),
        head_hash: [0u8; 32],
        checkpoints_verified: 0,
        last_checkpoint_seq: 0,
        acknowledged: None,
    };
    let horizon = from.acknowledged_before;
    let broken = |report: &mut VerifyReport, seq: u64, why: String| {
        if seq < horizon {
            if report.acknowledged.is_none() {
                report.acknowledged = Some((seq, format!("entry {seq}: {why}")));
            }
        } else if report.first_broken_seq.is_none() {
            report.ok = false;
            report.first_broken_seq = Some(seq);
            report.problem = format!("entry {seq}: {why}");
        }
    };
    // Hash of every checkpointed seq, to compare once the chain is known.
    let mut wanted: std::collections::BTreeMap<u64, Option<SignedHead>> = checkpoints
        .iter()
        .filter(|(seq, _)| *seq >= from.seq)
        .map(|(seq, raw)| (*seq, SignedHead::decode(raw)))
        .collect();
    let start = from.seq.max(1);
    // From entry 1 the first link is all zeros; from a later entry it is
    // taken from that entry (trusted), see `VerifyFrom::seq`.
    let mut prev: Option<Hash> = (start == 1).then_some([0u8; 32]);
    let mut expected_seq = start;
    for item in records {
        let (key, raw) = item?;
        report.entries += 1;
        if key != expected_seq {
            broken(
                &mut report,
                expected_seq,
                format!("missing (next stored entry is {key})"),
            );
        }
        let Some(e) = decode(&raw) else {
            broken(&mut report, key, "undecodable record".into());
            // Keep going from the stored trailing hash, if the record is long enough.
            prev = Some(
                raw.len()
                    .checked_sub(32)
                    .and_then(|i| raw[i..].try_into().ok())
                    .unwrap_or([0u8; 32]),
            );
            expected_seq = key + 1;
            continue;
        };
        let body = &raw[..raw.len() - 32];
        if e.seq != key {
            broken(&mut report, key, format!("sequence field says {}", e.seq));
        } else if e.prev_hash != prev.unwrap_or(e.prev_hash) {
            broken(&mut report, key, "previous-hash link broken".into());
        } else if hash_body(body) != e.hash {
            broken(&mut report, key, "content does not match its hash".into());
        }
        if let Some(cp) = wanted.get_mut(&key) {
            report.last_checkpoint_seq = key;
            match cp.take() {
                Some(c) if c.hash == e.hash && c.valid(public_key) => {
                    report.checkpoints_verified += 1;
                }
                Some(_) | None => broken(&mut report, key, "checkpoint does not match".into()),
            }
        }
        prev = Some(e.hash);
        expected_seq = key + 1;
    }
    let prev = prev.unwrap_or([0u8; 32]);
    report.head_hash = prev;
    let last = expected_seq - 1;
    // A checkpoint beyond the last entry means the tail was cut off.
    if let Some((&seq, _)) = wanted.iter().find(|(_, c)| c.is_some()) {
        broken(
            &mut report,
            seq,
            "checkpointed entry is missing (log truncated)".into(),
        );
    }
    match head.map(SignedHead::decode) {
        None if last == 0 => {}
        None => broken(&mut report, 1, "signed chain head is missing".into()),
        Some(None) => broken(&mut report, last, "signed chain head is undecodable".into()),
        Some(Some(h)) => {
            if !h.valid(public_key) {
                broken(
                    &mut report,
                    h.seq.min(last).max(1),
                    "chain head signature invalid".into(),
                );
            } else if h.seq > last {
                broken(
                    &mut report,
                    last + 1,
                    format!(
                        "log truncated: signed head is entry {} but the log ends at {last}",
                        h.seq
                    ),
                );
            } else if h.seq < last {
                broken(
                    &mut report,
                    h.seq + 1,
                    "entries after the signed head".into(),
                );
            } else if h.hash != prev {
                broken(&mut report, last, "does not match the signed head".into());
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::AuditSigner;
    use ring::rand::SystemRandom;

    fn entry(i: u64) -> NewEntry {
        NewEntry {
            actor: format!("spiffe://tessera.local/user/u{i}"),
            event: AuditEvent::KeyDerived,
            study: "st-x".into(),
            detail: format!("n={i}"),
        }
    }

    struct Log {
        recs: Vec<(u64, Vec<u8>)>,
        cps: Vec<(u64, Vec<u8>)>,
        head: Vec<u8>,
        pk: Vec<u8>,
    }

    fn log(n: u64, every: u64) -> Log {
        let (s, _) = AuditSigner::generate(&SystemRandom::new()).unwrap();
        let mut prev = [0u8; 32];
        let mut recs = Vec::new();
        let mut cps = Vec::new();
        for i in 1..=n {
            let (r, h) = seal(i, &prev, 1000 + i, &entry(i));
            recs.push((i, r));
            if i % every == 0 {
                let sig = s.sign(&checkpoint_message(i, &h));
                cps.push((
                    i,
                    SignedHead {
                        seq: i,
                        hash: h,
                        signature: sig,
                    }
                    .encode(),
                ));
            }
            prev = h;
        }
        let head = SignedHead {
            seq: n,
            hash: prev,
            signature: s.sign(&checkpoint_message(n, &prev)),
        }
        .encode();
        Log {
            recs,
            cps,
            head,
            pk: s.public_key(),
        }
    }

    fn run(l: &Log) -> VerifyReport {
        verify_chain::<_, ()>(
            l.recs.iter().cloned().map(Ok),
            &l.cps,
            Some(&l.head),
            &l.pk,
            VerifyFrom::START,
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_clean_chain() {
        let (r, h) = seal(1, &[0; 32], 5, &entry(1));
        let d = decode(&r).unwrap();
        assert_eq!(d.seq, 1);
        assert_eq!(d.hash, h);
        assert_eq!(d.event, "key.derived");
        let l = log(10, 4);
        let rep = run(&l);
        assert!(rep.ok, "{rep:?}");
        assert_eq!(rep.entries, 10);
        assert_eq!(rep.checkpoints_verified, 2);
        assert_eq!(rep.last_checkpoint_seq, 8);
    }

    #[test]
    fn every_single_byte_flip_is_detected_at_its_entry() {
        let base = log(5, 2);
        let target = 3usize;
        for i in 0..base.recs[target - 1].1.len() {
            let mut l = Log {
                recs: base.recs.clone(),
                cps: base.cps.clone(),
                head: base.head.clone(),
                pk: base.pk.clone(),
            };
            l.recs[target - 1].1[i] ^= 0x01;
            let rep = run(&l);
            assert!(!rep.ok, "flip at byte {i} undetected");
            assert_eq!(
                rep.first_broken_seq,
                Some(target as u64),
                "byte {i}: {}",
                rep.problem
            );
        }
    }

    #[test]
    fn deletion_reorder_and_truncation_are_detected() {
        let mut l = log(6, 3);
        l.recs.remove(2);
        assert_eq!(run(&l).first_broken_seq, Some(3));

        let mut l = log(6, 3);
        l.recs.truncate(4);
        let rep = run(&l);
        assert!(!rep.ok);
        assert!(rep.problem.contains("truncated"), "{}", rep.problem);

        let mut l = log(6, 100);
        l.recs.truncate(5);
        let rep = run(&l);
        assert_eq!(rep.first_broken_seq, Some(6), "{}", rep.problem);

        let mut l = log(6, 3);
        let a = l.recs[1].1.clone();
        l.recs[1].1 = l.recs[2].1.clone();
        l.recs[2].1 = a;
        assert_eq!(run(&l).first_broken_seq, Some(2));
    }

    #[test]
    fn tail_verification_and_acknowledged_breaks() {
        let check = |l: &Log, seq: u64, acknowledged_before: u64| {
            verify_chain::<_, ()>(
                l.recs.iter().filter(|(k, _)| *k >= seq).cloned().map(Ok),
                &l.cps,
                Some(&l.head),
                &l.pk,
                VerifyFrom {
                    seq,
                    acknowledged_before,
                },
            )
            .unwrap()
        };
        let mut l = log(10, 4);
        l.recs[8].1[60] ^= 1;
        assert_eq!(check(&l, 8, 0).first_broken_seq, Some(9));
        let mut l = log(10, 4);
        l.recs[7].1[60] ^= 1;
        assert_eq!(
            check(&l, 8, 0).first_broken_seq,
            Some(8),
            "the checkpointed entry itself"
        );
        let mut l = log(10, 4);
        l.recs[1].1[60] ^= 1;
        assert!(
            check(&l, 8, 0).ok,
            "the tail check starts at the last checkpoint"
        );
        assert_eq!(run(&l).first_broken_seq, Some(2));
        let rep = check(&l, 1, 5);
        assert!(rep.ok, "{rep:?}");
        assert_eq!(rep.acknowledged.map(|a| a.0), Some(2));
        assert!(
            !check(&l, 1, 2).ok,
            "a break at the horizon is not acknowledged"
        );
    }

    #[test]
    fn forged_head_is_detected() {
        let mut l = log(4, 100);
        let other = log(4, 100);
        l.head = other.head;
        assert!(!run(&l).ok);
    }

    #[test]
    fn empty_log_is_ok() {
        let rep =
            verify_chain::<_, ()>(Vec::new(), &[], None, &[0u8; 32], VerifyFrom::START).unwrap();
        assert!(rep.ok);
        assert_eq!(rep.entries, 0);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = SignedHead::decode(&bytes);
        }

        #[test]
        fn verifying_arbitrary_records_never_panics(
            recs in proptest::collection::vec((0u64..10, proptest::collection::vec(any::<u8>(), 0..120)), 0..8),
            head in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let cps: Vec<(u64, Vec<u8>)> = recs.iter().take(2).cloned().collect();
            let rep = verify_chain::<_, ()>(recs.into_iter().map(Ok), &cps, Some(&head), &[0u8; 32], VerifyFrom::START).unwrap();
            prop_assert!(rep.ok || rep.first_broken_seq.is_some());
        }

        #[test]
        fn encode_decode_round_trip(seq in 1u64.., ts in any::<u64>(), actor in ".{0,40}", detail in ".{0,80}") {
            let e = NewEntry { actor: actor.clone(), event: AuditEvent::KeyReleased, study: "st-x".into(), detail: detail.clone() };
            let (rec, hash) = seal(seq, &[3u8; 32], ts, &e);
            let d = decode(&rec).unwrap();
            prop_assert_eq!(d.seq, seq);
            prop_assert_eq!(d.timestamp_ms, ts);
            prop_assert_eq!(d.actor, actor);
            prop_assert_eq!(d.detail, detail);
            prop_assert_eq!(d.hash, hash);
            prop_assert_eq!(hash_body(&rec[..rec.len() - 32]), hash);
        }
    }
}

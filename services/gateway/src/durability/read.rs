//! The hedged read: an object whole from its node, or rebuilt from `k`
//! verified fragments, asking one more node at once for each unusable
//! fragment and one more each `hedge_after_ms` while k are not in.

use std::sync::atomic::Ordering::Relaxed;

use tessera_erasure::Scheme;

use super::counters::FragmentProblem;
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};
use crate::upstream;
use crate::vault::{FragmentPlacement, SharePlacement};

/// Milliseconds a read waits for its k fragments before asking one more
/// node, when the config does not say (`[erasure] hedge_after_ms`).
const DEFAULT_HEDGE_AFTER_MS: u64 = 250;

/// A fetched object: its SHA-256 as the node computed it, and its bytes.
type Fetched = (Vec<u8>, Vec<u8>);

impl GatewayService {
    /// Reads one object: whole from its node, or rebuilt from `k` verified
    /// fragments. Returns the bytes and the fragments it could not use.
    /// `thorough` (Verify) fetches and checks every fragment, so every
    /// missing or corrupt one is named; otherwise only what is needed.
    pub(crate) async fn read_object(
        &self,
        p: &SharePlacement,
        limit: u64,
        thorough: bool,
    ) -> Result<(Vec<u8>, Vec<FragmentProblem>)> {
        let Some(rec) = &p.erasure else {
            let node = self.inner.up.node(&p.node)?.clone();
            let (sha, data) = upstream::get_object(&node, &p.object_id, limit).await?;
            if hex::encode(sha) != p.sha256 {
                tracing::warn!(object = %p.object_id, node = %p.node, share = p.share, "object differs from the stored one");
            }
            return Ok((data, Vec::new()));
        };
        let scheme = Scheme {
            k: rec.k as usize,
            m: rec.m as usize,
        };
        let frag_limit = scheme.shard_len(limit) as u64 + 1024;
        let hedge_after = std::time::Duration::from_millis(
            self.inner
                .limits
                .erasure
                .map_or(DEFAULT_HEDGE_AFTER_MS, |e| e.hedge_after_ms),
        );
        let mut problems = Vec::new();
        let mut good: Vec<(usize, Vec<u8>)> = Vec::new();
        // Preferred: the data fragments (no decoding work), then parity.
        let mut order: Vec<&FragmentPlacement> = rec.fragments.iter().collect();
        order.sort_by_key(|f| (f.missing, f.index));
        let problem = |f: &FragmentPlacement, kind: &'static str, detail: String| FragmentProblem {
            object_id: p.object_id.clone(),
            index: f.index,
            node: f.node.clone(),
            kind,
            detail,
        };
        // Each task answers with its position in `order`.
        let mut tasks: tokio::task::JoinSet<(usize, Result<Fetched>)> = tokio::task::JoinSet::new();
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Starts the next fetchable fragment; false when none is left.
        let launch = |tasks: &mut tokio::task::JoinSet<_>, problems: &mut Vec<FragmentProblem>| {
            while next.load(Relaxed) < order.len() {
                let pos = next.fetch_add(1, Relaxed);
                let f = order[pos];
                if f.missing {
                    problems.push(problem(f, "missing", "not written at store".into()));
                    continue;
                }
                let Ok(node) = self.inner.up.node(&f.node).cloned() else {
                    problems.push(problem(f, "unreachable", "not a configured node".into()));
                    continue;
                };
                let id = f.object_id.clone();
                tasks.spawn(tracing::Instrument::in_current_span(async move {
                    (pos, upstream::get_object(&node, &id, frag_limit).await)
                }));
                return true;
            }
            false
        };
        let wanted = if thorough { order.len() } else { scheme.k };
        for _ in 0..wanted {
            if !launch(&mut tasks, &mut problems) {
                break;
            }
        }
        let hedge = tokio::time::sleep(hedge_after);
        tokio::pin!(hedge);
        let mut hedged = 0usize;
        while thorough || good.len() < scheme.k {
            if tasks.is_empty() {
                // Every started fetch answered and k are not good yet.
                if !launch(&mut tasks, &mut problems) {
                    break;
                }
                continue;
            }
            tokio::select! {
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { continue };
                    let (pos, r) = match joined {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(object = %p.object_id, error = %e, "fragment fetch task failed");
                            continue;
                        }
                    };
                    let f = order[pos];
                    let usable = match r {
                        Ok((sha, data)) if hex::encode(&sha) == f.sha256 => {
                            good.push((f.index as usize, data));
                            true
                        }
                        Ok(_) => {
                            problems.push(problem(f, "corrupt", "SHA-256 differs from the one recorded at store".into()));
                            false
                        }
                        Err(e) => {
                            let code = e.code();
                            let kind = if code == tonic::Code::NotFound {
                                "missing"
                            } else if code == tonic::Code::DataLoss {
                                "corrupt"
                            } else {
                                "unreachable"
                            };
                            problems.push(problem(f, kind, e.to_string()));
                            false
                        }
                    };
                    // An unusable fragment is replaced by the next at once.
                    if !usable && !thorough && good.len() + tasks.len() < scheme.k {
                        launch(&mut tasks, &mut problems);
                    }
                }
                () = &mut hedge, if !thorough && next.load(Relaxed) < order.len() => {
                    if launch(&mut tasks, &mut problems) {
                        hedged += 1;
                    }
                    hedge.as_mut().reset(tokio::time::Instant::now() + hedge_after);
                }
            }
        }
        // Fetches still running (slow nodes a hedge overtook) are dropped.
        tasks.abort_all();
        if hedged > 0 {
            tracing::info!(object = %p.object_id, hedged, "read hedged to further fragments (slow nodes)");
        }
        for pr in &problems {
            tracing::warn!(object = %pr.object_id, fragment = pr.index, node = %pr.node, kind = pr.kind, detail = %pr.detail, "fragment unusable; queued for repair");
        }
        if good.len() < scheme.k {
            let named: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            return Err(GatewayError::DataLoss(format!(
                "{}: {} of the {} fragments needed are usable: {}",
                p.object_id,
                good.len(),
                scheme.k,
                named.join("; ")
            )));
        }
        let object_id = p.object_id.clone();
        good.sort_by_key(|(i, _)| *i);
        good.truncate(scheme.k);
        // The fragments name the object's SHA-256 and decode checks the
        // rebuilt bytes against it: it must be the digest the vault
        // recorded at store (no second hashing pass here).
        let named = tessera_erasure::parse(&good[0].1)
            .map(|(h, _)| hex::encode(h.object_sha256))
            .unwrap_or_default();
        if named != p.sha256 {
            return Err(GatewayError::DataLoss(format!(
                "{}: the fragments describe another object than the one stored",
                p.object_id
            )));
        }
        let data = tokio::task::spawn_blocking(move || {
            let given: Vec<(usize, &[u8])> = good.iter().map(|(i, d)| (*i, d.as_slice())).collect();
            tessera_erasure::decode(&object_id, scheme, &given)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("decode task: {e}")))?
        .map_err(|e| GatewayError::DataLoss(format!("{}: {e}", p.object_id)))?;
        Ok((data, problems))
    }
}

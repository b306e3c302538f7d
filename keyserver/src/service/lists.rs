//! Every list RPC pages (issue 20): at most `page_size` entries (1..=500,
//! 0 means 100) and never more than the message limit allows, with a token
//! that names the last entry listed. A list is read whole from the core,
//! in its listing order, and cut here.

use tessera_proto::keyserver::v1 as pb;
use tonic::Status;

use super::convert::{key_request, standing};
use super::{KeyServerService, MAX_MESSAGE_BYTES};

/// What a page's entries may take together: the message limit less room
/// for the token and a margin.
const PAGE_BUDGET: usize = MAX_MESSAGE_BYTES - 1024;

/// `page_size` of a listing: 1..=500, 0 means 100.
pub(super) fn page_size(n: u32) -> Result<usize, Status> {
    match n {
        0 => Ok(100),
        n @ 1..=500 => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "page_size {n}: at most 500 (0 means 100)"
        ))),
    }
}

fn bad_token() -> Status {
    Status::invalid_argument("page_token: not a token this keyserver gave")
}

/// A token `<unix seconds>:<id>` (`id` starting with `prefix`).
fn time_token(token: &str, prefix: &str) -> Result<Option<(u64, String)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let (at, id) = token.split_once(':').ok_or_else(bad_token)?;
    if id.is_empty() || !id.starts_with(prefix) {
        return Err(bad_token());
    }
    Ok(Some((
        at.parse::<u64>().map_err(|_| bad_token())?,
        id.to_owned(),
    )))
}

fn time_key_token((at, id): &(u64, String)) -> String {
    format!("{at}:{id}")
}

/// One page of `items` (in listing order, each with its key): the ones
/// `after` admits (those past the token), at most `size` of them and at
/// most [`PAGE_BUDGET`] encoded bytes; with the last key when more follow.
/// An entry alone over the budget is RESOURCE_EXHAUSTED (never a silently
/// short listing).
pub(super) fn page<K, T: prost::Message>(
    items: impl IntoIterator<Item = (K, T)>,
    after: impl Fn(&K) -> bool,
    size: usize,
) -> Result<(Vec<T>, Option<K>), Status> {
    let mut out = Vec::new();
    let mut budget = PAGE_BUDGET;
    let mut last: Option<K> = None;
    for (key, item) in items.into_iter().filter(|(k, _)| after(k)) {
        // A field's tag and length prefix: a few bytes.
        let len = item.encoded_len() + 8;
        if out.is_empty() && len > budget {
            return Err(Status::resource_exhausted(format!(
                "an entry of {len} bytes is over the page limit of {PAGE_BUDGET} bytes"
            )));
        }
        if out.len() == size || len > budget {
            return Ok((out, last));
        }
        budget -= len;
        last = Some(key);
        out.push(item);
    }
    Ok((out, None))
}

impl KeyServerService {
    pub(super) async fn requests_page(
        &self,
        actor: String,
        m: pb::ListRequestsRequest,
    ) -> Result<pb::ListRequestsResponse, Status> {
        let size = page_size(m.page_size)?;
        let after = time_token(&m.page_token, "rq-")?;
        let list = self
            .core
            .list_requests(&actor, &m.study_id, m.include_decided)
            .await?;
        let (requests, next) = page(
            list.into_iter()
                .map(|r| ((r.created_at, r.id.clone()), key_request(r))),
            |k| after.as_ref().is_none_or(|a| k > a),
            size,
        )?;
        Ok(pb::ListRequestsResponse {
            requests,
            next_page_token: next.as_ref().map(time_key_token).unwrap_or_default(),
        })
    }

    pub(super) async fn grants_page(
        &self,
        actor: String,
        m: pb::ListGrantsRequest,
    ) -> Result<pb::ListGrantsResponse, Status> {
        let size = page_size(m.page_size)?;
        let after = time_token(&m.page_token, "rq-")?;
        let core = self.core.clone();
        let list = tokio::task::spawn_blocking(move || {
            core.list_grants(&actor, m.as_owner, m.include_spent)
        })
        .await
        .map_err(|_| Status::internal("internal error"))??;
        let (grants, next) = page(
            list.into_iter().map(|g| {
                let key = (g.request.created_at, g.request.id.clone());
                let grant = pb::Grant {
                    request: Some(key_request(g.request)),
                    valid: g.valid,
                    expiring_soon: g.expiring_soon,
                    seconds_left: g.seconds_left,
                };
                (key, grant)
            }),
            |k| after.as_ref().is_none_or(|a| k > a),
            size,
        )?;
        Ok(pb::ListGrantsResponse {
            grants,
            next_page_token: next.as_ref().map(time_key_token).unwrap_or_default(),
        })
    }

    pub(super) async fn delegates_page(
        &self,
        actor: String,
        m: pb::ListDelegatesRequest,
    ) -> Result<pb::ListDelegatesResponse, Status> {
        let size = page_size(m.page_size)?;
        let core = self.core.clone();
        let list = tokio::task::spawn_blocking(move || core.list_delegates(&actor))
            .await
            .map_err(|_| Status::internal("internal error"))??;
        // The token is the last delegate listed (the list is in identity
        // order).
        let after = m.page_token;
        let (delegates, next) = page(
            list.into_iter().map(|d| (d.clone(), d)),
            |d: &String| after.is_empty() || *d > after,
            size,
        )?;
        Ok(pb::ListDelegatesResponse {
            delegates,
            next_page_token: next.unwrap_or_default(),
        })
    }

    pub(super) async fn found_grants_page(
        &self,
        actor: String,
        m: pb::FindGrantsRequest,
    ) -> Result<pb::FindGrantsResponse, Status> {
        let size = page_size(m.page_size)?;
        let after = time_token(&m.page_token, "rq-")?;
        let list = self
            .core
            .find_grants(&actor, &m.on_behalf_of, &m.study_id)
            .await?;
        let (grants, next) = page(
            list.into_iter().map(|g| {
                let key = (g.expires_at, g.request_id.clone());
                let found = pb::FoundGrant {
                    request_id: g.request_id,
                    study_id: g.study_id,
                    purpose: g.purpose,
                    expires_at_unix: g.expires_at,
                    uses_left: g.uses_left,
                };
                (key, found)
            }),
            |k| after.as_ref().is_none_or(|a| k > a),
            size,
        )?;
        Ok(pb::FindGrantsResponse {
            grants,
            next_page_token: next.as_ref().map(time_key_token).unwrap_or_default(),
        })
    }

    pub(super) async fn standing_page(
        &self,
        actor: String,
        m: pb::ListStandingApprovalsRequest,
    ) -> Result<pb::ListStandingApprovalsResponse, Status> {
        let size = page_size(m.page_size)?;
        let after = time_token(&m.page_token, "sa-")?;
        let core = self.core.clone();
        let list =
            tokio::task::spawn_blocking(move || core.list_standing(&actor, m.include_inactive))
                .await
                .map_err(|_| Status::internal("internal error"))??;
        // Oldest first.
        let (approvals, next) = page(
            list.into_iter()
                .map(|sa| ((sa.created_at, sa.id.clone()), standing(sa))),
            |k| after.as_ref().is_none_or(|a| k > a),
            size,
        )?;
        Ok(pb::ListStandingApprovalsResponse {
            approvals,
            next_page_token: next.as_ref().map(time_key_token).unwrap_or_default(),
        })
    }

    pub(super) async fn break_glass_page(
        &self,
        actor: String,
        admin: bool,
        m: pb::ListBreakGlassRequest,
    ) -> Result<pb::ListBreakGlassResponse, Status> {
        let size = page_size(m.page_size)?;
        let after = time_token(&m.page_token, "rq-")?;
        let core = self.core.clone();
        let list = tokio::task::spawn_blocking(move || {
            core.list_break_glass(&actor, admin, m.include_reviewed)
        })
        .await
        .map_err(|_| Status::internal("internal error"))??;
        // Newest first: a later page holds the keys below the token.
        let (requests, next) = page(
            list.into_iter()
                .map(|r| ((r.created_at, r.id.clone()), key_request(r))),
            |k| after.as_ref().is_none_or(|a| k < a),
            size,
        )?;
        Ok(pb::ListBreakGlassResponse {
            requests,
            next_page_token: next.as_ref().map(time_key_token).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_by_count_and_by_size_and_resumes_after_the_token() {
        let items: Vec<(u32, String)> = (0..10).map(|i| (i, format!("item-{i}"))).collect();
        let (p, next) = page(items.clone(), |_| true, 4).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(next, Some(3));
        let (p, next) = page(items.clone(), |k| *k > 3, 4).unwrap();
        assert_eq!(p[0], "item-4");
        assert_eq!(next, Some(7));
        let (p, next) = page(items.clone(), |k| *k > 7, 4).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(next, None);
        // By size: entries of 10 KiB, six fit in 63 KiB.
        let big: Vec<(u32, String)> = (0..20).map(|i| (i, "x".repeat(10 * 1024))).collect();
        let (p, next) = page(big, |_| true, 500).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(next, Some(5));
        // One entry over a page: refused, not an empty last page.
        let huge = vec![(0u32, "x".repeat(MAX_MESSAGE_BYTES))];
        let e = page(huge, |_| true, 500).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn tokens_are_checked() {
        assert!(time_token("", "rq-").unwrap().is_none());
        assert_eq!(
            time_token("12:rq-a", "rq-").unwrap(),
            Some((12, "rq-a".into()))
        );
        for bad in ["12", "x:rq-a", "12:sa-1", "12:"] {
            assert!(time_token(bad, "rq-").is_err(), "{bad}");
        }
        assert!(page_size(501).is_err());
        assert_eq!(page_size(0).unwrap(), 100);
    }
}

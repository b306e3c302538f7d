//! Listing a node's objects page by page (issue 13, issue 20): the node
//! answers at most `limit` objects a call (its own cap: 1000, far below the
//! message limit) and an id to continue after; [`ObjectPages`] follows
//! those ids so no caller stops at the first page.

use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_tls::Channel;
use tonic::Status;

/// The pages of a listing, in id order.
pub struct ObjectPages<'a> {
    client: &'a mut StorageNodeClient<Channel>,
    prefix: String,
    limit: u32,
    /// Where the next page starts (`None`: the listing is done).
    next: Option<String>,
}

/// The objects whose ids start with `prefix` (empty: all), `limit` per
/// page (0: the node's default).
pub fn list_pages<'a>(
    client: &'a mut StorageNodeClient<Channel>,
    prefix: &str,
    limit: u32,
) -> ObjectPages<'a> {
    ObjectPages {
        client,
        prefix: prefix.to_owned(),
        limit,
        next: Some(String::new()),
    }
}

impl ObjectPages<'_> {
    /// The next page, or `None` after the last.
    pub async fn next_page(&mut self) -> Result<Option<Vec<pb::ObjectInfo>>, Status> {
        let Some(start_after) = self.next.take() else {
            return Ok(None);
        };
        let page = self
            .client
            .list(pb::ListRequest {
                prefix: self.prefix.clone(),
                start_after: start_after.clone(),
                limit: self.limit,
            })
            .await?
            .into_inner();
        if !page.next_start_after.is_empty() {
            // A node that does not move forward would loop for ever.
            if page.next_start_after <= start_after {
                return Err(Status::internal(format!(
                    "List: the node answered next_start_after {:?}, not after {start_after:?}",
                    page.next_start_after
                )));
            }
            self.next = Some(page.next_start_after);
        }
        Ok(Some(page.objects))
    }
}

/// Every object whose id starts with `prefix`, following every page.
pub async fn list_all(
    client: &mut StorageNodeClient<Channel>,
    prefix: &str,
) -> Result<Vec<pb::ObjectInfo>, Status> {
    let mut pages = list_pages(client, prefix, 0);
    let mut out = Vec::new();
    while let Some(page) = pages.next_page().await? {
        out.extend(page);
    }
    Ok(out)
}

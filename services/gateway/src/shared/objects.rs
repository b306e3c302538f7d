//! Object I/O shared by every flow: put a study's or instance's objects on
//! their chosen nodes in parallel (whole, or erasure-coded fragments), and
//! fetch them back (rebuilding fragments, reporting the damaged ones).

use tonic::Status;

use crate::durability::counters::FragmentProblem;
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};
use crate::vault::{SharePlacement, StudyRecord};

impl GatewayService {
    /// Puts `data[i]` as `placements[i]` in parallel and records each
    /// object's size and SHA-256 as the node confirmed them (erasure-coded
    /// objects: every fragment, acknowledged at the write quorum).
    pub(crate) async fn put_objects(
        &self,
        placements: &mut [SharePlacement],
        data: Vec<Vec<u8>>,
    ) -> Result<()> {
        let up = &self.inner.up;
        let mut puts = Vec::with_capacity(placements.len());
        for (p, data) in placements.iter().zip(data) {
            let this = self.clone();
            let mut p = p.clone();
            if p.erasure.is_some() {
                puts.push(crate::upstream::spawn_traced(async move {
                    this.put_fragments(&mut p, data).await?;
                    Ok::<_, GatewayError>(p)
                }));
                continue;
            }
            let node = up.node(&p.node)?.clone();
            puts.push(crate::upstream::spawn_traced(async move {
                let mut c = node.client.clone();
                // The node answers with the SHA-256 it verified against the
                // one the client sent: record that, no second pass here.
                // Sent as it is read: the share is not copied whole again.
                let len = data.len() as u64;
                let r = tessera_storage_client::put_object_owned(&mut c, &p.object_id, data)
                    .await
                    .map_err(|s| node.err(s))?;
                let info = r.info.unwrap_or_default();
                if info.size != len || info.sha256.len() != 32 {
                    return Err(node.err(Status::internal(
                        "put: the node answered without the object's size and SHA-256",
                    )));
                }
                p.size = info.size;
                p.sha256 = hex::encode(info.sha256);
                Ok(p)
            }));
        }
        let mut first_err = None;
        for (i, t) in puts.into_iter().enumerate() {
            match t.await {
                Ok(Ok(p)) => placements[i] = p,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(GatewayError::Internal(format!("put task: {e}")));
                }
            }
        }
        match first_err {
            Some(e) => {
                up.forget_probe();
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Fetches both shares in parallel. A stopped node is UNAVAILABLE naming
    /// it. A share whose bytes differ from what was stored is still passed
    /// on: the watermark check localizes the damage.
    pub(crate) async fn fetch_shares(&self, rec: &StudyRecord) -> Result<Vec<Vec<u8>>> {
        let limit = rec.spec.to_spec().byte_len() as u64 * 2 + (1 << 20);
        self.fetch_objects(&rec.study_id, &rec.placements, limit)
            .await
    }

    /// Fetches objects in parallel (each at most `limit` bytes).
    pub(crate) async fn fetch_objects(
        &self,
        label: &str,
        placements: &[SharePlacement],
        limit: u64,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .fetch_objects_reported(label, placements, limit, false)
            .await?
            .0)
    }

    /// [`Self::fetch_objects`], also naming the erasure-coded fragments that
    /// were missing, unreachable or corrupt (rebuilt from the others).
    pub(crate) async fn fetch_objects_reported(
        &self,
        label: &str,
        placements: &[SharePlacement],
        limit: u64,
        thorough: bool,
    ) -> Result<(Vec<Vec<u8>>, Vec<FragmentProblem>)> {
        let mut tasks = Vec::with_capacity(placements.len());
        for p in placements {
            let this = self.clone();
            let p = p.clone();
            tasks.push(crate::upstream::spawn_traced(async move {
                this.read_object(&p, limit, thorough).await
            }));
        }
        let mut objects = Vec::with_capacity(tasks.len());
        let mut problems = Vec::new();
        for t in tasks {
            let (data, mut pr) = t
                .await
                .map_err(|e| GatewayError::Internal(format!("fetch task ({label}): {e}")))??;
            objects.push(data);
            problems.append(&mut pr);
        }
        Ok((objects, problems))
    }
}

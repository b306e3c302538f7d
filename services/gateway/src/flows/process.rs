//! Region-wise processing across the storage nodes (paper 000): restore the
//! study, segment it (GA-ES at the segmentation service, N at most the
//! number of healthy nodes), send each region's fragment (its blocks plus
//! the operation's halo, nothing else) to a distinct node, merge the
//! processed cores. Histogram equalization is global: the gateway, which
//! holds the whole image, adds the fragments' histograms and sends the one
//! mapping with every fragment.

use sha2::{Digest, Sha256};
use tessera_image::Image;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::segmentation::v1 as segpb;
use tessera_segment::{FragmentOutput, Operation};
use tonic::Status;

use crate::convert::{self, check_handle, check_request_id};
use crate::error::GatewayError;
use crate::shared::{BoxStream, GatewayService, Result};
use crate::upstream::Node;

/// Default block edge of the segmentation.
const DEFAULT_BLOCK: u32 = 16;

impl From<tessera_wire::WireError> for GatewayError {
    fn from(e: tessera_wire::WireError) -> Self {
        match e {
            tessera_wire::WireError::Invalid(m) => GatewayError::InvalidArgument(m),
            tessera_wire::WireError::TooLarge(m) => GatewayError::TooLarge(m),
            tessera_wire::WireError::Internal(m) => GatewayError::Internal(m),
        }
    }
}

impl GatewayService {
    pub(crate) async fn process_inner(
        &self,
        caller: String,
        r: pb::ProcessRequest,
    ) -> Result<BoxStream<pb::ProcessResponse>> {
        check_handle("study_handle", &r.study_handle)?;
        check_request_id("key_request_id", &r.key_request_id)?;
        let op = tessera_wire::convert::operation_from_proto("operation", r.operation)?;
        let block_size = if r.block_size == 0 {
            DEFAULT_BLOCK
        } else {
            r.block_size
        };
        let rec = self.committed_image(&r.study_handle).await?;
        let spec = rec.spec.to_spec();
        if block_size > spec.width.min(spec.height) {
            return Err(GatewayError::InvalidArgument(format!(
                "block_size: {block_size} is larger than the image ({}x{})",
                spec.width, spec.height
            )));
        }
        self.check_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        // Process also holds the fragments (halos overlap): charge twice.
        let _permit = self.job_permit(spec.byte_len() as u64 * 2).await?;

        // The nodes that will process: the healthy ones, in a per-study
        // order so regions spread over the clouds.
        let (healthy, problems) = self.inner.up.probe().await;
        if healthy.is_empty() {
            return Err(GatewayError::Unavailable(format!(
                "no storage node can process: {}",
                problems.join("; ")
            )));
        }
        let nodes: Vec<Node> = healthy
            .iter()
            .map(|h| self.inner.up.nodes[h.index].clone())
            .collect();

        let shares = self.fetch_shares(&rec).await?;
        let (report, pixels) = self.restore(&rec, shares).await?;
        let image = Image::from_le_bytes(spec, &pixels)
            .map_err(|e| GatewayError::Internal(format!("restored image: {e}")))?;

        // Segment.
        let start = segpb::SegmentStart {
            spec: Some(tessera_wire::convert::segmentation::spec_to_proto(&spec)),
            block_size,
            max_regions: nodes.len().min(tessera_wire::MAX_REGIONS as usize) as u32,
            regions: None,
            operation: tessera_wire::convert::operation_to_proto(op).into(),
            seed: r.seed,
        };
        let seg = |s: Status| GatewayError::upstream("segmentation", s);
        let stream = self
            .inner
            .up
            .segmentation
            .clone()
            .segment(tokio_stream::iter(tessera_wire::segment::segment_requests(
                start, pixels,
            )))
            .await
            .map_err(seg)?
            .into_inner();
        // Samples (halos overlap) plus per-block and per-tile bookkeeping.
        let blocks = u64::from(spec.width.div_ceil(block_size))
            * u64::from(spec.height.div_ceil(block_size));
        let budget = (spec.byte_len() as u64)
            .saturating_mul(4)
            .saturating_add(blocks.saturating_mul(60));
        let decoded = tessera_wire::segment::decode_segment(stream, spec, budget)
            .await
            .map_err(seg)?;
        drop(image);

        // Histogram equalization: one global mapping from all fragments.
        let mapping = match op {
            Operation::HistEq => Some(
                tessera_wire::process::histeq_mapping(&spec, &decoded.fragments)
                    .map_err(|e| GatewayError::Internal(format!("histogram mapping: {e}")))?,
            ),
            Operation::Gaussian | Operation::Median | Operation::Unsharp | Operation::Sobel => None,
        };

        // Each fragment to its own node, all at once.
        let mut work = Vec::with_capacity(decoded.fragments.len());
        let mut tasks = Vec::with_capacity(decoded.fragments.len());
        for (i, fragment) in decoded.fragments.into_iter().enumerate() {
            let node = nodes[i % nodes.len()].clone();
            work.push(pb::RegionWork {
                region: u32::from(fragment.region),
                node: node.name.clone(),
                blocks: fragment.blocks.len() as u32,
                samples_sent: fragment.tiles.iter().map(|t| t.samples.len() as u64).sum(),
            });
            let mapping = mapping.clone();
            tasks.push(crate::upstream::spawn_traced(async move {
                let mut c = node.client.clone();
                tessera_storage_client::process_fragment(&mut c, &fragment, op, mapping.as_ref())
                    .await
                    .map_err(|s| node.err(s))
            }));
        }
        let mut outputs: Vec<FragmentOutput> = Vec::with_capacity(tasks.len());
        for t in tasks {
            outputs.push(
                t.await
                    .map_err(|e| GatewayError::Internal(format!("process task: {e}")))??,
            );
        }
        let merged = tokio::task::spawn_blocking(move || tessera_segment::merge(&spec, &outputs))
            .await
            .map_err(|e| GatewayError::Internal(format!("merge task: {e}")))?
            .map_err(|e| {
                GatewayError::upstream(
                    "storage nodes",
                    Status::internal(format!("processed fragments do not merge: {e}")),
                )
            })?;
        let out = merged.to_le_bytes();
        self.redeem_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        tracing::info!(study = %rec.study_id, ?op, regions = work.len(), "processed region-wise");
        let header = pb::ProcessHeader {
            spec: Some(convert::spec_to_proto(&spec)),
            regions: decoded.summary.regions,
            work,
            report: Some(report),
            pixels_sha256: Sha256::digest(&out).to_vec(),
        };
        let mut msgs = vec![Ok(pb::ProcessResponse {
            part: Some(pb::process_response::Part::Header(header)),
        })];
        msgs.extend(convert::chunks(&out).map(|c| {
            Ok(pb::ProcessResponse {
                part: Some(pb::process_response::Part::Chunk(c)),
            })
        }));
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }
}

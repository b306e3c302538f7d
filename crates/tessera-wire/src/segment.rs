//! `tessera.segmentation.v1.Segmentation/Segment`: the request as messages,
//! fragments as response messages (the service's side), and the response
//! stream decoded back into a [`RegionMap`] and [`Fragment`]s (the
//! gateway's side).

use std::borrow::Borrow;

use tessera_image::ImageSpec;
use tessera_proto::segmentation::v1 as pb;
use tessera_proto::segmentation::v1::segment_response::Msg;
use tessera_segment::fragment::MAX_HALO;
use tessera_segment::{BlockGrid, Fragment, RegionMap, Segmentation};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::fragment::{FragmentBody, FragmentBuilder, FragmentPart, SampleCost, fragment_header};
use crate::{CHUNK_BYTES, MAX_BLOCKS, MAX_REGIONS, WireError, invalid};

/// The Segment request: `start`, then the pixel bytes (little-endian words,
/// exactly `start.spec`'s byte length) in chunks of at most
/// [`CHUNK_BYTES`], cut lazily.
pub fn segment_requests<P>(
    start: pb::SegmentStart,
    pixels: P,
) -> impl Iterator<Item = pb::SegmentRequest> + Send + 'static
where
    P: AsRef<[u8]> + Send + 'static,
{
    use pb::segment_request::Msg as Req;
    let n = pixels.as_ref().len();
    let first = pb::SegmentRequest {
        msg: Some(Req::Start(start)),
    };
    std::iter::once(first).chain(
        (0..n)
            .step_by(CHUNK_BYTES)
            .map(move |i| pb::SegmentRequest {
                msg: Some(Req::Pixels(
                    pixels.as_ref()[i..n.min(i + CHUNK_BYTES)].to_vec(),
                )),
            }),
    )
}

/// A region map as the summary carries it (one byte per block).
pub fn region_map_to_proto(map: &RegionMap) -> pb::RegionMap {
    pb::RegionMap {
        width: map.grid.width,
        height: map.grid.height,
        block_size: map.grid.block_size,
        cols: map.grid.cols(),
        rows: map.grid.rows(),
        regions: u32::from(map.regions),
        // Region ids are < MAX_REGIONS (16): one byte each.
        assignment: map.assignment.iter().map(|&r| r as u8).collect(),
    }
}

/// Checks a region map against the image it must describe: same size, a
/// valid grid of at most [`MAX_BLOCKS`] blocks whose `cols`/`rows` match,
/// 1..=[`MAX_REGIONS`] regions, one id below `regions` per block.
pub fn region_map_from_proto(
    field: &str,
    m: pb::RegionMap,
    spec: &ImageSpec,
) -> Result<RegionMap, WireError> {
    if (m.width, m.height) != (spec.width, spec.height) {
        return Err(invalid(format!(
            "{field}: {}x{} map for a {}x{} image",
            m.width, m.height, spec.width, spec.height
        )));
    }
    let grid = BlockGrid::new(m.width, m.height, m.block_size)
        .map_err(|e| invalid(format!("{field}.block_size {}: {e}", m.block_size)))?;
    if grid.len() as u64 > MAX_BLOCKS || (m.cols, m.rows) != (grid.cols(), grid.rows()) {
        return Err(invalid(format!(
            "{field}: {}x{} blocks declared, the grid has {}x{} (at most {MAX_BLOCKS} blocks)",
            m.cols,
            m.rows,
            grid.cols(),
            grid.rows()
        )));
    }
    if m.regions == 0 || m.regions > MAX_REGIONS {
        return Err(invalid(format!(
            "{field}.regions must be 1..={MAX_REGIONS}, got {}",
            m.regions
        )));
    }
    if m.assignment.len() != grid.len() {
        return Err(invalid(format!(
            "{field}.assignment: {} entries for {} blocks",
            m.assignment.len(),
            grid.len()
        )));
    }
    let assignment: Vec<u16> = m.assignment.iter().map(|&r| u16::from(r)).collect();
    RegionMap::new(grid, m.regions as u16, assignment).map_err(|e| invalid(format!("{field}: {e}")))
}

/// One fragment as Segment response messages: its header, its block list
/// in chunks, then every tile's header followed by its samples in chunks of
/// at most [`CHUNK_BYTES`]. Lazy: chunks are encoded as the stream is read.
pub fn fragment_messages<F>(f: F) -> impl Iterator<Item = pb::SegmentResponse> + Send
where
    F: Borrow<Fragment> + Send,
{
    let header = pb::SegmentResponse {
        msg: Some(Msg::Fragment(fragment_header(f.borrow()))),
    };
    std::iter::once(header).chain(FragmentBody::new(f).map(|p| pb::SegmentResponse {
        msg: Some(match p {
            FragmentPart::Blocks(b) => Msg::Blocks(b),
            FragmentPart::Tile(t) => Msg::Tile(t),
            FragmentPart::Samples(s) => Msg::Samples(s),
        }),
    }))
}

/// A decoded Segment response.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedSegmentation {
    /// N, thresholds, fitness, search effort, halo, fragment count.
    /// `region_map` is moved out into [`Self::region_map`] (it is `None`
    /// here).
    pub summary: pb::Summary,
    pub region_map: RegionMap,
    /// One per non-empty region, in region order; each valid, holding
    /// exactly its region's blocks (per the map) and the summary's halo.
    pub fragments: Vec<Fragment>,
}

/// Decodes a Segment response stream one message at a time.
///
/// Bounds: the region map must describe `spec` (at most [`MAX_BLOCKS`]
/// blocks, [`MAX_REGIONS`] regions); every fragment must carry `spec`, the
/// map's block size and the summary's halo, arrive in ascending region
/// order, at most `summary.fragments` of them; all fragments together may
/// hold at most `max_fragment_bytes` (samples at their wire width, 1 or 2
/// bytes, plus 4 bytes per block and a few dozen per tile), checked from
/// each header before anything is allocated.
#[derive(Debug)]
pub struct SegmentDecoder {
    spec: ImageSpec,
    budget: u64,
    summary: Option<(pb::Summary, RegionMap)>,
    current: Option<FragmentBuilder>,
    fragments: Vec<Fragment>,
}

impl SegmentDecoder {
    /// `spec`: the image that was sent. `max_fragment_bytes`: what the
    /// fragments may cost in total (the segmentation service allows up to
    /// 4 x its image limit; halos overlap).
    pub fn new(spec: ImageSpec, max_fragment_bytes: u64) -> Self {
        Self {
            spec,
            budget: max_fragment_bytes,
            summary: None,
            current: None,
            fragments: Vec::new(),
        }
    }

    pub fn push(&mut self, m: pb::SegmentResponse) -> Result<(), WireError> {
        let msg = m
            .msg
            .ok_or_else(|| invalid("a response message with no `msg` set"))?;
        if let Msg::Summary(s) = msg {
            return self.summary(s);
        }
        if self.summary.is_none() {
            return Err(invalid("the first response message must be the summary"));
        }
        if let Msg::Fragment(h) = msg {
            return self.start_fragment(h);
        }
        let i = self.fragments.len();
        let Some(current) = self.current.as_mut() else {
            return Err(invalid(format!(
                "fragment[{i}]: data before its fragment header"
            )));
        };
        match msg {
            Msg::Blocks(b) => current.blocks(b),
            Msg::Tile(t) => current.tile(t),
            Msg::Samples(s) => current.samples(&s),
            Msg::Summary(_) | Msg::Fragment(_) => Err(WireError::Internal(
                "summary and fragment headers are handled above".into(),
            )),
        }
    }

    fn summary(&mut self, mut s: pb::Summary) -> Result<(), WireError> {
        if self.summary.is_some() {
            return Err(invalid("a second summary"));
        }
        let map = region_map_from_proto(
            "summary.region_map",
            s.region_map
                .take()
                .ok_or_else(|| invalid("summary.region_map is required"))?,
            &self.spec,
        )?;
        if s.regions != u32::from(map.regions) {
            return Err(invalid(format!(
                "summary.regions {} but the region map has {}",
                s.regions, map.regions
            )));
        }
        if s.halo > MAX_HALO {
            return Err(invalid(format!(
                "summary.halo {} exceeds {MAX_HALO}",
                s.halo
            )));
        }
        let non_empty = map.region_sizes().iter().filter(|&&n| n > 0).count();
        if s.fragments as usize != non_empty {
            return Err(invalid(format!(
                "summary.fragments {} but the region map has {non_empty} non-empty regions",
                s.fragments
            )));
        }
        self.summary = Some((s, map));
        Ok(())
    }

    fn start_fragment(&mut self, h: pb::FragmentHeader) -> Result<(), WireError> {
        self.finish_current()?;
        let Some((summary, map)) = &self.summary else {
            return Err(invalid("the first response message must be the summary"));
        };
        let i = self.fragments.len();
        let field = format!("fragment[{i}]");
        if i as u32 >= summary.fragments {
            return Err(invalid(format!(
                "{field}: more fragments than the {} the summary declares",
                summary.fragments
            )));
        }
        if h.region >= u32::from(map.regions)
            || self
                .fragments
                .last()
                .is_some_and(|f| h.region <= u32::from(f.region))
        {
            return Err(invalid(format!(
                "{field}.region {} is not a new region below {} in ascending order",
                h.region, map.regions
            )));
        }
        if h.block_size != map.grid.block_size || h.halo != summary.halo {
            return Err(invalid(format!(
                "{field}: block_size {} / halo {} differ from the summary's {} / {}",
                h.block_size, h.halo, map.grid.block_size, summary.halo
            )));
        }
        let b = FragmentBuilder::new(&field, h, SampleCost::Wire, &mut self.budget, MAX_BLOCKS)?;
        if b.fragment().spec != self.spec {
            return Err(invalid(format!(
                "{field}.spec differs from the image's spec"
            )));
        }
        self.current = Some(b);
        Ok(())
    }

    /// Completes the current fragment and checks it holds exactly its
    /// region's blocks.
    fn finish_current(&mut self) -> Result<(), WireError> {
        let Some(b) = self.current.take() else {
            return Ok(());
        };
        let i = self.fragments.len();
        let f = b.finish()?;
        if let Some((_, map)) = &self.summary {
            let mut expected = map
                .assignment
                .iter()
                .enumerate()
                .filter(|&(_, &r)| r == f.region)
                .map(|(i, _)| i as u32);
            let same =
                f.blocks.iter().all(|&b| expected.next() == Some(b)) && expected.next().is_none();
            if !same {
                return Err(invalid(format!(
                    "fragment[{i}]: its blocks are not region {}'s blocks in the region map",
                    f.region
                )));
            }
        }
        self.fragments.push(f);
        Ok(())
    }

    /// The result, once the stream has ended.
    pub fn finish(mut self) -> Result<DecodedSegmentation, WireError> {
        self.finish_current()?;
        let Some((summary, region_map)) = self.summary else {
            return Err(invalid("empty response stream: no summary"));
        };
        if self.fragments.len() != summary.fragments as usize {
            return Err(invalid(format!(
                "{} fragments received, the summary declares {}",
                self.fragments.len(),
                summary.fragments
            )));
        }
        Ok(DecodedSegmentation {
            summary,
            region_map,
            fragments: self.fragments,
        })
    }
}

/// Reads a whole Segment response stream (e.g. the `tonic::Streaming` of
/// `SegmentationClient::segment`) through a [`SegmentDecoder`]. A status
/// from the stream is returned as is; a malformed response is INTERNAL
/// naming the segmentation service ([`WireError::upstream`]).
pub async fn decode_segment<S>(
    mut stream: S,
    spec: ImageSpec,
    max_fragment_bytes: u64,
) -> Result<DecodedSegmentation, Status>
where
    S: Stream<Item = Result<pb::SegmentResponse, Status>> + Unpin,
{
    const PEER: &str = "the segmentation service";
    let mut d = SegmentDecoder::new(spec, max_fragment_bytes);
    while let Some(m) = stream.next().await {
        d.push(m?).map_err(|e| e.upstream(PEER))?;
    }
    d.finish().map_err(|e| e.upstream(PEER))
}

/// The summary message: N, thresholds, fitness, search effort, region map.
pub fn summary_to_proto(seg: &Segmentation, halo: u32, fragments: usize) -> pb::SegmentResponse {
    let map = &seg.region_map;
    let f = &seg.fitness;
    pb::SegmentResponse {
        msg: Some(pb::segment_response::Msg::Summary(pb::Summary {
            regions: u32::from(map.regions),
            thresholds: seg.thresholds.clone(),
            fitness: Some(pb::FitnessTerms {
                regions: f.regions as u32,
                makespan_ns: f.makespan_ns,
                cost: f.cost,
                info_share: f.info_share,
                cor: f.cor,
                npcr: f.npcr,
                total: f.total,
            }),
            generations: seg.generations as u64,
            evaluations: seg.evaluations,
            region_map: Some(region_map_to_proto(map)),
            halo,
            fragments: fragments as u32,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::tests::fragments;
    use tessera_image::PixelFormat;

    fn summary(map: &RegionMap, halo: u32, fragments: u32) -> pb::SegmentResponse {
        pb::SegmentResponse {
            msg: Some(Msg::Summary(pb::Summary {
                regions: u32::from(map.regions),
                thresholds: vec![1.0, 2.0],
                fitness: None,
                generations: 1,
                evaluations: 1,
                region_map: Some(region_map_to_proto(map)),
                halo,
                fragments,
            })),
        }
    }

    fn stream(map: &RegionMap, frags: &[Fragment], halo: u32) -> Vec<pb::SegmentResponse> {
        let mut v = vec![summary(map, halo, frags.len() as u32)];
        for f in frags {
            v.extend(fragment_messages(f));
        }
        v
    }

    fn decode(
        spec: ImageSpec,
        msgs: Vec<pb::SegmentResponse>,
    ) -> Result<DecodedSegmentation, WireError> {
        let mut d = SegmentDecoder::new(spec, 1 << 30);
        for m in msgs {
            d.push(m)?;
        }
        d.finish()
    }

    #[test]
    fn round_trip() {
        let (image, map, frags) = fragments(PixelFormat::gray16(12, false), 2);
        let got = decode(*image.spec(), stream(&map, &frags, 2)).unwrap();
        assert_eq!(got.region_map, map);
        assert_eq!(got.fragments, frags);
        assert_eq!(got.summary.halo, 2);
        assert!(got.summary.region_map.is_none());
    }

    #[tokio::test]
    async fn async_decode_passes_statuses_through() {
        let (image, map, frags) = fragments(PixelFormat::GRAY8, 1);
        let ok: Vec<Result<_, Status>> = stream(&map, &frags, 1).into_iter().map(Ok).collect();
        let got = decode_segment(tokio_stream::iter(ok), *image.spec(), 1 << 30)
            .await
            .unwrap();
        assert_eq!(got.fragments, frags);
        let failing = vec![
            Ok(summary(&map, 1, 3)),
            Err(Status::invalid_argument("bad start")),
        ];
        let e = decode_segment(tokio_stream::iter(failing), *image.spec(), 1 << 30)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let truncated: Vec<Result<_, Status>> = stream(&map, &frags, 1)
            .into_iter()
            .take(4)
            .map(Ok)
            .collect();
        let e = decode_segment(tokio_stream::iter(truncated), *image.spec(), 1 << 30)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.message().contains("segmentation service"), "{e:?}");
    }

    #[test]
    fn inconsistent_responses_are_refused() {
        let (image, map, frags) = fragments(PixelFormat::GRAY8, 1);
        let spec = *image.spec();
        let good = stream(&map, &frags, 1);
        let frag_starts: Vec<usize> = good
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.msg, Some(Msg::Fragment(_))))
            .map(|(i, _)| i)
            .collect();
        let with_summary = |f: &dyn Fn(&mut pb::Summary)| {
            let mut v = good.clone();
            if let Some(Msg::Summary(s)) = &mut v[0].msg {
                f(s);
            }
            v
        };
        let with_header = |k: usize, f: &dyn Fn(&mut pb::FragmentHeader)| {
            let mut v = good.clone();
            if let Some(Msg::Fragment(h)) = &mut v[frag_starts[k]].msg {
                f(h);
            }
            v
        };
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        let mut missing_fragment = good.clone();
        missing_fragment.truncate(frag_starts[2]);
        let mut twice = good.clone();
        twice.push(good[0].clone());
        let mut duplicate = good.clone();
        duplicate.extend(good[frag_starts[2]..].iter().cloned());
        let mut other_spec = spec;
        other_spec.width = 51;
        let cases: Vec<(&str, Vec<pb::SegmentResponse>)> = vec![
            ("empty", vec![]),
            ("fragment first", swapped),
            ("second summary", twice),
            ("missing fragment", missing_fragment),
            ("a fourth fragment", duplicate),
            (
                "map without regions",
                with_summary(&|s| s.region_map.as_mut().unwrap().regions = 0),
            ),
            (
                "map over 16 regions",
                with_summary(&|s| s.region_map.as_mut().unwrap().regions = 17),
            ),
            (
                "map with bad cols",
                with_summary(&|s| s.region_map.as_mut().unwrap().cols = 1),
            ),
            (
                "short assignment",
                with_summary(&|s| {
                    s.region_map.as_mut().unwrap().assignment.pop();
                }),
            ),
            (
                "region id too big",
                with_summary(&|s| s.region_map.as_mut().unwrap().assignment[0] = 9),
            ),
            ("regions disagree", with_summary(&|s| s.regions = 2)),
            ("fragment count lies", with_summary(&|s| s.fragments = 2)),
            ("summary halo over 16", with_summary(&|s| s.halo = 17)),
            ("no region map", with_summary(&|s| s.region_map = None)),
            ("halo differs", with_header(0, &|h| h.halo = 2)),
            ("region out of order", with_header(1, &|h| h.region = 0)),
            ("region out of range", with_header(2, &|h| h.region = 3)),
            ("foreign block size", with_header(0, &|h| h.block_size = 4)),
            (
                "foreign spec",
                with_header(0, &|h| {
                    h.spec.as_mut().unwrap().bits_stored = 7;
                }),
            ),
            ("blocks of another region", {
                // Swap two fragments' regions: each is valid but not its
                // region's blocks.
                let mut v = with_header(0, &|h| h.region = 1);
                if let Some(Msg::Fragment(h)) = &mut v[frag_starts[1]].msg {
                    h.region = 2;
                }
                if let Some(Msg::Fragment(h)) = &mut v[frag_starts[2]].msg {
                    h.region = 0;
                }
                v
            }),
        ];
        for (what, msgs) in cases {
            let e = decode(spec, msgs).unwrap_err();
            assert!(matches!(e, WireError::Invalid(_)), "{what}: {e:?}");
        }
        assert!(
            decode(other_spec, good.clone()).is_err(),
            "map of another size"
        );
        let mut d = SegmentDecoder::new(spec, 1000);
        let e = good.into_iter().try_for_each(|m| d.push(m)).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e:?}");
    }
}

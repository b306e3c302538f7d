//! `tessera.storage.v1.StorageNode/Process`: one fragment and an operation
//! in, the processed block runs out.
//!
//! Request stream: `start` (operation + `FragmentHeader`); for histogram
//! equalization the global mapping in `mapping` chunks; the block list in
//! `blocks` chunks; then each tile's `tile` header followed by its `samples`.
//! Response stream: `header` (region, tile count, sample count), then each
//! output tile's `tile` (its core) followed by its `samples`.

use std::borrow::Borrow;

use tessera_image::{ImageSpec, PixelFormat};
use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::process_request::Msg as Req;
use tessera_proto::storage::v1::process_response::Msg as Resp;
use tessera_segment::{
    Fragment, FragmentOutput, Mapping, Operation, OutputTile, SegmentError, equalization_mapping,
    merge_histograms,
};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::convert::segmentation::{rect_from_proto, rect_to_proto};
use crate::convert::{decode_samples, encode_samples, operation_from_proto, operation_to_proto};
use crate::fragment::{
    FragmentBody, FragmentBuilder, FragmentPart, SampleCost, fragment_header, rect_in,
};
use crate::{CHUNK_BYTES, MAX_BLOCKS, WireError, invalid};

/// What one Process call may make a node hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Memory of the received fragment (2 bytes per sample whatever the
    /// wire width, 4 per block, a few dozen per tile) plus the histeq
    /// mapping (2 bytes per word). The output (the cores only) needs at
    /// most as much again.
    pub max_fragment_bytes: u64,
    /// Most blocks in one fragment.
    pub max_blocks: u64,
}

impl ProcessLimits {
    pub fn new(max_fragment_bytes: u64) -> Self {
        Self {
            max_fragment_bytes,
            max_blocks: MAX_BLOCKS,
        }
    }
}

/// Words in the histeq mapping of `spec`: one plane of `2^bits_stored`
/// words per (frame, channel).
fn mapping_words(spec: &ImageSpec) -> u64 {
    u64::from(spec.frames) * u64::from(spec.format.channels) * (1u64 << spec.format.bits_stored)
}

/// The global histogram-equalization mapping of an image from its
/// fragments (each counts only its own blocks, so together they count the
/// image once): what the gateway sends with every histeq fragment.
pub fn histeq_mapping(spec: &ImageSpec, fragments: &[Fragment]) -> Result<Mapping, SegmentError> {
    let parts = fragments
        .iter()
        .map(Fragment::histogram)
        .collect::<Result<Vec<_>, _>>()?;
    equalization_mapping(&merge_histograms(spec.format, spec.frames, &parts)?)
}

fn request(m: Req) -> pb::ProcessRequest {
    pb::ProcessRequest { msg: Some(m) }
}

/// The Process request for `fragment` (owned or `Arc`): `start`, the
/// mapping chunks when `mapping` is given, then the fragment's body, encoded
/// lazily. The caller passes a mapping exactly for global operations
/// (`tessera_storage_client::process_fragment` checks this).
pub fn process_requests<F>(
    fragment: F,
    op: Operation,
    mapping: Option<&Mapping>,
) -> impl Iterator<Item = pb::ProcessRequest> + Send + 'static + use<F>
where
    F: Borrow<Fragment> + Send + 'static,
{
    let f: &Fragment = fragment.borrow();
    let bps = f.spec.format.bytes_per_sample();
    let start = request(Req::Start(pb::ProcessStart {
        operation: operation_to_proto(op).into(),
        fragment: Some(fragment_header(f)),
    }));
    let words: Vec<u16> = mapping
        .map(|m| m.planes.iter().flatten().copied().collect())
        .unwrap_or_default();
    let mapping_chunks: Vec<pb::ProcessRequest> = words
        .chunks(CHUNK_BYTES / bps)
        .map(|c| request(Req::Mapping(encode_samples(c, bps))))
        .collect();
    std::iter::once(start)
        .chain(mapping_chunks)
        .chain(FragmentBody::new(fragment).map(|p| {
            request(match p {
                FragmentPart::Blocks(b) => Req::Blocks(b),
                FragmentPart::Tile(t) => Req::Tile(t),
                FragmentPart::Samples(s) => Req::Samples(s),
            })
        }))
}

/// A decoded, complete Process request.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessJob {
    pub operation: Operation,
    pub fragment: Fragment,
    /// Set exactly when `operation` is global (histogram equalization).
    pub mapping: Option<Mapping>,
}

impl ProcessJob {
    /// Runs the operation (CPU-bound: call it off the async threads).
    pub fn run(&self) -> Result<FragmentOutput, WireError> {
        let out = match (&self.mapping, self.operation.is_global()) {
            (Some(m), true) => self.fragment.apply_mapping(m),
            (None, false) => self.fragment.apply(self.operation),
            (Some(_), false) | (None, true) => {
                return Err(WireError::Internal(format!(
                    "{} job with{} a mapping",
                    self.operation,
                    if self.mapping.is_some() { "" } else { "out" }
                )));
            }
        };
        out.map_err(job_error)
    }
}

/// The core's refusals of a received fragment or mapping are the caller's
/// fault; the rest cannot happen for a single fragment.
fn job_error(e: SegmentError) -> WireError {
    match e {
        SegmentError::Image(_)
        | SegmentError::Fragment(_)
        | SegmentError::Histogram(_)
        | SegmentError::NeedsMapping(_)
        | SegmentError::Parameter(_)
        | SegmentError::EmptyImage { .. }
        | SegmentError::ZeroBlockSize
        | SegmentError::BlockTooLarge { .. } => invalid(format!("fragment: {e}")),
        SegmentError::ZeroRegions
        | SegmentError::TooManyRegions { .. }
        | SegmentError::NotEnoughEntropyLevels { .. }
        | SegmentError::UnknownOperation(_)
        | SegmentError::RegionMap(_)
        | SegmentError::Merge(_)
        | SegmentError::SearchSpaceTooLarge(_) => WireError::Internal(format!("process: {e}")),
    }
}

#[derive(Debug)]
struct Started {
    operation: Operation,
    builder: FragmentBuilder,
    /// Histeq only: the mapping words received so far and how many are due.
    mapping: Option<(Vec<u16>, u64)>,
}

/// Decodes a Process request stream one message at a time (the node's
/// side). Every declared count is checked against [`ProcessLimits`] from
/// `start`, before anything is allocated; [`ProcessDecoder::finish`]
/// validates the fragment and the mapping.
#[derive(Debug)]
pub struct ProcessDecoder {
    limits: ProcessLimits,
    started: Option<Started>,
}

impl ProcessDecoder {
    pub fn new(limits: ProcessLimits) -> Self {
        Self {
            limits,
            started: None,
        }
    }

    pub fn push(&mut self, m: pb::ProcessRequest) -> Result<(), WireError> {
        let msg = m.msg.ok_or_else(|| invalid("message with no `msg` set"))?;
        let Some(s) = self.started.as_mut() else {
            return match msg {
                Req::Start(start) => self.start(start),
                Req::Mapping(_) | Req::Blocks(_) | Req::Tile(_) | Req::Samples(_) => {
                    Err(invalid("the first message must be `start`"))
                }
            };
        };
        match msg {
            Req::Start(_) => Err(invalid("`start` may appear only once, first")),
            Req::Mapping(bytes) => {
                let Some((words, due)) = s.mapping.as_mut() else {
                    return Err(invalid(format!(
                        "mapping: only histogram equalization takes a mapping, not {}",
                        s.operation
                    )));
                };
                if !s.builder.fragment().blocks.is_empty() {
                    return Err(invalid("mapping: must come before the blocks"));
                }
                let room = *due - words.len() as u64;
                let bps = s.builder.fragment().spec.format.bytes_per_sample();
                decode_samples("mapping", &bytes, bps, room, words)
            }
            Req::Blocks(b) => {
                if let Some((words, due)) = &s.mapping
                    && (words.len() as u64) < *due
                {
                    return Err(invalid(format!(
                        "mapping: {} of its {due} words arrived before the blocks",
                        words.len()
                    )));
                }
                s.builder.blocks(b)
            }
            Req::Tile(t) => s.builder.tile(t),
            Req::Samples(bytes) => s.builder.samples(&bytes),
        }
    }

    fn start(&mut self, s: pb::ProcessStart) -> Result<(), WireError> {
        let operation = operation_from_proto("start.operation", s.operation)?;
        let header = s
            .fragment
            .ok_or_else(|| invalid("start.fragment is required"))?;
        let mut budget = self.limits.max_fragment_bytes;
        let mut mapping = None;
        if operation.is_global() {
            // Size the mapping from the spec before building anything.
            let spec =
                crate::convert::segmentation::required_spec("start.fragment.spec", header.spec)?;
            let words = mapping_words(&spec);
            let bytes = words * std::mem::size_of::<u16>() as u64;
            if bytes > budget {
                return Err(WireError::TooLarge(format!(
                    "start.fragment.spec: the {operation} mapping needs {bytes} bytes, more than \
                     the limit of {budget}"
                )));
            }
            budget -= bytes;
            mapping = Some((Vec::with_capacity(words as usize), words));
        }
        let builder = FragmentBuilder::new(
            "start.fragment",
            header,
            SampleCost::Memory,
            &mut budget,
            self.limits.max_blocks,
        )?;
        let halo = builder.fragment().halo;
        if halo < operation.halo() {
            return Err(invalid(format!(
                "start.fragment.halo {halo} is less than the {} the {operation} operation needs",
                operation.halo()
            )));
        }
        self.started = Some(Started {
            operation,
            builder,
            mapping,
        });
        Ok(())
    }

    /// The job, once the stream has ended: every declared part arrived, the
    /// fragment is valid (`Fragment::validate`) and so is the mapping's
    /// shape and width. O(samples): call it off the async threads.
    pub fn finish(self) -> Result<ProcessJob, WireError> {
        let Some(s) = self.started else {
            return Err(invalid("empty request stream: send `start` first"));
        };
        let spec = s.builder.fragment().spec;
        let mapping = match s.mapping {
            None => None,
            Some((words, due)) => {
                if (words.len() as u64) != due {
                    return Err(invalid(format!(
                        "mapping: {} of its {due} words arrived",
                        words.len()
                    )));
                }
                let bins = 1usize << spec.format.bits_stored;
                let m = Mapping {
                    format: spec.format,
                    frames: spec.frames,
                    planes: words.chunks(bins).map(<[u16]>::to_vec).collect(),
                };
                m.validate_for(spec.format, spec.frames)
                    .map_err(|e| invalid(format!("mapping: {e}")))?;
                Some(m)
            }
        };
        let fragment = s.builder.finish()?;
        Ok(ProcessJob {
            operation: s.operation,
            fragment,
            mapping,
        })
    }
}

fn response(m: Resp) -> pb::ProcessResponse {
    pb::ProcessResponse { msg: Some(m) }
}

/// The node's answer: the header, then every output tile's core followed by
/// its samples in chunks of at most [`CHUNK_BYTES`] (`format`: the
/// fragment's, for the word width). Lazy.
pub fn output_messages(
    out: FragmentOutput,
    format: PixelFormat,
) -> impl Iterator<Item = pb::ProcessResponse> + Send + 'static {
    let bps = format.bytes_per_sample();
    let per_chunk = CHUNK_BYTES / bps;
    let header = response(Resp::Header(pb::OutputHeader {
        region: u32::from(out.region),
        tile_count: out.tiles.len() as u32,
        sample_count: out.tiles.iter().map(|t| t.samples.len() as u64).sum(),
    }));
    let tiles = out.tiles.into_iter().flat_map(move |t| {
        let head = response(Resp::Tile(pb::OutputTile {
            core: Some(rect_to_proto(&t.core)),
        }));
        let samples = t.samples;
        let n = samples.len();
        std::iter::once(head).chain((0..n).step_by(per_chunk).map(move |i| {
            response(Resp::Samples(encode_samples(
                &samples[i..n.min(i + per_chunk)],
                bps,
            )))
        }))
    });
    std::iter::once(header).chain(tiles)
}

/// Decodes a node's answer for a fragment we sent (the gateway's side):
/// the region, the tile count and every core must be the fragment's, every
/// tile must hold exactly its core's samples. Buffers are sized from our own (validated) fragment, never
/// from the answer.
#[derive(Debug)]
pub struct OutputDecoder {
    spec: ImageSpec,
    region: u16,
    cores: Vec<tessera_image::Rect>,
    header: bool,
    tiles: Vec<OutputTile>,
    tile_left: u64,
}

impl OutputDecoder {
    pub fn new(fragment: &Fragment) -> Self {
        Self {
            spec: fragment.spec,
            region: fragment.region,
            cores: fragment.tiles.iter().map(|t| t.core).collect(),
            header: false,
            tiles: Vec::new(),
            tile_left: 0,
        }
    }

    fn per_pixel(&self) -> u64 {
        u64::from(self.spec.format.channels) * u64::from(self.spec.frames)
    }

    pub fn push(&mut self, m: pb::ProcessResponse) -> Result<(), WireError> {
        let msg = m.msg.ok_or_else(|| invalid("message with no `msg` set"))?;
        match msg {
            Resp::Header(h) => {
                if self.header {
                    return Err(invalid("a second header"));
                }
                let expected: u64 =
                    self.cores.iter().map(|c| c.area()).sum::<u64>() * self.per_pixel();
                if h.region != u32::from(self.region)
                    || h.tile_count as usize != self.cores.len()
                    || h.sample_count != expected
                {
                    return Err(invalid(format!(
                        "header: region {} / {} tiles / {} samples, the fragment needs {} / {} / \
                         {expected}",
                        h.region,
                        h.tile_count,
                        h.sample_count,
                        self.region,
                        self.cores.len()
                    )));
                }
                self.header = true;
                Ok(())
            }
            Resp::Tile(t) => {
                let i = self.tiles.len();
                if !self.header {
                    return Err(invalid("the first message must be the header"));
                }
                if self.tile_left > 0 {
                    return Err(invalid(format!(
                        "tile[{}]: {} samples missing",
                        i.saturating_sub(1),
                        self.tile_left
                    )));
                }
                let core = rect_from_proto(&format!("tile[{i}].core"), t.core)?;
                match self.cores.get(i) {
                    Some(c) if *c == core && rect_in(&self.spec, c) => {}
                    Some(c) => {
                        return Err(invalid(format!(
                            "tile[{i}].core {core}, the fragment's is {c}"
                        )));
                    }
                    None => return Err(invalid(format!("more than {i} tiles"))),
                }
                let need = core.area() * self.per_pixel();
                self.tiles.push(OutputTile {
                    core,
                    // Our own fragment's core: bounded.
                    samples: Vec::with_capacity(need as usize),
                });
                self.tile_left = need;
                Ok(())
            }
            Resp::Samples(bytes) => {
                let i = self.tiles.len().saturating_sub(1);
                let field = format!("tile[{i}].samples");
                let Some(tile) = self.tiles.last_mut() else {
                    return Err(invalid("samples before a tile"));
                };
                if self.tile_left == 0 {
                    return Err(invalid(format!("{field}: more than the core holds")));
                }
                let before = tile.samples.len();
                let bps = self.spec.format.bytes_per_sample();
                // Words are exactly as wide as the container (8 or 16
                // bits), so every decoded word fits it.
                decode_samples(&field, &bytes, bps, self.tile_left, &mut tile.samples)?;
                self.tile_left -= (tile.samples.len() - before) as u64;
                Ok(())
            }
        }
    }

    pub fn finish(self) -> Result<FragmentOutput, WireError> {
        if !self.header {
            return Err(invalid("empty response: no header"));
        }
        if self.tile_left > 0 || self.tiles.len() != self.cores.len() {
            return Err(invalid(format!(
                "{} of {} tiles complete",
                self.tiles.len() - usize::from(self.tile_left > 0),
                self.cores.len()
            )));
        }
        Ok(FragmentOutput {
            region: self.region,
            tiles: self.tiles,
        })
    }
}

/// Reads a whole Process response stream for `fragment` through an
/// [`OutputDecoder`]. A status from the stream is returned as is; a
/// malformed answer is INTERNAL naming `peer` ([`WireError::upstream`]).
pub async fn decode_output<S>(
    mut stream: S,
    fragment: &Fragment,
    peer: &str,
) -> Result<FragmentOutput, Status>
where
    S: Stream<Item = Result<pb::ProcessResponse, Status>> + Unpin,
{
    let mut d = OutputDecoder::new(fragment);
    while let Some(m) = stream.next().await {
        d.push(m?).map_err(|e| e.upstream(peer))?;
    }
    d.finish().map_err(|e| e.upstream(peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::tests::fragments;
    use std::sync::Arc;
    use tessera_segment::{merge, process_whole};

    fn decode(
        limits: ProcessLimits,
        msgs: Vec<pb::ProcessRequest>,
    ) -> Result<ProcessJob, WireError> {
        let mut d = ProcessDecoder::new(limits);
        for m in msgs {
            d.push(m)?;
        }
        d.finish()
    }

    fn round_trip_output(f: &Fragment, out: FragmentOutput) -> FragmentOutput {
        let mut d = OutputDecoder::new(f);
        for m in output_messages(out, f.spec.format) {
            d.push(m).unwrap();
        }
        d.finish().unwrap()
    }

    #[test]
    fn every_operation_round_trips_and_merges_to_the_whole_image_result() {
        for format in [
            PixelFormat::GRAY8,
            PixelFormat::gray16(12, true),
            PixelFormat::RGB8,
        ] {
            for op in Operation::ALL {
                let (image, _, frags) = fragments(format, op.halo());
                let mapping = op
                    .is_global()
                    .then(|| histeq_mapping(image.spec(), &frags).unwrap());
                let outputs: Vec<_> = frags
                    .iter()
                    .map(|f| {
                        let msgs: Vec<_> =
                            process_requests(Arc::new(f.clone()), op, mapping.as_ref()).collect();
                        let job = decode(ProcessLimits::new(1 << 24), msgs).unwrap();
                        assert_eq!(&job.fragment, f);
                        assert_eq!(job.mapping, mapping);
                        round_trip_output(f, job.run().unwrap())
                    })
                    .collect();
                assert_eq!(
                    merge(image.spec(), &outputs).unwrap(),
                    process_whole(&image, op).unwrap(),
                    "{op} {format}"
                );
            }
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let (image, _, frags) = fragments(PixelFormat::gray16(12, false), 2);
        let f = &frags[0];
        let mapping = histeq_mapping(image.spec(), &frags).unwrap();
        let good: Vec<_> = process_requests(f.clone(), Operation::Gaussian, None).collect();
        let histeq: Vec<_> =
            process_requests(f.clone(), Operation::HistEq, Some(&mapping)).collect();
        assert!(histeq.len() > good.len());
        let limits = ProcessLimits::new(1 << 24);
        let with_start = |f: &dyn Fn(&mut pb::ProcessStart)| {
            let mut v = good.clone();
            if let Some(Req::Start(s)) = &mut v[0].msg {
                f(s);
            }
            v
        };
        let mut start_twice = good.clone();
        start_twice.push(good[0].clone());
        let mut mapping_for_gaussian = good.clone();
        mapping_for_gaussian.insert(1, request(Req::Mapping(vec![0; 2])));
        let mut no_mapping = histeq.clone();
        no_mapping.retain(|m| !matches!(m.msg, Some(Req::Mapping(_))));
        let mut short_mapping = histeq.clone();
        if let Some(Req::Mapping(b)) = &mut short_mapping[1].msg {
            b.truncate(b.len() - 2);
        }
        let mut long_mapping = histeq.clone();
        long_mapping.insert(2, request(Req::Mapping(vec![0; 2])));
        let mut late_mapping = histeq.clone();
        let m = late_mapping.remove(1);
        late_mapping.push(m);
        let cases: Vec<(&str, Vec<pb::ProcessRequest>)> = vec![
            ("empty", vec![]),
            ("start missing", good[1..].to_vec()),
            ("empty message", vec![pb::ProcessRequest { msg: None }]),
            ("start twice", start_twice),
            ("no operation", with_start(&|s| s.operation = 0)),
            ("unknown operation", with_start(&|s| s.operation = 77)),
            ("no fragment", with_start(&|s| s.fragment = None)),
            (
                "halo too small",
                with_start(&|s| {
                    s.operation = operation_to_proto(Operation::Gaussian).into();
                    s.fragment.as_mut().unwrap().halo = 1;
                }),
            ),
            ("start only", vec![good[0].clone()]),
            ("mapping for a local op", mapping_for_gaussian),
            ("histeq without mapping", no_mapping),
            ("short mapping", short_mapping),
            ("mapping too long", long_mapping),
            ("mapping after blocks", late_mapping),
        ];
        for (what, msgs) in cases {
            let e = decode(limits, msgs).unwrap_err();
            assert!(matches!(e, WireError::Invalid(_)), "{what}: {e:?}");
            assert!(!e.to_string().is_empty());
        }
        let e = decode(ProcessLimits::new(1000), good.clone()).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e:?}");
        // The 12-bit mapping alone (4096 words, 8 KiB) is over a 8 KiB - 1
        // limit.
        let e = decode(ProcessLimits::new(8191), histeq).unwrap_err();
        assert!(
            matches!(&e, WireError::TooLarge(m) if m.contains("mapping")),
            "{e:?}"
        );
        assert!(decode(limits, good).is_ok());
    }

    #[test]
    fn bad_outputs_are_refused() {
        let (_, _, frags) = fragments(PixelFormat::gray16(12, false), 1);
        let f = &frags[1];
        let out = f.apply(Operation::Median).unwrap();
        let good: Vec<_> = output_messages(out.clone(), f.spec.format).collect();
        let decode = |msgs: Vec<pb::ProcessResponse>| {
            let mut d = OutputDecoder::new(f);
            for m in msgs {
                d.push(m)?;
            }
            d.finish()
        };
        assert_eq!(decode(good.clone()).unwrap(), out);
        let with_header = |g: &dyn Fn(&mut pb::OutputHeader)| {
            let mut v = good.clone();
            if let Some(Resp::Header(h)) = &mut v[0].msg {
                g(h);
            }
            v
        };
        let mut moved = good.clone();
        if let Some(Resp::Tile(t)) = &mut moved[1].msg {
            t.core.as_mut().unwrap().x += 1;
        }
        let mut odd = good.clone();
        if let Some(Resp::Samples(s)) = &mut odd[2].msg {
            s.pop();
        }
        let mut truncated = good.clone();
        truncated.pop();
        let mut extra = good.clone();
        extra.push(response(Resp::Samples(vec![0, 0])));
        let cases = vec![
            ("empty", vec![]),
            ("other region", with_header(&|h| h.region += 1)),
            ("tile count", with_header(&|h| h.tile_count += 1)),
            ("sample count", with_header(&|h| h.sample_count -= 1)),
            ("tile first", good[1..].to_vec()),
            ("moved core", moved),
            ("odd byte count", odd),
            ("truncated", truncated),
            ("extra samples", extra),
        ];
        for (what, msgs) in cases {
            assert!(decode(msgs).is_err(), "{what}");
        }
    }
}

//! Integration tests: the real segmentation service in-process on
//! 127.0.0.1:0 with a generated development PKI, called over mutual TLS by
//! one client per identity. The response is decoded client-side with
//! `tessera_wire::SegmentDecoder` (what the gateway uses) into a region map
//! and `tessera_segment::Fragment` values, and checked against the core.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tessera_image::{Image, ImageSpec, PixelFormat};
use tessera_proto::segmentation::v1 as pb;
use tessera_proto::segmentation::v1::segmentation_client::SegmentationClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_segment::{Fragment, Operation, RegionMap, make_fragments, merge, process_whole};
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};
use tessera_wire::segmentation::{spec_from_proto, spec_to_proto};
use tessera_wire::{CHUNK_BYTES, SegmentDecoder};
use tonic::{Code, Status};

/// The test config's image limit: 1 MiB (a 512x512 16-bit image fits).
const MAX_IMAGE_BYTES: u64 = 1024 * 1024;

struct Env {
    _tmp: tempfile::TempDir,
    pki: PathBuf,
    addr: String,
    app: Option<segmentation_service::RunningApp>,
}

impl Env {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap().dir;
        let d = pki.display();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/segmentation.crt\"\nkey = \"{d}/segmentation.key\"\n\
             [segmentation]\nmax_image_bytes = {MAX_IMAGE_BYTES}\n"
        );
        let cfg: segmentation_service::Config = load_config(
            &ConfigSource::from_text(&text, BTreeMap::new()),
            segmentation_service::config::ENV_PREFIX,
        )
        .unwrap();
        let app = segmentation_service::App::build(&cfg)
            .unwrap()
            .spawn()
            .await
            .unwrap();
        let addr = app.local_addr().to_string();
        Self {
            _tmp: tmp,
            pki,
            addr,
            app: Some(app),
        }
    }

    async fn client(&self, name: &str) -> SegmentationClient<Channel> {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki, name)).unwrap();
        SegmentationClient::new(tls.connect(&self.addr).await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(a) = self.app.take() {
            a.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn start(spec: &ImageSpec, block_size: u32, max_regions: u32) -> pb::SegmentStart {
    pb::SegmentStart {
        spec: Some(spec_to_proto(spec)),
        block_size,
        max_regions,
        regions: None,
        operation: pb::Operation::Gaussian.into(),
        seed: 11,
    }
}

fn msgs(start: pb::SegmentStart, pixels: &[u8]) -> Vec<pb::SegmentRequest> {
    let mut v = vec![pb::SegmentRequest {
        msg: Some(pb::segment_request::Msg::Start(start)),
    }];
    v.extend(pixels.chunks(CHUNK_BYTES / 3).map(pixel_msg));
    v
}

fn pixel_msg(c: &[u8]) -> pb::SegmentRequest {
    pb::SegmentRequest {
        msg: Some(pb::segment_request::Msg::Pixels(c.to_vec())),
    }
}

/// What a Segment call returned, decoded.
struct Segmented {
    summary: pb::Summary,
    region_map: RegionMap,
    fragments: Vec<Fragment>,
    largest_message: usize,
}

async fn segment(
    c: &mut SegmentationClient<Channel>,
    requests: Vec<pb::SegmentRequest>,
) -> Result<Segmented, Status> {
    use prost::Message;
    // The decoder checks the answer against the spec we sent (a request
    // without a valid start gets no answer but an error).
    let spec = match requests.first().and_then(|r| r.msg.as_ref()) {
        Some(pb::segment_request::Msg::Start(s)) => {
            s.spec.and_then(|p| spec_from_proto("spec", p).ok())
        }
        _ => None,
    };
    let mut decoder = spec.map(|s| SegmentDecoder::new(s, 4 * MAX_IMAGE_BYTES));
    let mut out = c.segment(tokio_stream::iter(requests)).await?.into_inner();
    let mut largest_message = 0;
    while let Some(m) = out.message().await? {
        largest_message = largest_message.max(m.encoded_len());
        decoder
            .as_mut()
            .expect("an answer only to a valid start")
            .push(m)
            .unwrap();
    }
    let d = decoder
        .expect("an answer only to a valid start")
        .finish()
        .unwrap();
    Ok(Segmented {
        summary: d.summary,
        region_map: d.region_map,
        fragments: d.fragments,
        largest_message,
    })
}

#[tokio::test]
async fn gateway_segments_the_head_phantom_and_fragments_merge_bit_identically() {
    let env = Env::start().await;
    let mut gw = env.client("gateway").await;
    for format in [PixelFormat::GRAY8, PixelFormat::gray16(12, false)] {
        let image = tessera_image::phantom::head_phantom(512, 512, 1, format, 3).unwrap();
        let got = segment(
            &mut gw,
            msgs(start(image.spec(), 16, 3), &image.to_le_bytes()),
        )
        .await
        .unwrap();
        let s = &got.summary;
        // The phantom has enough entropy levels for the GA to use every node.
        assert!((2..=3).contains(&s.regions), "N = {}", s.regions);
        assert_eq!(s.thresholds.len() as u32, s.regions - 1);
        assert_eq!(s.halo, Operation::Gaussian.halo());
        assert!(s.generations > 0 && s.evaluations > 0);
        assert_eq!(s.fitness.unwrap().regions, s.regions);
        // Every message well under the platform's 4 MiB.
        assert!(got.largest_message <= CHUNK_BYTES + 1024);

        // The region map covers every block exactly once.
        let map = got.region_map.clone();
        let grid = map.grid;
        assert_eq!((grid.cols(), grid.rows(), grid.block_size), (32, 32, 16));
        assert_eq!(map.assignment.len(), 32 * 32);
        assert!(map.assignment.iter().all(|&r| u32::from(r) < s.regions));
        let mut seen = vec![0u32; map.grid.len()];
        for f in &got.fragments {
            for &b in &f.blocks {
                seen[b as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "each block in one fragment");
        let non_empty = map.region_sizes().iter().filter(|&&n| n > 0).count();
        assert_eq!(got.fragments.len(), non_empty);
        assert_eq!(s.fragments as usize, non_empty);

        // Each fragment is valid, holds exactly its region's blocks plus the
        // halo (and the image's values there), nothing more.
        let expected = make_fragments(&image, &map, Operation::Gaussian.halo()).unwrap();
        assert_eq!(got.fragments, expected);
        for f in &got.fragments {
            f.validate().unwrap();
            assert_eq!(f.blocks, map.blocks_of(f.region));
            let grid = map.grid;
            for t in &f.tiles {
                let mut i = 0;
                for y in t.rect.y..t.rect.bottom() as u32 {
                    for x in t.rect.x..t.rect.right() as u32 {
                        // Within the halo of one of the region's blocks.
                        let near = f.blocks.iter().any(|&b| {
                            let r = grid.rect(b as usize);
                            u64::from(x) + 2 >= u64::from(r.x)
                                && u64::from(x) < r.right() + 2
                                && u64::from(y) + 2 >= u64::from(r.y)
                                && u64::from(y) < r.bottom() + 2
                        });
                        assert!(near, "pixel ({x},{y}) outside blocks+halo");
                        assert_eq!(t.samples[i], image.get(0, x, y, 0));
                        i += 1;
                    }
                }
            }
        }

        // Region-wise Gaussian, merged, equals the whole-image Gaussian.
        let outputs: Vec<_> = got
            .fragments
            .iter()
            .map(|f| f.apply(Operation::Gaussian).unwrap())
            .collect();
        let merged = merge(image.spec(), &outputs).unwrap();
        assert_eq!(merged, process_whole(&image, Operation::Gaussian).unwrap());
    }
    env.stop().await;
}

#[tokio::test]
async fn fixed_region_count_and_the_same_seed_reproduce() {
    let env = Env::start().await;
    let mut gw = env.client("gateway").await;
    let image = tessera_image::phantom::head_phantom(128, 96, 1, PixelFormat::GRAY8, 5).unwrap();
    let mut st = start(image.spec(), 8, 4);
    st.regions = Some(2);
    st.operation = pb::Operation::Median.into();
    let a = segment(&mut gw, msgs(st, &image.to_le_bytes()))
        .await
        .unwrap();
    let b = segment(&mut gw, msgs(st, &image.to_le_bytes()))
        .await
        .unwrap();
    assert_eq!(a.summary.regions, 2);
    assert_eq!(a.summary.halo, 1);
    assert_eq!(a.summary, b.summary);
    assert_eq!(a.fragments, b.fragments);
    env.stop().await;
}

#[tokio::test]
async fn only_the_gateway_may_segment() {
    let env = Env::start().await;
    let image = Image::zeroed(ImageSpec::new(32, 32, PixelFormat::GRAY8)).unwrap();
    for who in ["outsider", "storage-1", "owner", "watermark"] {
        let mut c = env.client(who).await;
        let e = segment(
            &mut c,
            msgs(start(image.spec(), 8, 2), &image.to_le_bytes()),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{who} must be refused"));
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }
    env.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_right_code() {
    let env = Env::start().await;
    let mut gw = env.client("gateway").await;
    let spec = ImageSpec::new(32, 32, PixelFormat::gray16(12, false));
    let image = tessera_image::phantom::head_phantom(32, 32, 1, spec.format, 1).unwrap();
    let px = image.to_le_bytes();
    let with = |f: &dyn Fn(&mut pb::SegmentStart)| {
        let mut s = start(&spec, 16, 3);
        f(&mut s);
        msgs(s, &px)
    };
    let mut over_samples = spec_to_proto(&spec);
    over_samples.width = 65_536;
    over_samples.height = 65_536;
    let too_big = ImageSpec::new(1024, 1024, PixelFormat::gray16(12, false)); // 2 MiB
    let mut too_many_px = msgs(start(&spec, 16, 3), &px);
    too_many_px.push(pixel_msg(&[0, 0]));
    let cases: Vec<(&str, Vec<pb::SegmentRequest>, Code)> = vec![
        ("empty stream", vec![], Code::InvalidArgument),
        (
            "pixels before start",
            vec![pixel_msg(&px)],
            Code::InvalidArgument,
        ),
        (
            "start twice",
            {
                let mut v = msgs(start(&spec, 16, 3), &px);
                v.push(v[0].clone());
                v
            },
            Code::InvalidArgument,
        ),
        (
            "too few pixels",
            msgs(start(&spec, 16, 3), &px[..px.len() - 2]),
            Code::InvalidArgument,
        ),
        ("too many pixels", too_many_px, Code::InvalidArgument),
        ("no spec", with(&|s| s.spec = None), Code::InvalidArgument),
        (
            "block size 0",
            with(&|s| s.block_size = 0),
            Code::InvalidArgument,
        ),
        (
            "block size > image",
            with(&|s| s.block_size = 33),
            Code::InvalidArgument,
        ),
        (
            "max regions 0",
            with(&|s| s.max_regions = 0),
            Code::InvalidArgument,
        ),
        (
            "max regions 17",
            with(&|s| s.max_regions = 17),
            Code::InvalidArgument,
        ),
        (
            "fixed regions > blocks",
            with(&|s| {
                s.max_regions = 5;
                s.regions = Some(5);
            }),
            Code::InvalidArgument,
        ),
        (
            "no operation",
            with(&|s| s.operation = 0),
            Code::InvalidArgument,
        ),
        (
            "unknown operation",
            with(&|s| s.operation = 42),
            Code::InvalidArgument,
        ),
        (
            "spec over MAX_SAMPLES",
            with(&|s| s.spec = Some(over_samples)),
            Code::InvalidArgument,
        ),
        (
            "image over max_image_bytes",
            msgs(start(&too_big, 16, 3), &[]),
            Code::ResourceExhausted,
        ),
        (
            "a message over the request limit",
            vec![
                msgs(start(&spec, 16, 3), &[]).remove(0),
                pixel_msg(&vec![0; 2 * CHUNK_BYTES]),
            ],
            Code::ResourceExhausted,
        ),
    ];
    for (name, requests, code) in cases {
        let e = segment(&mut gw, requests)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: must fail"));
        assert_eq!(e.code(), code, "{name}: {e:?}");
    }
    // Not every spec is refused: the valid request still works afterwards.
    let ok = segment(&mut gw, msgs(start(&spec, 16, 3), &px))
        .await
        .unwrap();
    assert!(!ok.fragments.is_empty());
    env.stop().await;
}

//! Region-wise processing: Process over mTLS on real nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use storage_node::{App, Config};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, PixelFormat};
use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::process_request::Msg as Req;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_runtime::{ConfigSource, RunningServer, load_config};
use tessera_segment::{
    BlockGrid, Fragment, GaParams, Operation, RegionMap, SegmentConfig, make_fragments, merge,
    process_whole,
};
use tessera_storage_client::process_fragment;
use tessera_storage_client::put_object;
use tessera_tls::Channel;
use tessera_wire::{CHUNK_BYTES, histeq_mapping, process_requests};
use tonic::Code;
use tonic::Status;

impl Env {
    /// Node `name` with its own certificate and data dir; `extra` is
    /// top-level TOML (e.g. a `[process]` table), `vars` env overrides.
    async fn start_node(&self, name: &str, extra: &str, vars: &[(&str, &str)]) -> RunningServer {
        let text = format!(
            "node_id = {name:?}\ndata_dir = {data:?}\n{extra}\n[server]\n\
             listen = \"127.0.0.1:0\"\n[server.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            data = self.path().join(name).display().to_string(),
            ca = self.pki.ca_path().display().to_string(),
            cert = self.pki.cert_path(name).display().to_string(),
            key = self.pki.key_path(name).display().to_string(),
        );
        let vars = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text, vars), "TESSERA_STORAGE").unwrap();
        App::build(cfg).unwrap().spawn().await.unwrap()
    }
}

/// A real GA-ES segmentation into three regions.
fn three_regions(image: &Image) -> RegionMap {
    let seg = tessera_segment::segment(
        image,
        &SegmentConfig {
            block_size: 16,
            min_regions: 3,
            max_regions: 3,
            ga: GaParams {
                seed: 7,
                ..GaParams::default()
            },
            ..SegmentConfig::default()
        },
    )
    .unwrap();
    assert_eq!(seg.region_map.regions, 3);
    seg.region_map
}

/// Sends raw messages and drains the answer.
async fn call(
    c: &mut StorageNodeClient<Channel>,
    msgs: Vec<pb::ProcessRequest>,
) -> Result<usize, Status> {
    let mut s = c.process(tokio_stream::iter(msgs)).await?.into_inner();
    let mut n = 0;
    while s.message().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_three_nodes_merges_to_the_whole_image_result() {
    let env = Env::new();
    let mut servers = Vec::new();
    let mut nodes = Vec::new();
    for name in ["storage-1", "storage-2", "storage-3"] {
        let s = env.start_node(name, "", &[]).await;
        nodes.push(env.client(&s, "gateway").await);
        servers.push(s);
    }
    for (format, frames) in [
        (PixelFormat::GRAY8, 1),
        (PixelFormat::gray16(12, false), 1),
        (PixelFormat::gray16(16, true), 2),
    ] {
        let image = head_phantom(192, 160, frames, format, 5).unwrap();
        let map = three_regions(&image);
        for op in Operation::ALL {
            let fragments = make_fragments(&image, &map, op.halo()).unwrap();
            assert_eq!(fragments.len(), 3, "every region is non-empty");
            let mapping = op
                .is_global()
                .then(|| histeq_mapping(image.spec(), &fragments).unwrap());
            let mut outputs = Vec::new();
            for (i, f) in fragments.iter().enumerate() {
                // A node sees only its region's blocks plus the halo.
                let sent: usize = f.tiles.iter().map(|t| t.samples.len()).sum();
                assert!(sent < image.samples().len(), "{op}: fragment {i}");
                let out = process_fragment(&mut nodes[i], f, op, mapping.as_ref())
                    .await
                    .unwrap_or_else(|e| panic!("{op} {format} fragment {i}: {e:?}"));
                outputs.push(out);
            }
            let merged = merge(image.spec(), &outputs).unwrap();
            assert_eq!(
                merged,
                process_whole(&image, op).unwrap(),
                "{op} on {format} x{frames}: region-wise must equal whole-image"
            );
        }
    }
    // Nothing was stored.
    for c in &mut nodes {
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((info.object_count, info.used_bytes), (0, 0));
    }
    for s in servers {
        s.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiles_over_one_chunk_stream_in_chunks_both_ways() {
    // 512-pixel blocks, one region per block row: each tile (1024 x 514
    // 16-bit samples) is more than 1 MiB.
    let env = Env::new();
    let server = env.start_node("storage-1", "", &[]).await;
    let mut c = env.client(&server, "gateway").await;
    let image = head_phantom(1024, 1024, 1, PixelFormat::gray16(12, false), 2).unwrap();
    let map = RegionMap::new(
        BlockGrid::new(1024, 1024, 512).unwrap(),
        2,
        vec![0, 0, 1, 1],
    )
    .unwrap();
    let fragments = make_fragments(&image, &map, Operation::Unsharp.halo()).unwrap();
    let msgs: Vec<_> = process_requests(fragments[0].clone(), Operation::Unsharp, None).collect();
    assert!(
        msgs.iter()
            .any(|m| matches!(&m.msg, Some(Req::Samples(s)) if s.len() == CHUNK_BYTES))
    );
    let mut outputs = Vec::new();
    for f in &fragments {
        outputs.push(
            process_fragment(&mut c, f, Operation::Unsharp, None)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        merge(image.spec(), &outputs).unwrap(),
        process_whole(&image, Operation::Unsharp).unwrap()
    );
    server.shutdown(Duration::from_secs(5)).await;
}

fn fragment() -> (Image, Vec<Fragment>) {
    let image = head_phantom(64, 48, 1, PixelFormat::gray16(12, false), 1).unwrap();
    let map = RegionMap::new(
        BlockGrid::new(64, 48, 16).unwrap(),
        2,
        vec![0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0],
    )
    .unwrap();
    let fragments = make_fragments(&image, &map, 2).unwrap();
    (image, fragments)
}

#[tokio::test]
async fn bad_process_input_gets_clear_statuses() {
    let env = Env::new();
    // 1 MiB per fragment on this node.
    let server = env
        .start_node("storage-1", "[process]\nmax_fragment_bytes = 1048576", &[])
        .await;
    let mut c = env.client(&server, "gateway").await;
    let (image, fragments) = fragment();
    let f = &fragments[0];
    let good: Vec<_> = process_requests(f.clone(), Operation::Gaussian, None).collect();
    let tile_at: Vec<usize> = good
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.msg, Some(Req::Tile(_))))
        .map(|(i, _)| i)
        .collect();
    let with_start = |g: &dyn Fn(&mut pb::ProcessStart)| {
        let mut v = good.clone();
        if let Some(Req::Start(s)) = &mut v[0].msg {
            g(s);
        }
        v
    };
    let header = |g: &dyn Fn(&mut tessera_proto::segmentation::v1::FragmentHeader)| {
        with_start(&|s| g(s.fragment.as_mut().unwrap()))
    };
    let mut outside = good.clone();
    if let Some(Req::Tile(t)) = &mut outside[tile_at[0]].msg {
        let r = t.rect.as_mut().unwrap();
        r.x = 60; // 60 + width > 64
    }
    let mut extra_tile = good.clone();
    extra_tile.push(good[tile_at[0]].clone());
    let mut big_chunk = good.clone();
    big_chunk.insert(
        tile_at[0] + 1,
        pb::ProcessRequest {
            msg: Some(Req::Samples(vec![0; CHUNK_BYTES + 2])),
        },
    );
    let sample_count = {
        let Some(Req::Start(s)) = &good[0].msg else {
            unreachable!()
        };
        s.fragment.unwrap().sample_count
    };
    let mut histeq_no_mapping = good.clone();
    if let Some(Req::Start(s)) = &mut histeq_no_mapping[0].msg {
        s.operation = tessera_proto::segmentation::v1::Operation::Histeq.into();
    }
    let cases: Vec<(&str, Vec<pb::ProcessRequest>, Code, &str)> = vec![
        ("empty stream", vec![], Code::InvalidArgument, "start"),
        (
            "start missing",
            good[1..].to_vec(),
            Code::InvalidArgument,
            "start",
        ),
        (
            "start only",
            good[..1].to_vec(),
            Code::InvalidArgument,
            "blocks",
        ),
        (
            "no fragment header",
            with_start(&|s| s.fragment = None),
            Code::InvalidArgument,
            "start.fragment",
        ),
        (
            "no operation",
            with_start(&|s| s.operation = 0),
            Code::InvalidArgument,
            "start.operation",
        ),
        (
            "tile outside the image",
            outside,
            Code::InvalidArgument,
            "outside",
        ),
        (
            "samples count lying (more)",
            header(&|h| h.sample_count += 7),
            Code::InvalidArgument,
            "sample_count",
        ),
        (
            "samples count lying (fewer)",
            header(&|h| h.sample_count -= 7),
            Code::InvalidArgument,
            "sample_count",
        ),
        (
            "too many tiles",
            extra_tile,
            Code::InvalidArgument,
            "more tiles",
        ),
        (
            "tile_count over block_count",
            header(&|h| h.tile_count = h.block_count + 1),
            Code::InvalidArgument,
            "tile_count",
        ),
        (
            "halo below the operation's",
            header(&|h| h.halo = 1),
            Code::InvalidArgument,
            "halo",
        ),
        (
            "histeq without a mapping",
            histeq_no_mapping,
            Code::InvalidArgument,
            "mapping",
        ),
        (
            "a samples chunk over 1 MiB",
            big_chunk,
            Code::InvalidArgument,
            "1048576",
        ),
        (
            "fragment over max_fragment_bytes",
            header(&|h| h.sample_count = sample_count * 1000),
            Code::ResourceExhausted,
            "start.fragment",
        ),
        (
            "too many blocks",
            header(&|h| {
                let spec = h.spec.as_mut().unwrap();
                (spec.width, spec.height) = (16384, 16384);
                h.block_size = 8;
                h.block_count = 2_000_000;
            }),
            Code::ResourceExhausted,
            "block_count",
        ),
    ];
    for (name, msgs, code, needle) in cases {
        let e = call(&mut c, msgs).await.unwrap_err();
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(e.message().contains(needle), "{name}: {:?}", e.message());
    }
    // A message over 4 MiB: refused by the transport limit.
    let raw = StorageNodeClient::new(env.channel(&server, "gateway").await)
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut huge = good.clone();
    huge.insert(
        1,
        pb::ProcessRequest {
            msg: Some(Req::Samples(vec![0; 5 * 1024 * 1024])),
        },
    );
    let e = call(&mut raw.clone(), huge).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // The client helper refuses a histeq call without its mapping, and a
    // local operation with one, before sending.
    let mapping = histeq_mapping(image.spec(), &fragments).unwrap();
    let e = process_fragment(&mut c, f, Operation::HistEq, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = process_fragment(&mut c, f, Operation::Median, Some(&mapping))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The node is still fine: the valid request works.
    assert!(call(&mut c, good).await.unwrap() > 1);
    let out = process_fragment(&mut c, f, Operation::HistEq, Some(&mapping))
        .await
        .unwrap();
    assert_eq!(out, f.apply_mapping(&mapping).unwrap());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn only_the_configured_callers_may_process() {
    let env = Env::new();
    let (_, fragments) = fragment();
    let f = &fragments[1];
    // The outsider is made an admin: admins may manage the node but not
    // see fragments.
    let server = env
        .start_node(
            "storage-1",
            "",
            &[(
                "TESSERA_STORAGE__SERVER__ACCESS__ROLES",
                "{ \"spiffe://tessera.local/user/outsider\" = [\"admin\"] }",
            )],
        )
        .await;
    let mut gw = env.client(&server, "gateway").await;
    process_fragment(&mut gw, f, Operation::Sobel, None)
        .await
        .unwrap();
    for who in [
        "keyserver",
        "watermark",
        "segmentation",
        "storage-2",
        "owner",
        "outsider",
    ] {
        let mut c = env.client(&server, who).await;
        let e = process_fragment(&mut c, f, Operation::Sobel, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }
    // The admin still reads the node's info; nobody but the gateway
    // stores, not even another service.
    let mut admin = env.client(&server, "outsider").await;
    admin.node_info(pb::NodeInfoRequest {}).await.unwrap();
    let e = put_object(&mut env.client(&server, "keyserver").await, "k", b"x")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    put_object(&mut env.client(&server, "gateway").await, "k", b"x")
        .await
        .unwrap();
    server.shutdown(Duration::from_secs(5)).await;

    // Another allow-list replaces the default: a second identity holding
    // the gateway role (config) is the only one allowed to process; the
    // dev gateway, role or not, is then refused by the list.
    let server = env
        .start_node(
            "storage-2",
            "[process]\nallowed_callers = [\"spiffe://tessera.local/service/keyserver\"]",
            &[(
                "TESSERA_STORAGE__SERVER__ACCESS__ROLES",
                "{ \"spiffe://tessera.local/service/keyserver\" = [\"gateway\"] }",
            )],
        )
        .await;
    let mut ks = env.client(&server, "keyserver").await;
    process_fragment(&mut ks, f, Operation::Median, None)
        .await
        .unwrap();
    let mut gw = env.client(&server, "gateway").await;
    let e = process_fragment(&mut gw, f, Operation::Median, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_calls_beyond_max_concurrent_wait_for_a_slot() {
    let env = Env::new();
    let server = env
        .start_node("storage-1", "[process]\nmax_concurrent = 1", &[])
        .await;
    let (_, fragments) = fragment();
    let f = fragments[0].clone();
    let msgs: Vec<_> = process_requests(f.clone(), Operation::Gaussian, None).collect();
    // Call 1 takes the only slot and keeps its request stream open.
    let (tx, rx) = tokio::sync::mpsc::channel(msgs.len());
    let mut c1 = env.client(&server, "gateway").await;
    let first = tokio::spawn(async move {
        let mut s = c1
            .process(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut n = 0;
        while s.message().await?.is_some() {
            n += 1;
        }
        Ok::<usize, Status>(n)
    });
    let half = msgs.len() / 2;
    for m in &msgs[..half] {
        tx.send(m.clone()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Call 2 waits for the slot...
    let mut c2 = env.client(&server, "gateway").await;
    let second =
        tokio::spawn(async move { process_fragment(&mut c2, &f, Operation::Gaussian, None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second call must wait for the slot"
    );
    assert!(!first.is_finished());
    // ... and runs once call 1 completes.
    for m in &msgs[half..] {
        tx.send(m.clone()).await.unwrap();
    }
    drop(tx);
    assert!(first.await.unwrap().unwrap() > 1);
    let out = second.await.unwrap().unwrap();
    assert_eq!(out, fragments[0].apply(Operation::Gaussian).unwrap());
    server.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn process_config_is_validated() {
    let env = Env::new();
    let text = env.config_toml("127.0.0.1:0", "");
    let cfg: Config = load_config(
        &ConfigSource::from_text(&text, BTreeMap::new()),
        "TESSERA_STORAGE",
    )
    .unwrap();
    assert_eq!(
        cfg.process.allowed_callers,
        ["spiffe://tessera.local/service/gateway"]
    );
    for (key, value) in [
        ("TESSERA_STORAGE__PROCESS__MAX_FRAGMENT_BYTES", "0"),
        ("TESSERA_STORAGE__PROCESS__MAX_FRAGMENT_BYTES", "2147483648"),
        ("TESSERA_STORAGE__PROCESS__MAX_CONCURRENT", "0"),
        ("TESSERA_STORAGE__PROCESS__MAX_CONCURRENT", "65"),
        ("TESSERA_STORAGE__PROCESS__ALLOWED_CALLERS", "[]"),
        ("TESSERA_STORAGE__PROCESS__ALLOWED_CALLERS", "[\"gateway\"]"),
        ("TESSERA_STORAGE__PROCESS__UNKNOWN", "1"),
    ] {
        let vars = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        let r = load_config::<Config>(&ConfigSource::from_text(&text, vars), "TESSERA_STORAGE");
        assert!(r.is_err(), "{key}={value} must be refused");
    }
    let vars = BTreeMap::from([(
        "TESSERA_STORAGE__PROCESS__MAX_CONCURRENT".to_owned(),
        "5".to_owned(),
    )]);
    let cfg: Config =
        load_config(&ConfigSource::from_text(&text, vars), "TESSERA_STORAGE").unwrap();
    assert_eq!(cfg.process.max_concurrent, 5);
}

//! Integration tests: a real keyserver and the real watermark service
//! in-process on 127.0.0.1:0 with a generated development PKI, called over
//! mutual TLS by one client per identity.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use tessera_image::PixelFormat;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::watermark::v1 as pb;
use tessera_proto::watermark::v1::watermark_client::WatermarkClient;
use tessera_tls::TlsFiles;
use tonic::{Code, Status};
use watermark_service::convert::CHUNK_BYTES;

use common::*;

#[tokio::test]
async fn protect_restore_verify_and_localize_tampering() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    let mut gw = env.client("gateway").await;
    let image = phantom();
    let pixels = image.to_le_bytes();
    assert_eq!(pixels.len(), 512 * 1024);

    let p = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &pixels, 100_000),
    )
    .await
    .unwrap();
    let header = tessera_cryptomark::Header::from_json(&p.header_json).unwrap();
    assert_eq!(header.object_id, "obj-1");
    assert_eq!(header.profile, tessera_cryptomark::Profile::Secure);
    assert!(p.shares[0] != p.shares[1]);

    // Restore: bit-identical pixels and an intact report.
    let (restored, back) = restore(
        &mut gw,
        restore_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            share_chunks(&p.shares[0], &p.shares[1]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(back, pixels);
    assert_eq!(
        restored.spec.unwrap(),
        watermark_service::convert::spec_to_proto(image.spec())
    );
    let report = restored.report.unwrap();
    assert!(report.intact);
    assert!(report.roi_blocks > 0);

    let intact = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            share_chunks(&p.shares[0], &p.shares[1]),
        ),
    )
    .await
    .unwrap();
    assert!(intact.intact);
    assert_eq!(intact.tampered_block_count + intact.tampered_tile_count, 0);

    // One byte of share 2 changed: exactly one tile, of share 2, is named.
    let mut bad = p.shares[1].clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    let r = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            share_chunks(&p.shares[0], &bad),
        ),
    )
    .await
    .unwrap();
    assert!(!r.intact);
    assert_eq!(r.tampered_tile_count, 1, "{r:?}");
    assert_eq!(r.tampered_tiles[0].shares, vec![2]);
    assert_eq!(r.tampered_block_count, 1, "{r:?}");
    // The block whose hash no longer matches is the one in that tile.
    assert_eq!(r.tampered_blocks[0].rect, r.tampered_tiles[0].rect);
    assert!(!r.truncated);
    let rect = r.tampered_tiles[0].rect.unwrap();
    assert!(rect.width <= 16 && rect.height <= 16);

    // Swapped shares are refused as a failed precondition.
    let e = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            share_chunks(&p.shares[1], &p.shares[0]),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    env.stop().await;
}

#[tokio::test]
async fn keys_are_bound_to_the_study_and_its_attributes() {
    let env = Env::start().await;
    let a = env.register("P-A").await;
    let b = env.register("P-B").await;
    let mut gw = env.client("gateway").await;
    let image = phantom();
    let pixels = image.to_le_bytes();

    // Wrong attributes: the keyserver refuses the key.
    let e = protect(
        &mut gw,
        protect_msgs(start(&a, "P-B", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("keyserver"), "{e:?}");

    // Unknown study.
    let e = protect(
        &mut gw,
        protect_msgs(
            start("st-0123456789abcdef0123456789abcdef", "P-A", &image),
            &pixels,
            CHUNK_BYTES,
        ),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let p = protect(
        &mut gw,
        protect_msgs(start(&a, "P-A", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .unwrap();
    let shares = || share_chunks(&p.shares[0], &p.shares[1]);
    // Right study, wrong attributes.
    let e = verify(
        &mut gw,
        verify_msgs(open_start(study(&a, "P-B"), &p.header_json), shares()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Another study's (valid) key does not open these shares.
    let e = restore(
        &mut gw,
        restore_msgs(open_start(study(&b, "P-B"), &p.header_json), shares()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    env.stop().await;
}

#[tokio::test]
async fn only_allowed_callers_may_call() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    let image = phantom();
    let pixels = image.to_le_bytes();
    // outsider: no role (policy layer); storage-1: service role but not in
    // allowed_callers (handler); owner: a user.
    for who in ["outsider", "storage-1", "owner", "watermark"] {
        let mut c = env.client(who).await;
        let e = protect(
            &mut c,
            protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
        let e = verify(
            &mut c,
            verify_msgs(open_start(study(&id, "P-1"), "{}"), vec![]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }
    env.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_input_is_refused() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    let mut gw = env.client("gateway").await;
    let image = phantom();
    let pixels = image.to_le_bytes();
    let code = |r: Result<Protected, Status>| r.err().map(|e| e.code());

    // Pixels before start.
    let mut msgs = protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES);
    msgs.swap(0, 1);
    assert_eq!(
        code(protect(&mut gw, msgs).await),
        Some(Code::InvalidArgument)
    );
    // Paper profile is offline-only.
    let mut s = start(&id, "P-1", &image);
    s.profile = pb::Profile::Paper.into();
    let e = protect(&mut gw, protect_msgs(s, &pixels, CHUNK_BYTES))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("offline-only"));
    // Too few and too many pixels.
    assert_eq!(
        code(
            protect(
                &mut gw,
                protect_msgs(start(&id, "P-1", &image), &pixels[2..], CHUNK_BYTES)
            )
            .await
        ),
        Some(Code::InvalidArgument)
    );
    let mut more = pixels.clone();
    more.extend_from_slice(&[0, 0]);
    assert_eq!(
        code(
            protect(
                &mut gw,
                protect_msgs(start(&id, "P-1", &image), &more, CHUNK_BYTES)
            )
            .await
        ),
        Some(Code::InvalidArgument)
    );
    // A bad spec: bits_stored above bits_allocated.
    let mut s = start(&id, "P-1", &image);
    s.spec.as_mut().unwrap().bits_stored = 17;
    let e = protect(&mut gw, protect_msgs(s, &pixels, CHUNK_BYTES))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("start.spec"), "{e:?}");
    // Over MAX_SAMPLES: refused by the spec check, nothing allocated.
    let mut s = start(&id, "P-1", &image);
    let sp = s.spec.as_mut().unwrap();
    (sp.width, sp.height, sp.frames) = (65_536, 65_536, 1);
    s.roi = None;
    assert_eq!(
        code(protect(&mut gw, protect_msgs(s, &[], CHUNK_BYTES)).await),
        Some(Code::InvalidArgument)
    );
    // Over the configured max_image_bytes (1 MiB here): 1024x1024x16 bits.
    let mut s = start(&id, "P-1", &image);
    let sp = s.spec.as_mut().unwrap();
    (sp.width, sp.height) = (1024, 1024);
    assert_eq!(
        code(protect(&mut gw, protect_msgs(s, &[], CHUNK_BYTES)).await),
        Some(Code::ResourceExhausted)
    );
    // A message over the 1 MiB chunk limit (plus framing) is refused by the decoder.
    let big = vec![0u8; 2 * CHUNK_BYTES];
    let mut s = start(&id, "P-1", &image);
    let sp = s.spec.as_mut().unwrap();
    (sp.width, sp.height) = (1024, 512);
    s.roi = None;
    let e = protect(&mut gw, protect_msgs(s, &big, big.len()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Restore/Verify: bad header, bad share index, missing share.
    let e = verify(
        &mut gw,
        verify_msgs(open_start(study(&id, "P-1"), "{not json"), vec![]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("start.header_json"), "{e:?}");
    let p = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .unwrap();
    let chunk = |share, data: &[u8]| pb::ShareChunk {
        share,
        data: data.to_vec(),
    };
    let e = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            vec![chunk(3, &p.shares[0][..10])],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            vec![chunk(1, &p.shares[0])],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("share 2 is missing"), "{e:?}");
    // A truncated share is a format error, not a key error.
    let e = verify(
        &mut gw,
        verify_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            vec![
                chunk(1, &p.shares[0]),
                chunk(2, &p.shares[1][..p.shares[1].len() - 1]),
            ],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    env.stop().await;
}

#[tokio::test]
async fn keyserver_down_is_unavailable() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    // A second watermark service whose keyserver address has nothing behind it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cfg = watermark_config(&env.pki, &closed, BTreeMap::new());
    let wm = watermark_service::App::build(&cfg)
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let addr = wm.local_addr().to_string();
    let mut gw = WatermarkClient::new(env.channel("gateway", &addr).await);
    let image = phantom();
    let e = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &image.to_le_bytes(), CHUNK_BYTES),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("keyserver"), "{e:?}");
    wm.shutdown(Duration::from_secs(5)).await;
    env.stop().await;
}

#[tokio::test]
async fn another_service_at_the_keyserver_address_is_refused() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    // The keyserver address leads to the watermark service itself: its
    // certificate chains to our CA and names 127.0.0.1, but its identity
    // is not the keyserver's, so no DeriveKey is ever sent there.
    let cfg = watermark_config(&env.pki, &env.wm_addr, BTreeMap::new());
    let wm = watermark_service::App::build(&cfg)
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let addr = wm.local_addr().to_string();
    let mut gw = WatermarkClient::new(env.channel("gateway", &addr).await);
    let image = phantom();
    let e = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &image.to_le_bytes(), CHUNK_BYTES),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("keyserver"), "{e:?}");
    wm.shutdown(Duration::from_secs(5)).await;
    env.stop().await;
}

/// A keyserver that accepts the TLS connection and every call, and never
/// answers.
#[derive(Clone)]
struct HungKeyserver;

impl tonic::server::NamedService for HungKeyserver {
    const NAME: &'static str = "tessera.keyserver.v1.KeyServer";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for HungKeyserver {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::pending()
    }
}

#[tokio::test]
async fn a_hung_keyserver_fails_the_call_instead_of_holding_it() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    // The hung keyserver holds the real keyserver certificate.
    let tls = tessera_tls::ServerTls::from_files(
        &TlsFiles::from_pki_dir(&env.pki, "keyserver"),
        tessera_tls::DEFAULT_TRUST_DOMAIN,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = listener.local_addr().unwrap().to_string();
    let incoming = tessera_tls::incoming(listener, &tls);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HungKeyserver)
            .serve_with_incoming(incoming),
    );
    let cfg = watermark_config(
        &env.pki,
        &hung,
        BTreeMap::from([(
            "TESSERA_WATERMARK__KEYSERVER__CALL_TIMEOUT_SECS".to_string(),
            "1".to_string(),
        )]),
    );
    let wm = watermark_service::App::build(&cfg)
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let addr = wm.local_addr().to_string();
    let mut gw = WatermarkClient::new(env.channel("gateway", &addr).await);
    let image = phantom();
    // The outer bound only turns a hang (the bug) into a failure.
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        protect(
            &mut gw,
            protect_msgs(start(&id, "P-1", &image), &image.to_le_bytes(), CHUNK_BYTES),
        ),
    )
    .await
    .expect("the watermark service waited on the hung keyserver without a deadline")
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("keyserver"), "{e:?}");
    wm.shutdown(Duration::from_secs(5)).await;
    server.abort();
    env.stop().await;
}

#[tokio::test]
async fn multi_frame_image_streams_in_several_chunks_each_way() {
    // 512x512x5 16-bit = 2.5 MiB: several chunks in, shares of more than
    // 1 MiB each out, several pixel chunks back.
    let env = Env::start_with(BTreeMap::from([(
        "TESSERA_WATERMARK__WATERMARK__MAX_IMAGE_BYTES".to_string(),
        "4194304".to_string(),
    )]))
    .await;
    let id = env.register("P-1").await;
    let mut gw = env.client("gateway").await;
    let image =
        tessera_image::phantom::head_phantom(512, 512, 5, PixelFormat::gray16(16, false), 3)
            .unwrap();
    let pixels = image.to_le_bytes();
    let p = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .unwrap();
    assert!(p.shares.iter().all(|s| s.len() > CHUNK_BYTES));
    let (restored, back) = restore(
        &mut gw,
        restore_msgs(
            open_start(study(&id, "P-1"), &p.header_json),
            share_chunks(&p.shares[0], &p.shares[1]),
        ),
    )
    .await
    .unwrap();
    assert!(restored.report.unwrap().intact);
    assert_eq!(restored.spec.unwrap().frames, 5);
    assert!(back == pixels, "restored pixels differ");
    env.stop().await;
}

/// A protect key is reused for the same study and attributes (no keyserver
/// needed the second time); other attributes and every restore still go to
/// the keyserver.
#[tokio::test]
async fn protect_keys_are_reused_per_study_and_attributes_restore_keys_never() {
    let mut env = Env::start().await;
    let id = env.register("P-1").await;
    let mut gw = env.client("gateway").await;
    let image = phantom();
    let pixels = image.to_le_bytes();
    let first = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .unwrap();
    if let Some(k) = env.keyserver.take() {
        k.shutdown(Duration::from_secs(5)).await;
    }
    // The keyserver is gone: the key derived a moment ago protects again.
    let second = protect(
        &mut gw,
        protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .unwrap();
    assert_ne!(first.shares, second.shares, "a fresh salt per protect");
    // Other attributes are never answered from the cache.
    let e = protect(
        &mut gw,
        protect_msgs(start(&id, "P-2", &image), &pixels, CHUNK_BYTES),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Nor is a restore key, even for the study whose protect key is kept.
    let shares = share_chunks(&second.shares[0], &second.shares[1]);
    let e = restore(
        &mut gw,
        restore_msgs(open_start(study(&id, "P-1"), &second.header_json), shares),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    env.stop().await;
}

/// ForgetStudy at the keyserver, then at the watermark service (what the
/// gateway's delete does): the study's protect key kept by the watermark
/// service is dropped, so the next protect asks the keyserver, which
/// refuses the forgotten study.
#[tokio::test]
async fn a_forgotten_study_s_protect_key_is_no_longer_served_from_cache() {
    let env = Env::start().await;
    let id = env.register("P-1").await;
    let mut gw = env.client("gateway").await;
    let image = phantom();
    let pixels = image.to_le_bytes();
    let msgs = || protect_msgs(start(&id, "P-1", &image), &pixels, CHUNK_BYTES);
    protect(&mut gw, msgs()).await.unwrap();
    KeyServerClient::new(env.channel("gateway", &env.ks_addr).await)
        .forget_study(ks::ForgetStudyRequest {
            study_id: id.clone(),
            on_behalf_of: OWNER.into(),
        })
        .await
        .unwrap();
    // Forgotten at the keyserver only: the kept key still protects (the
    // cache is what serves it; the keyserver would refuse).
    protect(&mut gw, msgs()).await.unwrap();
    // Only the gateway may drop keys.
    let e = env
        .client("owner")
        .await
        .forget_study(pb::ForgetStudyRequest {
            study_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let r = gw
        .forget_study(pb::ForgetStudyRequest {
            study_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keys_dropped, 1);
    let e = protect(&mut gw, msgs()).await.err().unwrap();
    // Derived again at the keyserver, which no longer knows the study.
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Nothing kept any more.
    let r = gw
        .forget_study(pb::ForgetStudyRequest { study_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keys_dropped, 0);
    env.stop().await;
}

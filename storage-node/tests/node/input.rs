//! Requests no generated client would send (undecodable messages), the
//! configuration's environment overrides and validation, and the bench.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use storage_node::Config;
use tessera_runtime::{ConfigSource, load_config};
use tonic::Code;

/// Sends and receives message bodies as raw bytes: a client that can send
/// what no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Requests that do not parse as their protobuf message (a string field
/// sent as a varint, a string that is not UTF-8) are the caller's error:
/// INVALID_ARGUMENT on unary RPCs and on the client stream of Put, never
/// INTERNAL.
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let env = Env::new();
    let server = env.start().await;
    let mut grpc = tonic::client::Grpc::new(env.channel(&server, "gateway").await);
    let wrong_wire_type = vec![0x08, 0x01]; // field 1 (a string) as a varint
    let bad_utf8 = vec![0x0a, 0x02, 0xff, 0xfe]; // field 1 = invalid UTF-8
    for (what, body) in [("wire type", &wrong_wire_type), ("utf-8", &bad_utf8)] {
        for path in [
            "/tessera.storage.v1.StorageNode/Stat",
            "/tessera.storage.v1.StorageNode/Delete",
        ] {
            grpc.ready().await.unwrap();
            let e = grpc
                .unary::<_, Vec<u8>, _>(
                    tonic::Request::new(body.clone()),
                    http::uri::PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{path} {what}: {e:?}");
            assert!(e.message().contains("decode"), "{}", e.message());
        }
        // Put: a first message that does not decode.
        grpc.ready().await.unwrap();
        let e = grpc
            .client_streaming::<_, _, Vec<u8>, _>(
                tonic::Request::new(tokio_stream::iter(vec![body.clone()])),
                http::uri::PathAndQuery::from_static("/tessera.storage.v1.StorageNode/Put"),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "put {what}: {e:?}");
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn config_env_overrides_and_validation() {
    let env = Env::new();
    let text = env.config_toml("127.0.0.1:7000", "");
    let overrides: BTreeMap<String, String> = [
        ("TESSERA_STORAGE__SERVER__LISTEN", "127.0.0.1:0"),
        ("TESSERA_STORAGE__NODE_ID", "storage-2"),
        ("TESSERA_STORAGE__CAPACITY_BYTES", "1048576"),
        ("TESSERA_STORAGE__MAX_OBJECT_BYTES", "1024"),
        (
            "TESSERA_STORAGE__SERVER__ACCESS__ROLES",
            "{ \"spiffe://tessera.local/user/outsider\" = [\"admin\"] }",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let cfg: Config = load_config(
        &ConfigSource::from_text(&text, overrides),
        "TESSERA_STORAGE",
    )
    .unwrap();
    assert_eq!(cfg.server.listen.port(), 0);
    assert_eq!(cfg.node_id, "storage-2");
    assert_eq!(cfg.capacity_bytes, 1_048_576);
    assert_eq!(
        cfg.server.access.roles["spiffe://tessera.local/user/outsider"],
        [tessera_tls::Role::Admin]
    );

    for (key, value) in [
        ("TESSERA_STORAGE__NODE_ID", "Bad Name"),
        ("TESSERA_STORAGE__MAX_OBJECT_BYTES", "0"),
        ("TESSERA_STORAGE__MAX_OBJECT_BYTES", "999999999999"),
        ("TESSERA_STORAGE__SERVER__TLS__CA", "/nonexistent/ca.crt"),
        ("TESSERA_STORAGE__SERVER__LISTEN", "not-an-address"),
        ("TESSERA_STORAGE__SERVER__STREAM_IDLE_TIMEOUT_SECS", "0"),
        ("TESSERA_STORAGE__MAX_CONCURRENT_GETS", "0"),
        ("TESSERA_STORAGE__UNKNOWN_KEY", "1"),
        (
            "TESSERA_STORAGE__TELEMETRY__OTLP_ENDPOINT",
            "localhost:4317",
        ),
    ] {
        let env_map = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        let r = load_config::<Config>(&ConfigSource::from_text(&text, env_map), "TESSERA_STORAGE");
        assert!(r.is_err(), "{key}={value} must be refused");
    }
}

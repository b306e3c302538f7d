//! Integration tests: the real storage node, in-process on 127.0.0.1:0 (and
//! as a real process for crash safety), real mTLS with a generated PKI, real
//! redb files.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::ReadableTable;
use sha2::{Digest, Sha256};
use storage_node::{App, Config};
use tessera_pki::DevPki;
use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_runtime::{ConfigSource, RunningServer, load_config};
use tessera_storage_client::{client, get_object, put_messages, put_object};
use tessera_tls::{ClientTls, TlsFiles};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Env {
    tmp: tempfile::TempDir,
    pki: DevPki,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap();
        Self { tmp, pki }
    }

    fn config_toml(&self, listen: &str, extra: &str) -> String {
        format!(
            "node_id = \"storage-1\"\ndata_dir = {data:?}\ncapacity_bytes = {cap}\n\
             max_object_bytes = {max}\n{extra}\n[server]\nlisten = {listen:?}\n\
             [server.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            data = self.tmp.path().join("data").display().to_string(),
            cap = 24 * 1024 * 1024,
            max = 8 * 1024 * 1024,
            ca = self.pki.ca_path().display().to_string(),
            cert = self.pki.cert_path("storage-1").display().to_string(),
            key = self.pki.key_path("storage-1").display().to_string(),
        )
    }

    fn config(&self) -> Config {
        load_config(
            &ConfigSource::from_text(&self.config_toml("127.0.0.1:0", ""), BTreeMap::new()),
            "TESSERA_STORAGE",
        )
        .unwrap()
    }

    async fn start(&self) -> RunningServer {
        App::build(self.config()).unwrap().spawn().await.unwrap()
    }

    /// A node with `TESSERA_STORAGE__*` overrides.
    async fn start_with(&self, overrides: &[(&str, &str)]) -> RunningServer {
        let env = overrides
            .iter()
            .map(|(k, v)| (format!("TESSERA_STORAGE__{k}"), (*v).to_owned()))
            .collect();
        let config = load_config(
            &ConfigSource::from_text(&self.config_toml("127.0.0.1:0", ""), env),
            "TESSERA_STORAGE",
        )
        .unwrap();
        App::build(config).unwrap().spawn().await.unwrap()
    }

    fn tls(&self, name: &str) -> ClientTls {
        ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki.dir, name)).unwrap()
    }

    async fn channel(&self, server: &RunningServer, name: &str) -> Channel {
        self.tls(name)
            .connect(&server.local_addr().to_string())
            .await
            .unwrap()
    }

    async fn client(&self, server: &RunningServer, name: &str) -> StorageNodeClient<Channel> {
        client(self.channel(server, name).await)
    }
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn put_get_stat_list_delete() {
    let env = Env::new();
    let server = env.start().await;
    let mut c = env.client(&server, "gateway").await;

    // Multi-chunk object: 2.5 MiB goes as three 1 MiB-or-less messages.
    let big = data(5 * 512 * 1024, 1);
    let put = put_object(&mut c, "share-a", &big).await.unwrap();
    assert!(put.created);
    let info = put.info.unwrap();
    assert_eq!(info.size, big.len() as u64);
    assert_eq!(info.sha256, Sha256::digest(&big).to_vec());

    let (got_info, got) = get_object(&mut c, "share-a").await.unwrap();
    assert_eq!(got, big);
    assert_eq!(got_info, info);

    // Idempotent put, conflicting put.
    let again = put_object(&mut c, "share-a", &big).await.unwrap();
    assert!(!again.created);
    let err = put_object(&mut c, "share-a", &data(10, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    put_object(&mut c, "share-b", b"hello").await.unwrap();
    put_object(&mut c, "other", b"").await.unwrap();

    let stat = c
        .stat(pb::StatRequest {
            object_id: "share-b".into(),
            verify: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, 5);

    let list = c
        .list(pb::ListRequest {
            prefix: "share-".into(),
            start_after: String::new(),
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.objects.len(), 1);
    assert_eq!(list.objects[0].object_id, "share-a");
    assert_eq!(list.next_start_after, "share-a");
    let rest = c
        .list(pb::ListRequest {
            prefix: "share-".into(),
            start_after: list.next_start_after,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = rest.objects.iter().map(|o| o.object_id.as_str()).collect();
    assert_eq!(ids, ["share-b"]);
    assert!(rest.next_start_after.is_empty());

    let info = c
        .node_info(pb::NodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "storage-1");
    assert_eq!(info.object_count, 3);
    assert_eq!(info.used_bytes, big.len() as u64 + 5);
    assert_eq!(info.instance_id.len(), 32);

    let del = c
        .delete(pb::DeleteRequest {
            object_id: "share-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.size, big.len() as u64);
    let err = get_object(&mut c, "share-a").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_input_gets_clear_statuses() {
    let env = Env::new();
    let server = env.start().await;
    let mut c = env.client(&server, "gateway").await;

    // Malformed ids.
    for id in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
        let e = get_object(&mut c, id).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "get {id:?}");
        let e = put_object(&mut c, id, b"x").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "put {id:?}");
    }
    // Unknown object.
    for e in [
        get_object(&mut c, "nope").await.unwrap_err(),
        c.stat(pb::StatRequest {
            object_id: "nope".into(),
            verify: false,
        })
        .await
        .unwrap_err(),
        c.delete(pb::DeleteRequest {
            object_id: "nope".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("nope"));
    }
    // A message over 4 MiB.
    let header = pb::PutRequest {
        part: Some(pb::put_request::Part::Header(pb::PutHeader {
            object_id: "big-msg".into(),
            size: 5 * 1024 * 1024,
            sha256: vec![],
        })),
    };
    let huge = pb::PutRequest {
        part: Some(pb::put_request::Part::Chunk(vec![7u8; 5 * 1024 * 1024])),
    };
    // The client refuses to encode it with our limits; a raw client without
    // limits sends it and the server refuses it.
    let raw = StorageNodeClient::new(env.channel(&server, "gateway").await)
        .max_encoding_message_size(64 * 1024 * 1024);
    let e = raw
        .clone()
        .put(tokio_stream::iter(vec![header.clone(), huge.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Our own client (4 MiB encoding limit) refuses to send it at all.
    let e = c
        .put(tokio_stream::iter(vec![header, huge]))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // A unary request over the limit is refused before any handler runs.
    let e = raw
        .clone()
        .stat(pb::StatRequest {
            object_id: "x".repeat(5 * 1024 * 1024),
            verify: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Object larger than max_object_bytes (8 MiB): refused from the header.
    let e = c
        .put(tokio_stream::iter(vec![pb::PutRequest {
            part: Some(pb::put_request::Part::Header(pb::PutHeader {
                object_id: "too-big".into(),
                size: 9 * 1024 * 1024,
                sha256: vec![],
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Capacity (24 MiB): three 8 MiB objects fit, a fourth does not.
    for i in 0..3 {
        put_object(&mut c, &format!("fill-{i}"), &data(8 * 1024 * 1024, i))
            .await
            .unwrap();
    }
    let e = put_object(&mut c, "fill-3", b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    c.delete(pb::DeleteRequest {
        object_id: "fill-0".into(),
    })
    .await
    .unwrap();

    // Stream shape errors.
    let chunk = |b: &[u8]| pb::PutRequest {
        part: Some(pb::put_request::Part::Chunk(b.to_vec())),
    };
    let mut short = put_messages("short", b"hello");
    short.pop();
    let mut long = put_messages("long", b"hello");
    long.push(chunk(b"!"));
    let mut wrong_digest = put_messages("digest", b"hello");
    if let Some(pb::put_request::Part::Header(h)) = &mut wrong_digest[0].part {
        h.sha256 = vec![0; 32];
    }
    let mut bad_digest_len = put_messages("digest-len", b"hello");
    if let Some(pb::put_request::Part::Header(h)) = &mut bad_digest_len[0].part {
        h.sha256 = vec![1, 2, 3];
    }
    let mut two_headers = put_messages("two", b"hello");
    two_headers.push(two_headers[0].clone());
    for (name, msgs) in [
        ("empty stream", vec![]),
        ("chunk first", vec![chunk(b"x")]),
        ("empty message", vec![pb::PutRequest { part: None }]),
        ("short", short),
        ("long", long),
        ("wrong digest", wrong_digest),
        ("digest length", bad_digest_len),
        ("two headers", two_headers),
    ] {
        let e = c.put(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
    }
    // Nothing half-written: none of those ids exist.
    for id in [
        "short",
        "long",
        "digest",
        "digest-len",
        "two",
        "big-msg",
        "too-big",
    ] {
        let e = get_object(&mut c, id).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
    }
    // A bad list argument.
    let e = c
        .list(pb::ListRequest {
            prefix: "p".repeat(200),
            start_after: String::new(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The node is still fine.
    put_object(&mut c, "after", b"ok").await.unwrap();
    server.shutdown(Duration::from_secs(5)).await;
}

async fn health_ok(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "tessera.storage.v1.StorageNode".into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn mutual_tls_and_roles() {
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr().to_string();

    // The gateway (and admins, for NodeInfo) may call; users, the outsider
    // and every other service, another storage node included, may not.
    for who in [
        "owner",
        "clinician",
        "researcher",
        "outsider",
        "keyserver",
        "watermark",
        "storage-2",
    ] {
        let mut c = env.client(&server, who).await;
        let e = put_object(&mut c, "x", b"x").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
        let e = c.node_info(pb::NodeInfoRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
        // Health needs no role.
        health_ok(env.channel(&server, who).await).await.unwrap();
    }
    for who in ["gateway", "admin"] {
        let mut c = env.client(&server, who).await;
        c.node_info(pb::NodeInfoRequest {}).await.unwrap();
    }

    // Reflection lists exactly this server's services.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut r = ServerReflectionClient::new(env.channel(&server, "gateway").await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection answer {msg:?}");
        };
        let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "tessera.storage.v1.StorageNode"
            ]
        );
    }

    // A certificate from another CA, trusting our CA: the server refuses it.
    let foreign_dir = env.tmp.path().join("foreign");
    let foreign = tessera_pki::generate(&foreign_dir).unwrap();
    let impostor = ClientTls::from_files(&TlsFiles {
        ca: env.pki.ca_path(),
        cert: foreign.cert_path("gateway"),
        key: foreign.key_path("gateway"),
    })
    .unwrap();
    let refused = match impostor.connect(&addr).await {
        Err(_) => true,
        Ok(ch) => health_ok(ch).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");
    // A client that trusts only the foreign CA refuses our server.
    let foreign_client =
        ClientTls::from_files(&TlsFiles::from_pki_dir(&foreign.dir, "gateway")).unwrap();
    assert!(foreign_client.connect(&addr).await.is_err());

    // Plaintext HTTP/2: refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => health_ok(ch).await.is_err(),
    };
    assert!(refused, "plaintext must be refused");

    // The server is still healthy for legitimate callers.
    health_ok(env.channel(&server, "gateway").await)
        .await
        .unwrap();
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bit_rot_is_data_loss_and_data_survives_restart() {
    let env = Env::new();
    let server = env.start().await;
    let mut c = env.client(&server, "gateway").await;
    let victim = data(300_000, 5);
    put_object(&mut c, "victim", &victim).await.unwrap();
    put_object(&mut c, "bystander", &data(1000, 6))
        .await
        .unwrap();
    drop(c);
    server.shutdown(Duration::from_secs(5)).await;

    // Flip one stored bit behind the node's back.
    let db_path = env.config().db_path();
    {
        let db = redb::Database::create(&db_path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(storage_node::store::CHUNKS).unwrap();
            let mut raw = chunks.get(("victim", 0)).unwrap().unwrap().value().to_vec();
            raw[12_345] ^= 0x10;
            chunks.insert(("victim", 0), &raw[..]).unwrap();
        }
        txn.commit().unwrap();
    }

    let server = env.start().await;
    let mut c = env.client(&server, "gateway").await;
    let e = get_object(&mut c, "victim").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("victim"), "{}", e.message());
    let (_, by) = get_object(&mut c, "bystander").await.unwrap();
    assert_eq!(by, data(1000, 6));
    server.shutdown(Duration::from_secs(5)).await;
}

/// Gets are capped: with one slot, a download whose reader stalls holds it
/// (the node reads a bounded number of chunks ahead, so it cannot finish a
/// 20 MiB object into a 4 MiB window) and another Get is refused with
/// RESOURCE_EXHAUSTED after the configured wait; once the first reader goes
/// away the slot is free again.
#[tokio::test]
async fn gets_are_capped_and_stream_in_bounded_chunks() {
    let env = Env::new();
    let server = env
        .start_with(&[
            ("MAX_OBJECT_BYTES", "20971520"),
            ("MAX_CONCURRENT_GETS", "1"),
            ("GET_WAIT_MS", "1500"),
        ])
        .await;
    let mut c = env.client(&server, "gateway").await;
    let big = data(20 * 1024 * 1024, 11);
    put_object(&mut c, "big", &big).await.unwrap();

    let mut stalled = c
        .get(pb::GetRequest {
            object_id: "big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stalled.message().await.unwrap().unwrap();
    assert!(matches!(
        first.part,
        Some(pb::get_response::Part::Info(ref i)) if i.size == big.len() as u64
    ));

    let mut other = env.client(&server, "gateway").await;
    let e = get_object(&mut other, "big").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("downloads"), "{}", e.message());

    drop(stalled);
    let (_, got) = get_object(&mut other, "big").await.unwrap();
    assert!(got == big, "the streamed object differs");
    server.shutdown(Duration::from_secs(5)).await;
}

/// A client that opens a Put, sends its header and stalls is ended with
/// DEADLINE_EXCEEDED after `server.stream_idle_timeout_secs`, and its upload
/// slot is released: the next Put (one slot) succeeds.
#[tokio::test]
async fn stalled_put_times_out_and_frees_its_slot() {
    let env = Env::new();
    let server = env
        .start_with(&[
            ("MAX_CONCURRENT_PUTS", "1"),
            ("SERVER__STREAM_IDLE_TIMEOUT_SECS", "1"),
        ])
        .await;
    let mut c = env.client(&server, "gateway").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut msgs = put_messages("slow", &data(3 * 1024 * 1024, 3));
    tx.send(msgs.remove(0)).await.unwrap();
    tx.send(msgs.remove(0)).await.unwrap();
    // `tx` stays alive: the upload is open and silent.
    let stalled = tokio::time::timeout(
        Duration::from_secs(30),
        c.put(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("a stalled Put must be ended by the idle timeout")
    .unwrap_err();
    assert_eq!(stalled.code(), Code::DeadlineExceeded, "{stalled:?}");
    assert!(
        stalled.message().contains("stream_idle_timeout"),
        "{}",
        stalled.message()
    );
    drop(tx);
    let put = put_object(&mut c, "next", b"fits").await.unwrap();
    assert!(put.created);
    let e = get_object(&mut c, "slow").await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "nothing of the stalled Put is stored"
    );
    server.shutdown(Duration::from_secs(5)).await;
}

/// Reads from a raw socket until the server closes it; panics if it is
/// still open after `within` (the server should have closed it long before).
async fn closed_by_server(sock: &mut tokio::net::TcpStream, within: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue, // a TLS alert, then the close
            Err(_) => panic!("the server kept an idle socket open for {within:?}"),
        }
    }
}

/// TCP peers that connect and never start TLS: past `max_handshakes` they
/// are closed at once (long before the configured 300 s handshake timeout,
/// or the old fixed 10 s); when the idle ones go, real clients are served.
#[tokio::test]
async fn idle_sockets_beyond_the_handshake_cap_are_closed() {
    let env = Env::new();
    let server = env
        .start_with(&[
            ("SERVER__MAX_HANDSHAKES", "2"),
            ("SERVER__HANDSHAKE_TIMEOUT_SECS", "300"),
        ])
        .await;
    let addr = server.local_addr();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Accepted in order: the two idle sockets hold both handshake slots.
    let mut extra = Vec::new();
    for _ in 0..5 {
        extra.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for sock in &mut extra {
        closed_by_server(sock, Duration::from_secs(5)).await;
    }
    drop(idle);
    // The server sees the idle peers go (EOF in the handshake) and frees
    // their slots; a real client is then served.
    let mut served = false;
    for _ in 0..100 {
        if let Ok(Ok(ch)) = tokio::time::timeout(
            Duration::from_secs(5),
            env.tls("gateway").connect(&addr.to_string()),
        )
        .await
            && health_ok(ch).await.is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a real client was never served");
    server.shutdown(Duration::from_secs(5)).await;
}

/// A peer that never finishes its handshake is closed after the configured
/// `handshake_timeout_secs`, and connections over `max_connections` are
/// closed at once while real clients hold the slots.
#[tokio::test]
async fn handshake_timeout_and_connection_cap() {
    let env = Env::new();
    let server = env
        .start_with(&[
            ("SERVER__HANDSHAKE_TIMEOUT_SECS", "1"),
            ("SERVER__MAX_CONNECTIONS", "2"),
        ])
        .await;
    let addr = server.local_addr();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    closed_by_server(&mut silent, Duration::from_secs(6)).await;
    drop(silent);

    let a = env.channel(&server, "gateway").await;
    health_ok(a.clone()).await.unwrap();
    let b = env.channel(&server, "gateway").await;
    health_ok(b.clone()).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    closed_by_server(&mut third, Duration::from_secs(5)).await;
    health_ok(a).await.unwrap();
    server.shutdown(Duration::from_secs(5)).await;
}

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

// ---- Crash safety: a real process, killed with SIGKILL mid-stream ----

/// Acknowledged puts: (object id, SHA-256).
type Acked = Vec<(String, [u8; 32])>;

struct Proc {
    child: Child,
    addr: String,
}

fn start_process(config: &Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-node"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Proc { child, addr }
}

/// The node refuses to start (exit 64, a message naming the setting) when
/// its TLS private key is readable by group or others, and the database it
/// creates is owner-only (also when an earlier version left it 0644).
#[cfg(unix)]
#[tokio::test]
async fn loose_key_is_refused_and_the_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config_path: PathBuf = env.tmp.path().join("node.toml");
    std::fs::write(&config_path, env.config_toml("127.0.0.1:0", "")).unwrap();
    let key = env.pki.key_path("storage-1");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_storage-node"))
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("server.tls.key") && stderr.contains("0644"),
        "{stderr}"
    );
    let db = env.tmp.path().join("data").join("objects.redb");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = env.start().await;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "objects.redb is owner-only");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_puts_loses_no_acknowledged_object() {
    let env = Env::new();
    let config_path: PathBuf = env.tmp.path().join("node.toml");
    std::fs::write(&config_path, env.config_toml("127.0.0.1:0", "")).unwrap();
    let tls = env.tls("gateway");
    let acked: Arc<Mutex<Acked>> = Arc::default();

    for round in 0..2u64 {
        let mut proc = tokio::task::spawn_blocking({
            let p = config_path.clone();
            move || start_process(&p)
        })
        .await
        .unwrap();
        let channel = tls.connect(&proc.addr).await.unwrap();
        // Two writers stream puts until the node dies.
        let (enough_tx, mut enough_rx) = tokio::sync::mpsc::channel::<()>(64);
        let mut writers = Vec::new();
        for w in 0..2u64 {
            let mut c = client(channel.clone());
            let acked = acked.clone();
            let enough_tx = enough_tx.clone();
            writers.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let id = format!("r{round}-w{w}-{i:05}");
                    let body = data(
                        20_000 + ((i * 7919) % 200_000) as usize,
                        round * 1000 + w * 100 + i,
                    );
                    match put_object(&mut c, &id, &body).await {
                        Ok(_) => {
                            acked
                                .lock()
                                .unwrap()
                                .push((id, Sha256::digest(&body).into()));
                            let _ = enough_tx.try_send(());
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        drop(enough_tx);
        // Let at least 15 puts be acknowledged in this round, then SIGKILL
        // while the writers are still streaming.
        for _ in 0..15 {
            enough_rx.recv().await.unwrap();
        }
        proc.child.kill().unwrap();
        proc.child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }

    // Restart: every acknowledged object is there and intact, and every
    // object that is there (including any in flight at the kill) is intact.
    let mut proc = tokio::task::spawn_blocking({
        let p = config_path.clone();
        move || start_process(&p)
    })
    .await
    .unwrap();
    let mut c = client(tls.connect(&proc.addr).await.unwrap());
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 30);
    for (id, digest) in &acked {
        let (info, bytes) = get_object(&mut c, id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e:?}"));
        assert_eq!(info.sha256, digest.to_vec(), "{id}");
        assert_eq!(Sha256::digest(&bytes)[..], digest[..], "{id}");
    }
    let mut start_after = String::new();
    let mut listed = 0;
    loop {
        let page = c
            .list(pb::ListRequest {
                prefix: String::new(),
                start_after: start_after.clone(),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for o in &page.objects {
            get_object(&mut c, &o.object_id).await.unwrap();
            listed += 1;
        }
        if page.next_start_after.is_empty() {
            break;
        }
        start_after = page.next_start_after;
    }
    assert!(listed >= acked.len());
    let info = c
        .node_info(pb::NodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.object_count, listed as u64,
        "counters match the objects"
    );
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();
}

// ---- Region-wise processing: Process over mTLS on real nodes ----

mod process {
    use super::*;
    use tessera_image::phantom::head_phantom;
    use tessera_image::{Image, PixelFormat};
    use tessera_proto::storage::v1::process_request::Msg as Req;
    use tessera_segment::{
        BlockGrid, Fragment, GaParams, Operation, RegionMap, SegmentConfig, make_fragments, merge,
        process_whole,
    };
    use tessera_storage_client::process_fragment;
    use tessera_wire::{CHUNK_BYTES, histeq_mapping, process_requests};
    use tonic::Status;

    impl Env {
        /// Node `name` with its own certificate and data dir; `extra` is
        /// top-level TOML (e.g. a `[process]` table), `vars` env overrides.
        async fn start_node(
            &self,
            name: &str,
            extra: &str,
            vars: &[(&str, &str)],
        ) -> RunningServer {
            let text = format!(
                "node_id = {name:?}\ndata_dir = {data:?}\n{extra}\n[server]\n\
                 listen = \"127.0.0.1:0\"\n[server.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
                data = self.tmp.path().join(name).display().to_string(),
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
        let msgs: Vec<_> =
            process_requests(fragments[0].clone(), Operation::Unsharp, None).collect();
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
            tokio::spawn(
                async move { process_fragment(&mut c2, &f, Operation::Gaussian, None).await },
            );
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
}

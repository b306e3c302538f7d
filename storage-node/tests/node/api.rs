//! The API over mutual TLS: put, get, stat, list, delete; clear statuses
//! for bad input; who may call; bit rot and restarts.

use std::time::Duration;

use crate::common::*;
use redb::ReadableTable;
use sha2::{Digest, Sha256};
use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_storage_client::{get_object, put_messages, put_object};
use tessera_tls::{ClientTls, TlsFiles};
use tonic::Code;

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
    let foreign_dir = env.path().join("foreign");
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
        Ok(ch) => health_ok(tessera_tls::Channel::new(ch)).await.is_err(),
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

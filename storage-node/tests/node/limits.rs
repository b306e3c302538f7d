//! Resource limits: capped gets and puts, stalled streams, idle sockets,
//! the handshake timeout and the connection cap.

use std::time::Duration;

use crate::common::*;
use tessera_proto::storage::v1 as pb;
use tessera_storage_client::{get_object, put_messages, put_object};
use tonic::Code;

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

//! The SCP: echo and mixed batches, association rejections, refusals as
//! statuses, misaddressed and oversized stores, the association cap, silent
//! and bad peers, shutdown.

use std::collections::HashMap;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationRJServiceProviderPresentationReason, AssociationRJSource, PDataValue, PDataValueType,
};
use tessera_scp::ScpConfig;
use tessera_scp::scu::{self, ScuError, ScuOptions, Sent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

#[tokio::test]
async fn echo_and_a_mixed_batch_over_one_association() {
    let refused = "1.2.826.0.1.3680043.2.1125.7.9";
    let sink = TestSink {
        refuse: HashMap::from([(
            refused.to_string(),
            (0xA900, "not for this study".to_string()),
        )]),
        ..TestSink::default()
    };
    let server = Server::start(config(), sink).await;
    let addr = server.addr.to_string();
    let opts = scu_options();
    assert_eq!(scu::echo(&addr, &opts).await.unwrap(), 0x0000);

    let mut batch = vec![
        synthetic("1.2.826.0.1.3680043.2.1125.7.1", 64),
        synthetic_with(
            uids::MR_IMAGE_STORAGE,
            "1.2.826.0.1.3680043.2.1125.7.2",
            100,
            IMPLICIT_LE,
        ),
        // Refused by the sink: its status comes back, the batch goes on.
        synthetic_with(uids::CT_IMAGE_STORAGE, refused, 16, IMPLICIT_LE),
    ];
    batch.extend(real_files());
    // Several PDUs' worth (64 KiB PDUs by default).
    batch.push(synthetic("1.2.826.0.1.3680043.2.1125.7.3", 100_000));
    batch.push(synthetic("1.2.826.0.1.3680043.2.1125.7.4", 4));
    let n = batch.len();
    let mut progress = Vec::new();
    let sent = scu::send_files(&addr, &opts, &files(&batch), |done, total| {
        progress.push((done, total))
    })
    .await
    .unwrap();
    assert_eq!(progress, (1..=n).map(|d| (d, n)).collect::<Vec<_>>());
    assert_eq!(sent.len(), n);
    for (s, inst) in sent.iter().zip(&batch) {
        let expected = if inst.sop_instance == refused {
            Sent {
                sop_instance_uid: refused.into(),
                status: 0xA900,
                error_comment: Some("not for this study".into()),
            }
        } else {
            Sent {
                sop_instance_uid: inst.sop_instance.clone(),
                status: 0x0000,
                error_comment: None,
            }
        };
        assert_eq!(*s, expected, "{}", inst.name);
    }
    {
        let got = server.sink.got.lock().unwrap();
        let stored: Vec<_> = batch.iter().filter(|i| i.sop_instance != refused).collect();
        assert_eq!(got.len(), stored.len());
        for (r, inst) in got.iter().zip(stored) {
            assert_received(r, inst);
        }
        // One association: every instance came over the same connection.
        assert!(got.iter().all(|r| r.peer == got[0].peer));
        println!(
            "stored: {:?}",
            batch
                .iter()
                .map(|i| (&i.name, &i.ts, i.dataset.len()))
                .collect::<Vec<_>>()
        );
    }
    // The association was released: the SCP still serves.
    assert_eq!(scu::echo(&addr, &opts).await.unwrap(), 0x0000);
    assert!(
        scu::send_files(&addr, &opts, &[], |_, _| panic!("no progress"))
            .await
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test]
async fn association_rejections() {
    let server = Server::start(config(), TestSink::default()).await;
    let addr = server.addr.to_string();
    let rejection = |r: Result<u16, ScuError>| match r {
        Err(ScuError::Rejected { transient, reason }) => (transient, reason),
        other => panic!("expected a rejection, got {other:?}"),
    };
    let intruder = ScuOptions {
        calling_ae: "INTRUDER".into(),
        ..scu_options()
    };
    assert_eq!(
        rejection(scu::echo(&addr, &intruder).await),
        (false, "calling AE title not recognized".to_string())
    );
    let elsewhere = ScuOptions {
        called_ae: "SOMEONE_ELSE".into(),
        ..scu_options()
    };
    assert_eq!(
        rejection(scu::echo(&addr, &elsewhere).await),
        (false, "called AE title not recognized".to_string())
    );
    // A transfer syntax nobody knows is rejected per context; the other
    // context is accepted.
    let assoc = associate(
        server.addr,
        CALLING,
        CALLED,
        &[
            (uids::CT_IMAGE_STORAGE, "1.2.3.4.5.6.7"),
            (uids::VERIFICATION, IMPLICIT_LE),
        ],
    )
    .await
    .unwrap();
    let accepted: Vec<_> = assoc
        .presentation_contexts()
        .iter()
        .map(|pc| pc.abstract_syntax.as_str())
        .collect();
    assert_eq!(accepted, [uids::VERIFICATION]);
    assoc.release().await.unwrap();
    // The SCU finds out before sending anything.
    let ok = synthetic("1.2.826.0.1.3680043.2.1125.7.30", 16);
    let odd = Instance {
        file: part10(
            uids::CT_IMAGE_STORAGE,
            "1.2.826.0.1.3680043.2.1125.7.31",
            "1.2.3.4.5.6.7",
            &ok.dataset,
        ),
        ..ok.clone()
    };
    for batch in [vec![ok.clone(), odd.clone()], vec![odd]] {
        match scu::send_files(&addr, &scu_options(), &files(&batch), |_, _| {}).await {
            Err(ScuError::NoContext {
                sop_class,
                transfer_syntax,
            }) => {
                assert_eq!(sop_class, uids::CT_IMAGE_STORAGE);
                assert_eq!(transfer_syntax, "1.2.3.4.5.6.7");
            }
            other => panic!("expected no context, got {other:?}"),
        }
    }
    assert!(server.sink.got.lock().unwrap().is_empty());
    server.stop().await;

    // Fail closed: nobody is allowed when the list is empty.
    let server = Server::start(
        ScpConfig {
            allowed_calling_aes: Vec::new(),
            ..config()
        },
        TestSink::default(),
    )
    .await;
    assert_eq!(
        rejection(scu::echo(&server.addr.to_string(), &scu_options()).await),
        (false, "calling AE title not recognized".to_string())
    );
    server.stop().await;
}

#[tokio::test]
async fn refusals_come_back_as_statuses() {
    let refused = "1.2.826.0.1.3680043.2.1125.7.66";
    let sink = TestSink {
        refuse: HashMap::from([
            (
                refused.to_string(),
                (0xA900, "not for this study".to_string()),
            ),
            (
                "1.2.826.0.1.3680043.2.1125.7.67".to_string(),
                (0x0000, "a refusal with a success status".to_string()),
            ),
        ]),
        ..TestSink::default()
    };
    let server = Server::start(config(), sink).await;
    let batch = [
        synthetic(refused, 16),
        synthetic("1.2.826.0.1.3680043.2.1125.7.67", 16),
        synthetic("1.2.826.0.1.3680043.2.1125.7.68", 16),
    ];
    let sent = scu::send_files(
        &server.addr.to_string(),
        &scu_options(),
        &files(&batch),
        |_, _| {},
    )
    .await
    .unwrap();
    let statuses: Vec<_> = sent
        .iter()
        .map(|s| (s.status, s.error_comment.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        [
            (0xA900, Some("not for this study")),
            // A refusal never reads as success.
            (0xC000, Some("a refusal with a success status")),
            (0x0000, None),
        ]
    );
    let got = server.sink.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_received(&got[0], &batch[2]);
    server.stop().await;
}

#[tokio::test]
async fn misaddressed_stores_get_0122_or_c000() {
    let server = Server::start(config(), TestSink::default()).await;
    let mut assoc = associate(
        server.addr,
        CALLING,
        CALLED,
        &[
            (uids::CT_IMAGE_STORAGE, EXPLICIT_LE),
            (
                uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
                IMPLICIT_LE,
            ),
        ],
    )
    .await
    .unwrap();
    let ct = context_id(&assoc, uids::CT_IMAGE_STORAGE, EXPLICIT_LE);
    let inst = synthetic("1.2.826.0.1.3680043.2.1125.7.69", 16);
    // A SOP class that differs from the context's.
    let (status, _) = c_store(
        &mut assoc,
        ct,
        3,
        uids::MR_IMAGE_STORAGE,
        "1.2.3",
        &inst.dataset,
    )
    .await;
    assert_eq!(status, 0x0122);
    // A context accepted at negotiation but not a storage SOP class.
    let find = context_id(
        &assoc,
        uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
        IMPLICIT_LE,
    );
    let (status, comment) = c_store(
        &mut assoc,
        find,
        4,
        uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
        "1.2.3",
        &inst.dataset,
    )
    .await;
    assert_eq!(status, 0x0122, "{comment:?}");
    // An invalid SOP Instance UID.
    let (status, _) = c_store(
        &mut assoc,
        ct,
        5,
        &inst.sop_class,
        "../../etc/passwd",
        &inst.dataset,
    )
    .await;
    assert_eq!(status, 0xC000);
    // The association still works and nothing was stored.
    let (status, _) = c_store(
        &mut assoc,
        ct,
        6,
        &inst.sop_class,
        &inst.sop_instance,
        &inst.dataset,
    )
    .await;
    assert_eq!(status, 0x0000);
    assoc.release().await.unwrap();
    let got = server.sink.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_received(&got[0], &inst);
    server.stop().await;
}

#[tokio::test]
async fn oversized_instance_gets_a700_and_the_association_goes_on() {
    let server = Server::start(
        ScpConfig {
            max_instance_bytes: 4000,
            // Small PDUs: the data sets go in many fragments.
            max_pdu_length: 1024,
            ..config()
        },
        TestSink::default(),
    )
    .await;
    let big = synthetic("1.2.826.0.1.3680043.2.1125.7.100", 10_000);
    assert!(big.dataset.len() > 4000);
    let small = synthetic("1.2.826.0.1.3680043.2.1125.7.101", 900);
    assert!(small.dataset.len() > 1024 && small.dataset.len() <= 4000);
    let sent = scu::send_files(
        &server.addr.to_string(),
        &scu_options(),
        &files(&[big, small.clone()]),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(sent[0].status, 0xA700);
    assert!(
        sent[0]
            .error_comment
            .as_deref()
            .unwrap()
            .contains("exceeds")
    );
    assert_eq!((sent[1].status, &sent[1].error_comment), (0x0000, &None));
    let got = server.sink.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_received(&got[0], &small);
    server.stop().await;
}

#[tokio::test]
async fn too_many_associations_are_rejected() {
    let server = Server::start(
        ScpConfig {
            max_associations: 1,
            ..config()
        },
        TestSink::default(),
    )
    .await;
    let addr = server.addr.to_string();
    let ctx = [(uids::VERIFICATION, IMPLICIT_LE)];
    let mut first = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    match scu::echo(&addr, &scu_options()).await {
        Err(ScuError::Rejected { transient, reason }) => {
            assert!(transient);
            assert_eq!(
                reason,
                AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
                )
                .to_string()
            );
        }
        other => panic!("expected a transient rejection, got {other:?}"),
    }
    let pc = context_id(&first, uids::VERIFICATION, IMPLICIT_LE);
    assert_eq!(c_echo(&mut first, pc, 1).await, 0);
    first.release().await.unwrap();
    // The slot is free again once the first one is gone.
    let mut again = None;
    for _ in 0..50 {
        match scu::echo(&addr, &scu_options()).await {
            Ok(status) => {
                again = Some(status);
                break;
            }
            Err(ScuError::Rejected {
                transient: true, ..
            }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(again, Some(0), "an association after release");
    server.stop().await;
}

/// Sixteen connections that never send an A-ASSOCIATE-RQ (a port scan, a
/// load balancer probe, an attack) hold no association slot: with two slots
/// and a 60 s idle timeout, a real SCU still associates at once, and the
/// silent connections are closed by the ARTIM timer (2 s), not after the
/// idle timeout.
#[tokio::test]
async fn silent_connections_hold_no_slot_and_meet_the_artim_timer() {
    let server = Server::start(
        ScpConfig {
            max_associations: 2,
            idle_timeout: Duration::from_secs(60),
            artim_timeout: Duration::from_secs(2),
            ..config()
        },
        TestSink::default(),
    )
    .await;
    let addr = server.addr.to_string();
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    for _ in 0..2 {
        assert_eq!(scu::echo(&addr, &scu_options()).await.unwrap(), 0);
    }
    for s in &mut silent {
        assert!(closed_within(s, Duration::from_secs(20)).await.is_empty());
    }
    // A peer that starts an A-ASSOCIATE-RQ and stalls is closed too.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&[0x01, 0x00, 0x00, 0x00]).await.unwrap();
    closed_within(&mut stalled, Duration::from_secs(20)).await;
    assert_eq!(scu::echo(&addr, &scu_options()).await.unwrap(), 0);
    server.stop().await;
}

/// Reads until the server closes the connection; panics if it takes longer
/// than `within`.
async fn closed_within(socket: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0_u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection");
    seen
}

#[tokio::test]
async fn bad_peers_are_dropped_without_harm() {
    let server = Server::start(
        ScpConfig {
            idle_timeout: Duration::from_millis(300),
            artim_timeout: Duration::from_millis(300),
            ..config()
        },
        TestSink::default(),
    )
    .await;
    // Silent connection: closed by the ARTIM timer.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    // A PDU declaring 4 GiB: refused at once, nothing allocated.
    let mut huge = TcpStream::connect(server.addr).await.unwrap();
    huge.write_all(&[0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0])
        .await
        .unwrap();
    closed_within(&mut huge, Duration::from_secs(5)).await;
    // Garbage.
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    let _ = garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    closed_within(&mut garbage, Duration::from_secs(5)).await;

    let ctx = [(uids::CT_IMAGE_STORAGE, EXPLICIT_LE)];
    // An established association that goes quiet gets an A-ABORT.
    let mut idle = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    match idle.receive().await {
        Ok(Pdu::AbortRQ { .. }) => {}
        other => panic!("expected A-ABORT, got {other:?}"),
    }
    // A data fragment before any command: aborted.
    let mut confused = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    let pc = context_id(&confused, uids::CT_IMAGE_STORAGE, EXPLICIT_LE);
    confused
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Data,
                is_last: true,
                data: vec![0; 16],
            }],
        })
        .await
        .unwrap();
    assert!(matches!(confused.receive().await, Ok(Pdu::AbortRQ { .. })));
    // A command set declaring an element longer than itself: aborted.
    let mut lying = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    let mut cmd = vec![0x00, 0x00, 0x00, 0x01];
    cmd.extend_from_slice(&0xFFFF_FFF0_u32.to_le_bytes());
    lying
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd,
            }],
        })
        .await
        .unwrap();
    assert!(matches!(lying.receive().await, Ok(Pdu::AbortRQ { .. })));
    // A P-DATA on a context that was never negotiated: aborted.
    let mut stray = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    stray
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc + 2,
                value_type: PDataValueType::Command,
                is_last: true,
                data: store_rq(1, uids::CT_IMAGE_STORAGE, "1.2.3"),
            }],
        })
        .await
        .unwrap();
    assert!(matches!(stray.receive().await, Ok(Pdu::AbortRQ { .. })));

    // The server still serves.
    let inst = synthetic("1.2.826.0.1.3680043.2.1125.7.200", 16);
    let sent = scu::send_files(
        &server.addr.to_string(),
        &scu_options(),
        &files(&[inst]),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(sent[0].status, 0);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_aborts_idle_associations_and_returns() {
    let server = Server::start(
        ScpConfig {
            idle_timeout: Duration::from_secs(30),
            ..config()
        },
        TestSink::default(),
    )
    .await;
    let ctx = [(uids::VERIFICATION, IMPLICIT_LE)];
    let mut open = associate(server.addr, CALLING, CALLED, &ctx).await.unwrap();
    let pc = context_id(&open, uids::VERIFICATION, IMPLICIT_LE);
    assert_eq!(c_echo(&mut open, pc, 1).await, 0);
    let addr = server.addr;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the idle association: {:?}",
        started.elapsed()
    );
    assert!(matches!(
        open.receive().await,
        Ok(Pdu::AbortRQ { .. }) | Err(_)
    ));
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

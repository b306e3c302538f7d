//! The SCU (`scu::send_files`, `scu::echo`): bad input refused before
//! anything is sent, and SCPs that misbehave give errors, not hangs.

use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_ul::pdu::{AbortRQSource, PDataValue, PDataValueType};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tessera_scp::scu::{self, ScuError, ScuOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::*;

#[tokio::test]
async fn bad_input_fails_before_anything_is_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let good = synthetic("1.2.826.0.1.3680043.2.1125.7.300", 16);
    let mut no_magic = good.file.clone();
    no_magic[128..132].copy_from_slice(b"DIXM");
    let mut truncated = good.file.clone();
    truncated.truncate(150);
    let cases = [
        vec![good.file.clone(), no_magic, good.file.clone()],
        vec![good.file.clone(), good.file.clone(), truncated],
        vec![good.dataset.clone()],
    ];
    for (case, batch) in cases.iter().enumerate() {
        let bad = batch.len() - 1 - usize::from(case == 0);
        match scu::send_files(&addr, &scu_options(), batch, |_, _| panic!("progress")).await {
            Err(e @ ScuError::NotPart10 { index, .. }) => {
                assert_eq!(index, bad, "{e}");
                assert!(e.to_string().contains(&format!("file {bad} ")), "{e}");
            }
            other => panic!("case {case}: expected NotPart10, got {other:?}"),
        }
    }
    // More (SOP class, transfer syntax) pairs than presentation contexts.
    let many: Vec<_> = (0..=scu::MAX_PRESENTATION_CONTEXTS)
        .map(|i| {
            synthetic_with(
                &format!("1.2.826.0.1.3680043.2.1125.99.{i}"),
                &format!("1.2.826.0.1.3680043.2.1125.7.{}", 400 + i),
                4,
                EXPLICIT_LE,
            )
            .file
        })
        .collect();
    assert!(matches!(
        scu::send_files(&addr, &scu_options(), &many, |_, _| {}).await,
        Err(ScuError::TooManyContexts(129))
    ));
    // Invalid options.
    let bad_ae = ScuOptions {
        calling_ae: "BAD\\AE".into(),
        ..scu_options()
    };
    assert!(matches!(
        scu::echo(&addr, &bad_ae).await,
        Err(ScuError::InvalidOptions(_))
    ));
    assert!(!connected_within(&listener, Duration::from_millis(200)).await);
}

/// What a misbehaving SCP does once it has read a whole C-STORE-RQ.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    Silent,
    WrongMessageId,
    WrongInstance,
    Abort,
    DataInsteadOfCommand,
    GarbageCommand,
    WrongContext,
    Close,
}

fn store_rsp(message_id: u16, status: u16, sop_instance: &str) -> Vec<u8> {
    command(vec![
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x8001_u16),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0101_u16),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ])
}

/// An SCP (dicom-ul's server, accepting anything) that misbehaves after
/// the first C-STORE-RQ has been read.
async fn bad_scp(how: Misbehaviour) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut assoc = ServerAssociationOptions::new()
            .accept_any()
            .promiscuous(true)
            .read_timeout(Duration::from_secs(10))
            .establish_async(socket)
            .await
            .unwrap();
        let pc = loop {
            let Pdu::PData { data } = assoc.receive().await.unwrap() else {
                panic!("expected P-DATA");
            };
            if data
                .iter()
                .any(|v| v.value_type == PDataValueType::Data && v.is_last)
            {
                break data[0].presentation_context_id;
            }
        };
        let pdv = |value_type, data| Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type,
                is_last: true,
                data,
            }],
        };
        let instance = "1.2.826.0.1.3680043.2.1125.7.500";
        let reply = match how {
            Misbehaviour::Silent => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            Misbehaviour::Close => return,
            Misbehaviour::WrongMessageId => {
                pdv(PDataValueType::Command, store_rsp(999, 0, instance))
            }
            Misbehaviour::WrongInstance => pdv(PDataValueType::Command, store_rsp(1, 0, "1.2.3.4")),
            Misbehaviour::Abort => Pdu::AbortRQ {
                source: AbortRQSource::ServiceUser,
            },
            Misbehaviour::DataInsteadOfCommand => {
                pdv(PDataValueType::Data, store_rsp(1, 0, instance))
            }
            Misbehaviour::GarbageCommand => pdv(PDataValueType::Command, b"garbage!".to_vec()),
            Misbehaviour::WrongContext => Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc + 2,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: store_rsp(1, 0, instance),
                }],
            },
        };
        let _ = assoc.send(&reply).await;
        // Keep the connection open until the SCU has acted on the reply.
        let _ = assoc.receive().await;
    });
    (addr, task)
}

#[tokio::test]
async fn misbehaving_scps_give_errors_not_hangs() {
    let opts = ScuOptions {
        timeout: Duration::from_millis(500),
        ..scu_options()
    };
    let inst = synthetic("1.2.826.0.1.3680043.2.1125.7.500", 16);
    for how in [
        Misbehaviour::Silent,
        Misbehaviour::WrongMessageId,
        Misbehaviour::WrongInstance,
        Misbehaviour::Abort,
        Misbehaviour::DataInsteadOfCommand,
        Misbehaviour::GarbageCommand,
        Misbehaviour::WrongContext,
        Misbehaviour::Close,
    ] {
        let (addr, task) = bad_scp(how).await;
        let started = Instant::now();
        let result = scu::send_files(&addr, &opts, &files(std::slice::from_ref(&inst)), |_, _| {
            panic!("{how:?}: progress")
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(5), "{how:?}");
        let ok = match (&result, how) {
            (Err(ScuError::Timeout { .. }), Misbehaviour::Silent)
            | (Err(ScuError::Io(_)), Misbehaviour::Close) => true,
            (Err(ScuError::Protocol(_)), Misbehaviour::Close)
            | (Err(ScuError::Protocol(_)), Misbehaviour::Silent) => false,
            (Err(ScuError::Protocol(_)), _) => true,
            _ => false,
        };
        assert!(ok, "{how:?}: {result:?}");
        println!("{how:?}: {}", result.unwrap_err());
        task.abort();
    }

    // Silent from the start, and garbage instead of an A-ASSOCIATE-AC.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let silent = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(socket);
    });
    let started = Instant::now();
    assert!(matches!(
        scu::echo(&addr, &opts).await,
        Err(ScuError::Timeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    silent.abort();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let garbage = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let _ = socket.read(&mut [0; 1024]).await;
    });
    let result = scu::echo(&addr, &opts).await;
    assert!(
        matches!(result, Err(ScuError::Protocol(_) | ScuError::Io(_))),
        "{result:?}"
    );
    garbage.abort();
    // Nobody listening.
    let result = scu::echo("127.0.0.1:1", &opts).await;
    assert!(matches!(result, Err(ScuError::Io(_))), "{result:?}");
}

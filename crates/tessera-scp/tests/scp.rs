//! tessera-scp over real sockets: `scu::send_files` / `scu::echo` as the
//! client wherever a well-behaved SCU is enough, dicom-ul's client driven
//! by hand where a test needs to misbehave, and a hand-made SCP (dicom-ul's
//! server) that misbehaves towards the SCU.
//!
//! Instances: small data sets built here, plus a few real files from
//! pydicom-data in several transfer syntaxes (found through
//! TESSERA_DICOM_DATA or the project's .venv; the test fails without them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::association::Error as UlError;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJServiceProviderPresentationReason, AssociationRJSource, PDataValue,
    PDataValueType,
};
use dicom_ul::{ClientAssociationOptions, Pdu, ServerAssociationOptions};
use tessera_scp::scu::{self, ScuError, ScuOptions, Sent};
use tessera_scp::{
    IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InstanceSink, Received, Scp, ScpConfig,
    StoreOutcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CALLING: &str = "MODALITY";
const CALLED: &str = "TESSERA";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// Collects what it stores; refuses the SOP instance UIDs listed in `refuse`.
#[derive(Default)]
struct TestSink {
    got: Mutex<Vec<Received>>,
    refuse: HashMap<String, (u16, String)>,
}

impl InstanceSink for TestSink {
    async fn store(&self, received: Received) -> StoreOutcome {
        if let Some((status, reason)) = self.refuse.get(&received.sop_instance_uid) {
            return StoreOutcome::Refused {
                status: *status,
                reason: reason.clone(),
            };
        }
        self.got.lock().unwrap().push(received);
        StoreOutcome::Stored
    }
}

struct Server {
    addr: SocketAddr,
    sink: Arc<TestSink>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(cfg: ScpConfig, sink: TestSink) -> Server {
        let scp = Scp::bind("127.0.0.1:0".parse().unwrap(), cfg)
            .await
            .unwrap();
        let addr = scp.local_addr();
        let sink = Arc::new(sink);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(scp.serve(sink.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            sink,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn config() -> ScpConfig {
    ScpConfig {
        ae_title: CALLED.into(),
        allowed_calling_aes: vec![CALLING.into()],
        idle_timeout: Duration::from_secs(5),
        ..ScpConfig::default()
    }
}

/// An instance to send: the Part 10 file, its data set bytes and what
/// describes them.
#[derive(Clone, Debug)]
struct Instance {
    name: String,
    sop_class: String,
    sop_instance: String,
    ts: String,
    dataset: Vec<u8>,
    file: Vec<u8>,
}

/// A small valid CT data set (Explicit VR LE) with 16-bit pixels.
fn synthetic(sop_instance: &str, pixels: usize) -> Instance {
    synthetic_with(uids::CT_IMAGE_STORAGE, sop_instance, pixels, EXPLICIT_LE)
}

/// A small valid image data set of `sop_class` with 16-bit pixels, in
/// `ts` (Explicit or Implicit VR LE), and its Part 10 file.
fn synthetic_with(sop_class: &str, sop_instance: &str, pixels: usize, ts: &str) -> Instance {
    let side = (pixels as f64).sqrt().ceil() as u16;
    let n = side as usize * side as usize;
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(sop_class)),
        DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
        DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
        DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("MONOCHROME2"),
        ),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(side)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(side)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12_u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11_u16)),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0_u16),
        ),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16((0..n).map(|i| (i * 7 % 4096) as u16).collect()),
        ),
    ]);
    let mut dataset = Vec::new();
    let encoding = match ts {
        EXPLICIT_LE => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        IMPLICIT_LE => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        other => panic!("synthetic data sets in {other}"),
    };
    obj.write_dataset_with_ts(&mut dataset, &encoding).unwrap();
    Instance {
        name: format!("synthetic {sop_instance}"),
        sop_class: sop_class.into(),
        sop_instance: sop_instance.into(),
        ts: ts.into(),
        file: part10(sop_class, sop_instance, ts, &dataset),
        dataset,
    }
}

/// A Part 10 file: preamble, `DICM`, a meta group, then `dataset`.
fn part10(sop_class: &str, sop_instance: &str, ts: &str, dataset: &[u8]) -> Vec<u8> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(ts)
        .implementation_class_uid("1.2.826.0.1.3680043.2.1125.1")
        .build()
        .unwrap();
    let mut file = vec![0; 128];
    file.extend_from_slice(b"DICM");
    meta.write(&mut file).unwrap();
    file.extend_from_slice(dataset);
    file
}

/// Split a Part 10 file into its meta and data set.
fn from_file(name: &str, bytes: &[u8]) -> Instance {
    assert_eq!(&bytes[128..132], b"DICM", "{name}");
    let meta = FileMetaTable::from_reader(&bytes[128..]).unwrap();
    let offset = 132 + 12 + meta.information_group_length as usize;
    let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    Instance {
        name: name.into(),
        sop_class: trim(meta.media_storage_sop_class_uid()),
        sop_instance: trim(meta.media_storage_sop_instance_uid()),
        ts: trim(meta.transfer_syntax()),
        dataset: bytes[offset..].to_vec(),
        file: bytes.to_vec(),
    }
}

/// Real files from pydicom-data in several transfer syntaxes: the test fails,
/// naming how to install them, when pydicom-data cannot be found.
fn real_files() -> Vec<Instance> {
    let dir = tessera_dicom::testdata::pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"));
    [
        "MR2_UNCR.dcm",                    // Explicit VR LE
        "gdcm-US-ALOKA-16.dcm",            // Implicit VR LE
        "emri_small_big_endian.dcm",       // Explicit VR BE (retired)
        "emri_small_jpeg_2k_lossless.dcm", // JPEG 2000 lossless
        "emri_small_RLE.dcm",              // RLE lossless
        "color3d_jpeg_baseline.dcm",       // JPEG baseline, multi-frame
        "JPEG-LL.dcm",                     // JPEG lossless
    ]
    .iter()
    .map(|name| {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        from_file(name, &bytes)
    })
    .collect()
}

async fn associate(
    addr: SocketAddr,
    calling: &str,
    called: &str,
    contexts: &[(&str, &str)],
) -> Result<AsyncClientAssociation<TcpStream>, UlError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling.to_string())
        .called_ae_title(called.to_string())
        .read_timeout(Duration::from_secs(10))
        .write_timeout(Duration::from_secs(10));
    for (abstract_syntax, ts) in contexts {
        options =
            options.with_presentation_context(abstract_syntax.to_string(), vec![ts.to_string()]);
    }
    options.establish_async(addr).await
}

fn context_id(assoc: &AsyncClientAssociation<TcpStream>, abstract_syntax: &str, ts: &str) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax == abstract_syntax && pc.transfer_syntax == ts)
        .unwrap_or_else(|| panic!("no accepted context for {abstract_syntax} / {ts}"))
        .id
}

fn command(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    command(vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x0001_u16),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0_u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0000_u16),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ])
}

/// A response: (command field, message id responded to, status, error comment).
async fn response(
    assoc: &mut AsyncClientAssociation<TcpStream>,
) -> (u16, u16, u16, Option<String>) {
    let pdu = assoc.receive().await.expect("a response PDU");
    let Pdu::PData { data } = pdu else {
        panic!("expected P-DATA, got {pdu:?}");
    };
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].value_type, PDataValueType::Command);
    assert!(data[0].is_last);
    let obj = InMemDicomObject::read_dataset_with_ts(
        &data[0].data[..],
        &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .unwrap();
    let group_length = obj
        .get(tags::COMMAND_GROUP_LENGTH)
        .unwrap()
        .uint32()
        .unwrap();
    assert_eq!(group_length as usize, data[0].data.len() - 12);
    let get = |tag| obj.get(tag).unwrap().uint16().unwrap();
    let comment = obj
        .get(tags::ERROR_COMMENT)
        .map(|e| e.to_str().unwrap().trim_end().to_string());
    (
        get(tags::COMMAND_FIELD),
        get(tags::MESSAGE_ID_BEING_RESPONDED_TO),
        get(tags::STATUS),
        comment,
    )
}

/// C-STORE of `inst` on context `pc`: returns (status, error comment).
async fn c_store(
    assoc: &mut AsyncClientAssociation<TcpStream>,
    pc: u8,
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    dataset: &[u8],
) -> (u16, Option<String>) {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: store_rq(message_id, sop_class, sop_instance),
            }],
        })
        .await
        .unwrap();
    // One PDV per PDU, as large as the SCP accepts (PDV header: 6 bytes).
    // (dicom-ul's AsyncPDataWriter needs a multi-threaded runtime.)
    let chunk = assoc.acceptor_max_pdu_length() as usize - 6;
    let mut chunks = dataset.chunks(chunk).peekable();
    while let Some(part) = chunks.next() {
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: chunks.peek().is_none(),
                    data: part.to_vec(),
                }],
            })
            .await
            .unwrap();
    }
    let (field, responded_to, status, comment) = response(assoc).await;
    assert_eq!(field, 0x8001);
    assert_eq!(responded_to, message_id);
    (status, comment)
}

async fn c_echo(assoc: &mut AsyncClientAssociation<TcpStream>, pc: u8, message_id: u16) -> u16 {
    let rq = command(vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::VERIFICATION),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x0030_u16),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0101_u16),
        ),
    ]);
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: rq,
            }],
        })
        .await
        .unwrap();
    let (field, responded_to, status, _) = response(assoc).await;
    assert_eq!(field, 0x8030);
    assert_eq!(responded_to, message_id);
    status
}

fn assert_received(r: &Received, inst: &Instance) {
    assert_eq!(r.calling_ae, CALLING, "{}", inst.name);
    assert_eq!(r.sop_class_uid, inst.sop_class, "{}", inst.name);
    assert_eq!(r.sop_instance_uid, inst.sop_instance, "{}", inst.name);
    assert_eq!(r.transfer_syntax, inst.ts, "{}", inst.name);
    // Data set bytes exactly as sent.
    assert_eq!(r.dataset(), &inst.dataset[..], "{}", inst.name);
    assert!(r.file.ends_with(&inst.dataset), "{}", inst.name);
    // Preamble, magic, meta written by us.
    assert!(r.file[..128].iter().all(|b| *b == 0), "{}", inst.name);
    assert_eq!(&r.file[128..132], b"DICM", "{}", inst.name);
    let meta = FileMetaTable::from_reader(&r.file[128..]).unwrap();
    assert_eq!(
        132 + 12 + meta.information_group_length as usize,
        r.dataset_offset
    );
    let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    assert_eq!(meta.information_version, [0, 1]);
    assert_eq!(trim(meta.media_storage_sop_class_uid()), inst.sop_class);
    assert_eq!(
        trim(meta.media_storage_sop_instance_uid()),
        inst.sop_instance
    );
    assert_eq!(trim(meta.transfer_syntax()), inst.ts);
    assert_eq!(
        trim(meta.implementation_class_uid()),
        IMPLEMENTATION_CLASS_UID
    );
    assert_eq!(
        meta.implementation_version_name().map(trim).as_deref(),
        Some(IMPLEMENTATION_VERSION_NAME)
    );
    assert_eq!(
        meta.source_application_entity_title().map(trim).as_deref(),
        Some(CALLING)
    );
    // The whole file reads back with dicom-object.
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&r.file[..])
        .unwrap_or_else(|e| panic!("{}: {e}", inst.name));
    let uid = obj
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(trim(&uid), inst.sop_instance, "{}", inst.name);
}

fn scu_options() -> ScuOptions {
    ScuOptions {
        calling_ae: CALLING.into(),
        called_ae: CALLED.into(),
        timeout: Duration::from_secs(10),
        ..ScuOptions::default()
    }
}

fn files(instances: &[Instance]) -> Vec<Vec<u8>> {
    instances.iter().map(|i| i.file.clone()).collect()
}

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

/// Whether anyone connects to `listener` within `within`.
async fn connected_within(listener: &TcpListener, within: Duration) -> bool {
    tokio::time::timeout(within, listener.accept())
        .await
        .is_ok()
}

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

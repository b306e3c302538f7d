//! Fixtures: a test SCP and its sink, instances (synthetic and pydicom-data),
//! and a hand-driven dicom-ul client speaking DIMSE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::association::Error as UlError;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tessera_scp::scu::ScuOptions;
use tessera_scp::{
    IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InstanceSink, Received, Scp, ScpConfig,
    StoreOutcome,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const CALLING: &str = "MODALITY";
pub const CALLED: &str = "TESSERA";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// Collects what it stores; refuses the SOP instance UIDs listed in `refuse`.
#[derive(Default)]
pub struct TestSink {
    pub got: Mutex<Vec<Received>>,
    pub refuse: HashMap<String, (u16, String)>,
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

pub struct Server {
    pub addr: SocketAddr,
    pub sink: Arc<TestSink>,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(cfg: ScpConfig, sink: TestSink) -> Server {
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

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

pub fn config() -> ScpConfig {
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
pub struct Instance {
    pub name: String,
    pub sop_class: String,
    pub sop_instance: String,
    pub ts: String,
    pub dataset: Vec<u8>,
    pub file: Vec<u8>,
}

/// A small valid CT data set (Explicit VR LE) with 16-bit pixels.
pub fn synthetic(sop_instance: &str, pixels: usize) -> Instance {
    synthetic_with(uids::CT_IMAGE_STORAGE, sop_instance, pixels, EXPLICIT_LE)
}

/// A small valid image data set of `sop_class` with 16-bit pixels, in
/// `ts` (Explicit or Implicit VR LE), and its Part 10 file.
pub fn synthetic_with(sop_class: &str, sop_instance: &str, pixels: usize, ts: &str) -> Instance {
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
pub fn part10(sop_class: &str, sop_instance: &str, ts: &str, dataset: &[u8]) -> Vec<u8> {
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
pub fn from_file(name: &str, bytes: &[u8]) -> Instance {
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
pub fn real_files() -> Vec<Instance> {
    let dir = tessera_testkit::pydicom_data();
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

pub async fn associate(
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

pub fn context_id(
    assoc: &AsyncClientAssociation<TcpStream>,
    abstract_syntax: &str,
    ts: &str,
) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax == abstract_syntax && pc.transfer_syntax == ts)
        .unwrap_or_else(|| panic!("no accepted context for {abstract_syntax} / {ts}"))
        .id
}

pub fn command(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

pub fn store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
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
pub async fn response(
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
pub async fn c_store(
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

pub async fn c_echo(assoc: &mut AsyncClientAssociation<TcpStream>, pc: u8, message_id: u16) -> u16 {
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

pub fn assert_received(r: &Received, inst: &Instance) {
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

pub fn scu_options() -> ScuOptions {
    ScuOptions {
        calling_ae: CALLING.into(),
        called_ae: CALLED.into(),
        timeout: Duration::from_secs(10),
        ..ScuOptions::default()
    }
}

pub fn files(instances: &[Instance]) -> Vec<Vec<u8>> {
    instances.iter().map(|i| i.file.clone()).collect()
}

/// Whether anyone connects to `listener` within `within`.
pub async fn connected_within(listener: &TcpListener, within: Duration) -> bool {
    tokio::time::timeout(within, listener.accept())
        .await
        .is_ok()
}

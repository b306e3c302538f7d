//! Traces through the live suite (issue 15): an OTLP/gRPC trace receiver
//! runs in this process, telemetry exports to it, and an image store and a
//! DICOM store go through the gateway. Each store is one trace: the
//! gateway's RPC span is a child of the client's span (the `traceparent`
//! the client channel sent), the keyserver, watermark and storage node
//! spans descend from the gateway's span, every RPC span records its gRPC
//! status, and no patient attribute or name appears in any span.
//!
//! Its own test binary: telemetry installs the process-wide subscriber.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_service::client as gw;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tessera_devstack::DevOptions;
use tessera_dicom::synth::{StudyInfo, ct_slice};
use tessera_image::PixelFormat;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{gateway, start};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Every span the receiver was sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn str_attr(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{}: {key} = {other:?}", span.name),
    }
}

/// The spans of one trace, by span id.
struct Trace<'a> {
    by_id: BTreeMap<&'a [u8], &'a Span>,
}

impl<'a> Trace<'a> {
    fn new(spans: &'a [Span], trace_id: &[u8]) -> Self {
        Self {
            by_id: spans
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .map(|s| (s.span_id.as_slice(), s))
                .collect(),
        }
    }

    /// The server spans of `service` (e.g. `tessera.keyserver.v1.KeyServer`).
    fn rpcs(&self, service: &str) -> Vec<&'a Span> {
        self.by_id
            .values()
            .filter(|s| attr(s, "rpc.service").is_some() && str_attr(s, "rpc.service") == service)
            .copied()
            .collect()
    }

    /// True when `ancestor` is on `span`'s parent chain.
    fn descends(&self, span: &Span, ancestor: &Span) -> bool {
        let mut parent = span.parent_span_id.as_slice();
        while !parent.is_empty() {
            if parent == ancestor.span_id.as_slice() {
                return true;
            }
            match self.by_id.get(parent) {
                Some(p) => parent = p.parent_span_id.as_slice(),
                None => return false,
            }
        }
        false
    }
}

const PATIENT_ID: &str = "PID-TRACE-4711";
const PATIENT_NAME: &str = "Quixote^Alonso^Q";
const DICOM_PATIENT_ID: &str = "MRN-55102-ZZ";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_store_is_one_trace_from_the_gateway_to_every_upstream() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let cfg = tessera_runtime::TelemetryConfig {
        log: "warn".into(),
        otlp_endpoint: Some(format!("http://{addr}")),
        ..tessera_runtime::TelemetryConfig::default()
    };
    let mut telemetry = tessera_runtime::telemetry::init("tessera-trace-test", &cfg).unwrap();

    let (_tmp, mut stack) = start(&DevOptions::default()).await;

    // An image store inside a client span.
    let client_span = tracing::info_span!("client.store_image");
    let image_trace = client_span.context().span().span_context().trace_id();
    let img =
        tessera_image::phantom::head_phantom(64, 48, 1, PixelFormat::gray16(12, false), 9).unwrap();
    let header = pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: PATIENT_ID.into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 8,
            y: 8,
            width: 32,
            height: 24,
        }),
    };
    let mut owner = gateway(&stack, "owner").await;
    gw::store(&mut owner, header, &img.to_le_bytes())
        .instrument(client_span.clone())
        .await
        .unwrap();

    // A DICOM instance inside another.
    let dicom_span = tracing::info_span!("client.store_dicom");
    let dicom_trace = dicom_span.context().span().span_context().trace_id();
    let info = StudyInfo {
        patient_name: PATIENT_NAME.into(),
        patient_id: DICOM_PATIENT_ID.into(),
        patient_birth_date: "19470923".into(),
        study_date: "20260301".into(),
        institution: "Hospital de La Mancha".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.78".into(),
    };
    let px: Vec<u16> = (0..64 * 48u32).map(|p| (p * 7 % 4096) as u16).collect();
    let file = ct_slice(&info, 0, 48, 64, &px).unwrap();
    let mut clin = gateway(&stack, "clinician").await;
    gw::store_dicom(&mut clin, OWNER, &file)
        .instrument(dicom_span.clone())
        .await
        .unwrap();
    assert_ne!(image_trace, dicom_trace);
    drop((client_span, dicom_span));

    stack.shutdown().await;
    // Flush every batched span to the receiver.
    telemetry.shutdown();
    let spans = {
        let mut waited = Duration::ZERO;
        loop {
            let n = receiver.spans.lock().unwrap().len();
            if n > 0 || waited > Duration::from_secs(10) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += Duration::from_millis(100);
        }
        receiver.spans.lock().unwrap().clone()
    };
    server.abort();

    for (what, trace_id, gateway_rpc, upstreams) in [
        (
            "image store",
            image_trace,
            "tessera.gateway.v1.Gateway/Store",
            &[
                "tessera.keyserver.v1.KeyServer",
                "tessera.watermark.v1.Watermark",
                "tessera.storage.v1.StorageNode",
            ][..],
        ),
        (
            "DICOM store",
            dicom_trace,
            "tessera.gateway.v1.Gateway/StoreDicom",
            &[
                "tessera.keyserver.v1.KeyServer",
                "tessera.storage.v1.StorageNode",
            ][..],
        ),
    ] {
        let trace = Trace::new(&spans, &trace_id.to_bytes());
        let client = trace
            .by_id
            .values()
            .find(|s| s.name.starts_with("client."))
            .unwrap_or_else(|| panic!("{what}: no client span in {spans:#?}"));
        let gw_spans: Vec<_> = trace
            .rpcs("tessera.gateway.v1.Gateway")
            .into_iter()
            .filter(|s| s.name == gateway_rpc)
            .collect();
        assert_eq!(gw_spans.len(), 1, "{what}: {gw_spans:#?}");
        let gw_span = gw_spans[0];
        assert_eq!(
            gw_span.parent_span_id, client.span_id,
            "{what}: the gateway continues the client's context"
        );
        for service in upstreams {
            let calls = trace.rpcs(service);
            assert!(!calls.is_empty(), "{what}: no {service} span in the trace");
            for c in calls {
                assert!(
                    trace.descends(c, gw_span),
                    "{what}: {} is not under the gateway's span",
                    c.name
                );
            }
        }
        // Every RPC span of the trace recorded its status: OK here.
        let rpcs: Vec<_> = trace
            .by_id
            .values()
            .filter(|s| attr(s, "rpc.service").is_some())
            .collect();
        assert!(rpcs.len() > upstreams.len(), "{what}: {rpcs:#?}");
        for s in rpcs {
            assert_eq!(
                attr(s, "rpc.grpc.status_code"),
                Some(&Value::IntValue(0)),
                "{what}: {} status",
                s.name
            );
        }
    }
    // The two stores share no span.
    let image_ids: Vec<_> = Trace::new(&spans, &image_trace.to_bytes())
        .by_id
        .into_keys()
        .collect();
    let dicom = Trace::new(&spans, &dicom_trace.to_bytes());
    assert!(image_ids.iter().all(|id| !dicom.by_id.contains_key(id)));

    // No patient attribute or name anywhere in a span.
    let all = format!("{spans:?}");
    for secret in [
        PATIENT_ID,
        PATIENT_NAME,
        "Quixote",
        DICOM_PATIENT_ID,
        "19470923",
    ] {
        assert!(!all.contains(secret), "{secret} in a span");
    }
}

//! The watermark test fixtures: a keyserver and a watermark service on
//! loopback with the dev PKI, and the protect / verify / restore calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_image::{Image, PixelFormat};
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::watermark::v1 as pb;
use tessera_proto::watermark::v1::watermark_client::WatermarkClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};
use tonic::Status;
use watermark_service::convert::CHUNK_BYTES;

pub const OWNER: &str = "spiffe://tessera.local/user/owner";

pub struct Env {
    pub _tmp: tempfile::TempDir,
    pub pki: PathBuf,
    pub ks_addr: String,
    pub wm_addr: String,
    pub keyserver: Option<keyserver::RunningApp>,
    pub watermark: Option<watermark_service::RunningApp>,
}

pub fn watermark_config(
    pki: &Path,
    ks_addr: &str,
    env: BTreeMap<String, String>,
) -> watermark_service::Config {
    let d = pki.display();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/watermark.crt\"\nkey = \"{d}/watermark.key\"\n\
         [keyserver]\naddress = \"{ks_addr}\"\n[keyserver.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/watermark.crt\"\nkey = \"{d}/watermark.key\"\n\
         [watermark]\nmax_image_bytes = 1048576\n"
    );
    load_config(
        &ConfigSource::from_text(&text, env),
        watermark_service::config::ENV_PREFIX,
    )
    .unwrap()
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(BTreeMap::new()).await
    }

    /// Starts both services; `wm_env` overrides the watermark config.
    pub async fn start_with(wm_env: BTreeMap<String, String>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap().dir;
        let kek = tmp.path().join("kek");
        std::fs::write(&kek, [42u8; 32]).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let d = pki.display();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/keyserver.crt\"\nkey = \"{d}/keyserver.key\"\n\
             [keyserver]\ndb_path = \"{}\"\nkek_file = \"{}\"\n",
            tmp.path().join("ks.redb").display(),
            kek.display()
        );
        let ks_cfg: keyserver::Config = load_config(
            &ConfigSource::from_text(&text, Default::default()),
            keyserver::config::ENV_PREFIX,
        )
        .unwrap();
        let keyserver = keyserver::App::build(&ks_cfg)
            .unwrap()
            .spawn()
            .await
            .unwrap();
        let ks_addr = keyserver.local_addr().to_string();
        let wm_cfg = watermark_config(&pki, &ks_addr, wm_env);
        let watermark = watermark_service::App::build(&wm_cfg)
            .unwrap()
            .spawn()
            .await
            .unwrap();
        let wm_addr = watermark.local_addr().to_string();
        Self {
            _tmp: tmp,
            pki,
            ks_addr,
            wm_addr,
            keyserver: Some(keyserver),
            watermark: Some(watermark),
        }
    }

    pub async fn channel(&self, name: &str, addr: &str) -> Channel {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki, name)).unwrap();
        tls.connect(addr).await.unwrap()
    }

    pub async fn client(&self, name: &str) -> WatermarkClient<Channel> {
        WatermarkClient::new(self.channel(name, &self.wm_addr).await)
    }

    pub async fn register(&self, patient: &str) -> String {
        KeyServerClient::new(self.channel("gateway", &self.ks_addr).await)
            .register_study(ks::RegisterStudyRequest {
                owner: OWNER.into(),
                attributes: attrs(patient),
                study_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .study_id
    }

    pub async fn stop(mut self) {
        if let Some(w) = self.watermark.take() {
            w.shutdown(Duration::from_secs(5)).await;
        }
        if let Some(k) = self.keyserver.take() {
            k.shutdown(Duration::from_secs(5)).await;
        }
    }
}

pub fn attrs(patient: &str) -> Vec<ks::Attribute> {
    vec![
        ks::Attribute {
            name: "patient_id".into(),
            value: patient.into(),
        },
        ks::Attribute {
            name: "birth_date".into(),
            value: "19700101".into(),
        },
    ]
}

pub fn study(id: &str, patient: &str) -> Option<pb::StudyRef> {
    Some(pb::StudyRef {
        study_id: id.into(),
        attributes: attrs(patient),
    })
}

/// A 512x512 16-bit (12 stored) head phantom: 512 KiB of pixels.
pub fn phantom() -> Image {
    tessera_image::phantom::head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 7).unwrap()
}

pub fn start(study_id: &str, patient: &str, image: &Image) -> pb::ProtectStart {
    pb::ProtectStart {
        study: study(study_id, patient),
        object_id: "obj-1".into(),
        spec: Some(watermark_service::convert::spec_to_proto(image.spec())),
        roi: Some(pb::Rect {
            x: 100,
            y: 120,
            width: 200,
            height: 180,
        }),
        profile: pb::Profile::Secure.into(),
    }
}

pub fn protect_msgs(
    start: pb::ProtectStart,
    pixels: &[u8],
    chunk: usize,
) -> Vec<pb::ProtectRequest> {
    let mut v = vec![pb::ProtectRequest {
        msg: Some(pb::protect_request::Msg::Start(start)),
    }];
    v.extend(pixels.chunks(chunk).map(|c| pb::ProtectRequest {
        msg: Some(pb::protect_request::Msg::Pixels(c.to_vec())),
    }));
    v
}

pub struct Protected {
    pub header_json: String,
    pub shares: [Vec<u8>; 2],
}

pub async fn protect(
    c: &mut WatermarkClient<Channel>,
    msgs: Vec<pb::ProtectRequest>,
) -> Result<Protected, Status> {
    let mut out = c.protect(tokio_stream::iter(msgs)).await?.into_inner();
    let first = out.message().await?.expect("a header message");
    let Some(pb::protect_response::Msg::Header(h)) = first.msg else {
        panic!("first response must be the header");
    };
    let mut shares = [Vec::new(), Vec::new()];
    let mut last_share = 1;
    while let Some(m) = out.message().await? {
        let Some(pb::protect_response::Msg::Share(c)) = m.msg else {
            panic!("only share chunks after the header");
        };
        assert!(c.data.len() <= CHUNK_BYTES);
        assert!(c.share >= last_share, "share 1 chunks come before share 2");
        last_share = c.share;
        shares[c.share as usize - 1].extend_from_slice(&c.data);
    }
    assert_eq!(shares[0].len() as u64, h.share1_bytes);
    assert_eq!(shares[1].len() as u64, h.share2_bytes);
    Ok(Protected {
        header_json: h.header_json,
        shares,
    })
}

pub fn open_start(study: Option<pb::StudyRef>, header_json: &str) -> pb::OpenStart {
    pb::OpenStart {
        study,
        header_json: header_json.into(),
    }
}

/// Share chunks of 200 KiB, share 2 interleaved with share 1.
pub fn share_chunks(s1: &[u8], s2: &[u8]) -> Vec<pb::ShareChunk> {
    let a = s1.chunks(200 * 1024).map(|d| (1, d));
    let b = s2.chunks(200 * 1024).map(|d| (2, d));
    let mut v: Vec<pb::ShareChunk> = Vec::new();
    let (mut a, mut b) = (a.peekable(), b.peekable());
    while a.peek().is_some() || b.peek().is_some() {
        for (share, d) in b.next().into_iter().chain(a.next()) {
            v.push(pb::ShareChunk {
                share,
                data: d.to_vec(),
            });
        }
    }
    v
}

pub fn verify_msgs(start: pb::OpenStart, chunks: Vec<pb::ShareChunk>) -> Vec<pb::VerifyRequest> {
    std::iter::once(pb::verify_request::Msg::Start(start))
        .chain(chunks.into_iter().map(pb::verify_request::Msg::Share))
        .map(|m| pb::VerifyRequest { msg: Some(m) })
        .collect()
}

pub fn restore_msgs(start: pb::OpenStart, chunks: Vec<pb::ShareChunk>) -> Vec<pb::RestoreRequest> {
    std::iter::once(pb::restore_request::Msg::Start(start))
        .chain(chunks.into_iter().map(pb::restore_request::Msg::Share))
        .map(|m| pb::RestoreRequest { msg: Some(m) })
        .collect()
}

pub async fn verify(
    c: &mut WatermarkClient<Channel>,
    msgs: Vec<pb::VerifyRequest>,
) -> Result<pb::VerificationReport, Status> {
    Ok(c.verify(tokio_stream::iter(msgs))
        .await?
        .into_inner()
        .report
        .expect("a report"))
}

pub async fn restore(
    c: &mut WatermarkClient<Channel>,
    msgs: Vec<pb::RestoreRequest>,
) -> Result<(pb::Restored, Vec<u8>), Status> {
    let mut out = c.restore(tokio_stream::iter(msgs)).await?.into_inner();
    let Some(pb::restore_response::Msg::Restored(r)) = out.message().await?.expect("first").msg
    else {
        panic!("first response must be `restored`");
    };
    let mut pixels = Vec::new();
    while let Some(m) = out.message().await? {
        let Some(pb::restore_response::Msg::Pixels(p)) = m.msg else {
            panic!("only pixels after `restored`");
        };
        assert!(p.len() <= CHUNK_BYTES);
        pixels.extend_from_slice(&p);
    }
    Ok((r, pixels))
}

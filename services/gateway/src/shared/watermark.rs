//! The watermark service's three calls as the flows use them: protect an
//! image into a header and two shares, restore pixels from the shares (with
//! the tamper report), verify the shares without releasing pixels.

use tessera_image::{Image, ImageSpec};
use tessera_proto::watermark::v1 as wpb;
use tonic::Status;

use crate::convert;
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result, study_ref};
use crate::vault::StudyRecord;

impl GatewayService {
    /// Has the watermark service protect the image: the header and both
    /// shares.
    pub(crate) async fn protect(
        &self,
        study: wpb::StudyRef,
        object_id: String,
        roi: Option<tessera_image::Rect>,
        image: Image,
    ) -> Result<(String, Vec<Vec<u8>>)> {
        let spec = *image.spec();
        let bytes = image.to_le_bytes();
        drop(image);
        self.protect_pixels(study, object_id, roi, spec, bytes)
            .await
    }

    /// [`Self::protect`] of the image's packed little-endian pixels: sent
    /// one chunk at a time as the stream goes out, the pixels released once
    /// the last chunk has left (the job then holds the shares, not the
    /// image as well).
    pub(crate) async fn protect_pixels(
        &self,
        study: wpb::StudyRef,
        object_id: String,
        roi: Option<tessera_image::Rect>,
        spec: ImageSpec,
        bytes: Vec<u8>,
    ) -> Result<(String, Vec<Vec<u8>>)> {
        let start = wpb::ProtectRequest {
            msg: Some(wpb::protect_request::Msg::Start(wpb::ProtectStart {
                study: Some(study),
                object_id,
                spec: Some(convert::spec_to_proto(&spec)),
                roi: roi.map(|r| tessera_wire::convert::watermark::rect_to_proto(&r)),
                profile: wpb::Profile::Secure.into(),
            })),
        };
        let msgs =
            std::iter::once(start).chain(tessera_wire::stream::owned_chunks(bytes).map(|c| {
                wpb::ProtectRequest {
                    msg: Some(wpb::protect_request::Msg::Pixels(c)),
                }
            }));
        let wm = |s: Status| GatewayError::upstream("watermark", s);
        let mut out = self
            .inner
            .up
            .watermark
            .clone()
            .protect(tokio_stream::iter(msgs))
            .await
            .map_err(wm)?
            .into_inner();
        let header = match out.message().await.map_err(wm)? {
            Some(wpb::ProtectResponse {
                msg: Some(wpb::protect_response::Msg::Header(h)),
            }) => h,
            Some(_) | None => {
                return Err(wm(Status::internal("protect: no header first")));
            }
        };
        let bound = (spec.byte_len() as u64) * 2 + (1 << 20);
        if header.share1_bytes > bound || header.share2_bytes > bound {
            return Err(wm(Status::internal("protect: shares larger than possible")));
        }
        let mut shares = vec![
            Vec::with_capacity(header.share1_bytes as usize),
            Vec::with_capacity(header.share2_bytes as usize),
        ];
        let want = [header.share1_bytes, header.share2_bytes];
        while let Some(m) = out.message().await.map_err(wm)? {
            match m.msg {
                Some(wpb::protect_response::Msg::Share(c)) if c.share == 1 || c.share == 2 => {
                    let i = c.share as usize - 1;
                    if shares[i].len() as u64 + c.data.len() as u64 > want[i] {
                        return Err(wm(Status::internal("protect: share longer than announced")));
                    }
                    shares[i].extend_from_slice(&c.data);
                }
                Some(_) | None => {
                    return Err(wm(Status::internal("protect: unexpected message")));
                }
            }
        }
        if shares[0].len() as u64 != want[0] || shares[1].len() as u64 != want[1] {
            return Err(wm(Status::internal(
                "protect: share shorter than announced",
            )));
        }
        Ok((header.header_json, shares))
    }

    /// The messages of a Restore or Verify: the start, then each share in
    /// chunks, copied one at a time as the stream goes out; each share is
    /// released once its last chunk has left.
    fn open_messages<T: Send + 'static>(
        study: wpb::StudyRef,
        header_json: String,
        shares: Vec<Vec<u8>>,
        start: impl Fn(wpb::OpenStart) -> T,
        chunk: impl Fn(wpb::ShareChunk) -> T + Copy + Send + 'static,
    ) -> impl Iterator<Item = T> + Send + 'static {
        let first = start(wpb::OpenStart {
            study: Some(study),
            header_json,
        });
        std::iter::once(first).chain(shares.into_iter().enumerate().flat_map(move |(i, s)| {
            tessera_wire::stream::owned_chunks(s).map(move |data| {
                chunk(wpb::ShareChunk {
                    share: i as u32 + 1,
                    data,
                })
            })
        }))
    }

    /// Restores the pixels through the watermark service; the report says
    /// which blocks and tiles were tampered with.
    pub(crate) async fn restore(
        &self,
        rec: &StudyRecord,
        shares: Vec<Vec<u8>>,
    ) -> Result<(wpb::VerificationReport, Vec<u8>)> {
        let want = rec.spec.to_spec().byte_len();
        self.restore_parts(study_ref(rec), rec.header_json.clone(), want, shares)
            .await
    }

    /// Restores `want` pixel bytes from the shares of one object.
    pub(crate) async fn restore_parts(
        &self,
        study: wpb::StudyRef,
        header_json: String,
        want: usize,
        shares: Vec<Vec<u8>>,
    ) -> Result<(wpb::VerificationReport, Vec<u8>)> {
        let msgs = Self::open_messages(
            study,
            header_json,
            shares,
            |s| wpb::RestoreRequest {
                msg: Some(wpb::restore_request::Msg::Start(s)),
            },
            |c| wpb::RestoreRequest {
                msg: Some(wpb::restore_request::Msg::Share(c)),
            },
        );
        let wm = |s: Status| GatewayError::upstream("watermark", s);
        let mut out = self
            .inner
            .up
            .watermark
            .clone()
            .restore(tokio_stream::iter(msgs))
            .await
            .map_err(wm)?
            .into_inner();
        let restored = match out.message().await.map_err(wm)? {
            Some(wpb::RestoreResponse {
                msg: Some(wpb::restore_response::Msg::Restored(r)),
            }) => r,
            Some(_) | None => return Err(wm(Status::internal("restore: no header first"))),
        };
        let mut pixels = Vec::with_capacity(want);
        while let Some(m) = out.message().await.map_err(wm)? {
            match m.msg {
                Some(wpb::restore_response::Msg::Pixels(p)) => {
                    if pixels.len() + p.len() > want {
                        return Err(wm(Status::internal(
                            "restore: more pixels than the study has",
                        )));
                    }
                    pixels.extend_from_slice(&p);
                }
                Some(wpb::restore_response::Msg::Restored(_)) | None => {
                    return Err(wm(Status::internal("restore: unexpected message")));
                }
            }
        }
        if pixels.len() != want {
            return Err(wm(Status::internal(
                "restore: fewer pixels than the study has",
            )));
        }
        Ok((restored.report.unwrap_or_default(), pixels))
    }

    pub(crate) async fn verify_shares(
        &self,
        rec: &StudyRecord,
        shares: Vec<Vec<u8>>,
    ) -> Result<wpb::VerificationReport> {
        self.verify_parts(study_ref(rec), rec.header_json.clone(), shares)
            .await
    }

    /// The watermark check of one object's shares.
    pub(crate) async fn verify_parts(
        &self,
        study: wpb::StudyRef,
        header_json: String,
        shares: Vec<Vec<u8>>,
    ) -> Result<wpb::VerificationReport> {
        let msgs = Self::open_messages(
            study,
            header_json,
            shares,
            |s| wpb::VerifyRequest {
                msg: Some(wpb::verify_request::Msg::Start(s)),
            },
            |c| wpb::VerifyRequest {
                msg: Some(wpb::verify_request::Msg::Share(c)),
            },
        );
        let r = self
            .inner
            .up
            .watermark
            .clone()
            .verify(tokio_stream::iter(msgs))
            .await
            .map_err(|s| GatewayError::upstream("watermark", s))?
            .into_inner();
        Ok(r.report.unwrap_or_default())
    }
}

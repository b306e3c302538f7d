//! Edge validation of gateway requests: every field checked and named
//! before any work starts.

use tessera_image::{ImageSpec, Rect};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::Identity;

use crate::error::GatewayError;

/// Data travels in chunks of this size.
pub use tessera_wire::CHUNK_BYTES;

/// Most patient attributes per study (the keyserver's limit).
pub const MAX_ATTRIBUTES: usize = 32;

fn invalid(m: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(m.into())
}

/// A checked Store header.
#[derive(Clone, Debug)]
pub struct StorePlan {
    pub owner: String,
    pub attributes: Vec<(String, String)>,
    pub format: pb::ImageFormat,
    pub size: u64,
    pub raw_spec: Option<ImageSpec>,
    pub roi: Option<Rect>,
}

/// Checks that `uri` names a user (the data owner of a study).
pub fn check_owner(field: &str, uri: &str) -> Result<(), GatewayError> {
    let owner = Identity::parse_uri(uri).map_err(|e| invalid(format!("{field}: {e}")))?;
    if owner.kind() != "user" {
        return Err(invalid(format!(
            "{field}: {uri} is not a user identity (spiffe://<domain>/user/<name>)"
        )));
    }
    Ok(())
}

impl StorePlan {
    /// Validates the header against the size limit.
    pub fn from_header(h: pb::StoreHeader, max_bytes: u64) -> Result<Self, GatewayError> {
        check_owner("header.owner", &h.owner)?;
        let attributes = check_attributes("header.patient_attributes", &h.patient_attributes)?;
        let format = pb::ImageFormat::try_from(h.format)
            .map_err(|_| invalid(format!("header.format: unknown value {}", h.format)))?;
        let raw_spec = match format {
            pb::ImageFormat::Unspecified => {
                return Err(invalid("header.format: must be PNG, TIFF or RAW"));
            }
            pb::ImageFormat::Dicom => {
                return Err(invalid(
                    "header.format: DICOM files go through StoreDicom (or the C-STORE SCP)",
                ));
            }
            pb::ImageFormat::Png | pb::ImageFormat::Tiff => {
                if h.raw_spec.is_some() {
                    return Err(invalid("header.raw_spec: only with format RAW"));
                }
                None
            }
            pb::ImageFormat::Raw => {
                let s = h
                    .raw_spec
                    .ok_or_else(|| invalid("header.raw_spec: required with format RAW"))?;
                let spec = spec_from_proto("header.raw_spec", s)?;
                if spec.byte_len() as u64 != h.size {
                    return Err(invalid(format!(
                        "header.size: {} bytes, but raw_spec declares {}",
                        h.size,
                        spec.byte_len()
                    )));
                }
                Some(spec)
            }
        };
        if h.size == 0 {
            return Err(invalid("header.size: must be at least 1"));
        }
        if h.size > max_bytes {
            return Err(GatewayError::TooLarge(format!(
                "header.size: the image is {} bytes, the limit is {max_bytes} (gateway.max_image_bytes)",
                h.size
            )));
        }
        let roi = h
            .roi
            .map(|r| tessera_wire::convert::watermark::rect_from_proto("header.roi", Some(r)))
            .transpose()?
            .filter(|r| !r.is_empty());
        Ok(Self {
            owner: h.owner,
            attributes,
            format,
            size: h.size,
            raw_spec,
            roi,
        })
    }
}

/// Checks attribute names and values as the keyserver will, so the caller
/// learns which field is wrong before anything is registered.
pub fn check_attributes(
    field: &str,
    attrs: &[kpb::Attribute],
) -> Result<Vec<(String, String)>, GatewayError> {
    if attrs.is_empty() || attrs.len() > MAX_ATTRIBUTES {
        return Err(invalid(format!(
            "{field}: 1..={MAX_ATTRIBUTES} attributes are required, got {}",
            attrs.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(attrs.len());
    for (i, a) in attrs.iter().enumerate() {
        let ok_name = (1..=64).contains(&a.name.len())
            && a.name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
            });
        if !ok_name {
            return Err(invalid(format!(
                "{field}[{i}].name: 1..=64 characters of [a-z0-9_.-]"
            )));
        }
        if a.value.len() > 1024 {
            return Err(invalid(format!("{field}[{i}].value: at most 1024 bytes")));
        }
        if !seen.insert(a.name.as_str()) {
            return Err(invalid(format!(
                "{field}[{i}].name: {:?} given twice",
                a.name
            )));
        }
        out.push((a.name.clone(), a.value.clone()));
    }
    Ok(out)
}

/// The attributes as keyserver messages.
pub fn attributes_to_proto(attrs: &[(String, String)]) -> Vec<kpb::Attribute> {
    attrs
        .iter()
        .map(|(n, v)| kpb::Attribute {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

/// Checks a study handle's shape ("st-" + 32 lowercase hex).
pub fn check_handle(field: &str, h: &str) -> Result<(), GatewayError> {
    let ok = h.len() == 35
        && h.starts_with("st-")
        && h[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field}: expected \"st-\" followed by 32 lowercase hex digits"
        )))
    }
}

/// Checks that a key request id was given (the keyserver checks its shape).
pub fn check_request_id(field: &str, id: &str) -> Result<(), GatewayError> {
    if id.is_empty() || id.len() > 128 {
        return Err(invalid(format!(
            "{field}: required (the approved key request id)"
        )));
    }
    Ok(())
}

pub use tessera_wire::convert::watermark::spec_to_proto;

/// Checks a spec and turns it into the core's type; errors name `field`.
pub fn spec_from_proto(field: &str, s: wpb::ImageSpec) -> Result<ImageSpec, GatewayError> {
    Ok(tessera_wire::convert::watermark::spec_from_proto(field, s)?)
}

pub use tessera_wire::stream::chunks;

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> pb::StoreHeader {
        pb::StoreHeader {
            owner: "spiffe://tessera.local/user/owner".into(),
            patient_attributes: vec![kpb::Attribute {
                name: "patient_id".into(),
                value: "P-1".into(),
            }],
            format: pb::ImageFormat::Png.into(),
            size: 100,
            raw_spec: None,
            roi: None,
        }
    }

    fn err(h: pb::StoreHeader) -> String {
        match StorePlan::from_header(h, 1000) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(StorePlan::from_header(header(), 1000).is_ok());
        let mut h = header();
        h.owner = "spiffe://tessera.local/service/gateway".into();
        assert!(err(h).starts_with("header.owner"));
        let mut h = header();
        h.owner = "owner".into();
        assert!(err(h).starts_with("header.owner"));
        let mut h = header();
        h.patient_attributes.clear();
        assert!(err(h).starts_with("header.patient_attributes"));
        let mut h = header();
        h.patient_attributes[0].name = "Patient Name".into();
        assert!(err(h).starts_with("header.patient_attributes[0].name"));
        let mut h = header();
        h.patient_attributes.push(h.patient_attributes[0].clone());
        assert!(err(h).starts_with("header.patient_attributes[1].name"));
        let mut h = header();
        h.format = 0;
        assert!(err(h).starts_with("header.format"));
        let mut h = header();
        h.format = 99;
        assert!(err(h).starts_with("header.format"));
        let mut h = header();
        h.format = pb::ImageFormat::Raw.into();
        assert!(err(h).starts_with("header.raw_spec"));
        let mut h = header();
        h.format = pb::ImageFormat::Raw.into();
        h.raw_spec = Some(wpb::ImageSpec {
            width: 11,
            height: 10,
            frames: 1,
            bits_allocated: 8,
            bits_stored: 8,
            signed: false,
            channels: 1,
        });
        assert!(err(h).starts_with("header.size"), "100 bytes != 11x10");
        let mut h = header();
        h.size = 0;
        assert!(err(h).starts_with("header.size"));
        let mut h = header();
        h.size = 1001;
        assert!(matches!(
            StorePlan::from_header(h, 1000),
            Err(GatewayError::TooLarge(_))
        ));
    }

    #[test]
    fn handles_are_checked() {
        assert!(check_handle("h", "st-0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "st-",
            "st-0123456789ABCDEF0123456789abcdef",
            "xx-0123456789abcdef0123456789abcdef",
            "st-0123456789abcdef0123456789abcdef0",
        ] {
            assert!(check_handle("h", bad).is_err(), "{bad}");
        }
    }
}

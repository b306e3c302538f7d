//! The DICOM JSON model (PS3.18 F.2) of the query index's attributes:
//! `{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}`, multiple values split
//! at `\`, person names as `{"Alphabetic": ...}`, IS/DS/US as numbers, an
//! empty value as an attribute without `Value`.

use serde_json::{Map, Value, json};
use tessera_dicom::query::{TagPair, VR};

/// One data set.
pub fn dataset(values: &[(TagPair, String)], vr_of: impl Fn(TagPair) -> VR) -> Value {
    let mut sorted: Vec<&(TagPair, String)> = values.iter().collect();
    sorted.sort_by_key(|(t, _)| *t);
    let mut obj = Map::new();
    for ((g, e), v) in sorted {
        obj.insert(format!("{g:04X}{e:04X}"), attribute(vr_of((*g, *e)), v));
    }
    Value::Object(obj)
}

/// One attribute.
pub fn attribute(vr: VR, value: &str) -> Value {
    let mut a = Map::new();
    a.insert("vr".into(), Value::String(vr.to_string().into()));
    if !value.is_empty() {
        let values: Vec<Value> = value.split('\\').map(|v| one_value(vr, v)).collect();
        a.insert("Value".into(), Value::Array(values));
    }
    Value::Object(a)
}

fn one_value(vr: VR, v: &str) -> Value {
    let v = v.trim();
    match vr {
        VR::PN => json!({ "Alphabetic": v }),
        VR::IS | VR::SL | VR::SS | VR::UL | VR::US | VR::SV | VR::UV => v
            .parse::<i64>()
            .map_or_else(|_| Value::String(v.to_owned()), Value::from),
        VR::DS | VR::FL | VR::FD => v
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(v.to_owned()), Value::Number),
        VR::AE
        | VR::AS
        | VR::AT
        | VR::CS
        | VR::DA
        | VR::DT
        | VR::LO
        | VR::LT
        | VR::OB
        | VR::OD
        | VR::OF
        | VR::OL
        | VR::OV
        | VR::OW
        | VR::SH
        | VR::SQ
        | VR::ST
        | VR::TM
        | VR::UC
        | VR::UI
        | VR::UN
        | VR::UR
        | VR::UT => Value::String(v.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use crate::dicomweb::json::*;

    fn vr(t: TagPair) -> VR {
        match t {
            (0x0010, 0x0010) => VR::PN,
            (0x0020, 0x1208) => VR::IS,
            (0x0008, 0x0061) => VR::CS,
            _ => VR::UI,
        }
    }

    #[test]
    fn writes_the_json_model() {
        let ds = dataset(
            &[
                ((0x0020, 0x1208), "12".into()),
                ((0x0010, 0x0010), "DOE^JANE".into()),
                ((0x0008, 0x0061), "CT\\MR".into()),
                ((0x0020, 0x000D), "1.2.3".into()),
                ((0x0008, 0x0018), String::new()),
            ],
            vr,
        );
        assert_eq!(
            ds,
            json!({
                "00080018": {"vr": "UI"},
                "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
                "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                "00201208": {"vr": "IS", "Value": [12]},
            })
        );
        let keys: Vec<&String> = ds.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "tags in ascending order");
    }

    #[test]
    fn a_number_that_does_not_parse_stays_text() {
        assert_eq!(
            attribute(VR::IS, "1x"),
            json!({"vr": "IS", "Value": ["1x"]})
        );
        assert_eq!(
            attribute(VR::DS, "2.5"),
            json!({"vr": "DS", "Value": [2.5]})
        );
    }
}

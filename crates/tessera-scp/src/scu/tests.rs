//! Unit tests of [`super`] (scu.rs).

use super::*;

fn element(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    if long_length_vr(*vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    out
}

/// A Part 10 file with the given meta elements after the group length.
fn file(meta: &[Vec<u8>], dataset: &[u8]) -> Vec<u8> {
    let body: Vec<u8> = meta.concat();
    let mut out = vec![0; 128];
    out.extend_from_slice(b"DICM");
    out.extend(element(
        (0x0002, 0x0000),
        b"UL",
        &(body.len() as u32).to_le_bytes(),
    ));
    out.extend(body);
    out.extend_from_slice(dataset);
    out
}

fn good_meta() -> Vec<Vec<u8>> {
    vec![
        element((0x0002, 0x0001), b"OB", &[0, 1]),
        element((0x0002, 0x0002), b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
        element((0x0002, 0x0003), b"UI", b"1.2.3.4\0"),
        element((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0"),
        element((0x0002, 0x0012), b"UI", b"1.2.3\0"),
    ]
}

#[test]
fn splits_a_part10_file() {
    let dataset = element((0x0008, 0x0060), b"CS", b"CT");
    let bytes = file(&good_meta(), &dataset);
    let p = split_part10(&bytes).unwrap();
    assert_eq!(p.sop_class, "1.2.840.10008.5.1.4.1.1.2");
    assert_eq!(p.sop_instance, "1.2.3.4");
    assert_eq!(p.transfer_syntax, "1.2.840.10008.1.2.1");
    assert_eq!(p.dataset, &dataset[..]);
    // Without the preamble too.
    let p = split_part10(&bytes[128..]).unwrap();
    assert_eq!(p.dataset, &dataset[..]);
}

#[test]
fn refuses_what_is_not_part10() {
    let dataset = element((0x0008, 0x0060), b"CS", b"CT");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("no magic", vec![0; 300]),
        ("meta only", file(&good_meta(), &[])),
        ("truncated", {
            let mut b = file(&good_meta(), &dataset);
            b.truncate(160);
            b
        }),
        ("huge length", {
            let mut meta = good_meta();
            let mut e = element((0x0002, 0x0001), b"OB", &[0, 1]);
            e[8..12].copy_from_slice(&0xFFFF_FFF0_u32.to_le_bytes());
            meta[0] = e;
            file(&meta, &dataset)
        }),
        ("bad uid", {
            let mut meta = good_meta();
            meta[2] = element((0x0002, 0x0003), b"UI", b"../etc\0\0");
            file(&meta, &dataset)
        }),
        ("no transfer syntax", {
            let mut meta = good_meta();
            meta.remove(3);
            file(&meta, &dataset)
        }),
    ];
    for (name, bytes) in cases {
        assert!(split_part10(&bytes).is_err(), "{name}");
    }
}

/// The futures can be spawned on a multi-threaded runtime.
#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let opts = ScuOptions::default();
    let files = Vec::new();
    let mut count = 0;
    let send = send_files("127.0.0.1:1", &opts, &files, |done, _| count = done);
    assert_send(&send);
    assert_send(&echo("127.0.0.1:1", &opts));
}

#[test]
fn options_are_checked() {
    assert!(validate(&ScuOptions::default()).is_ok());
    for bad in [
        ScuOptions {
            calling_ae: String::new(),
            ..ScuOptions::default()
        },
        ScuOptions {
            called_ae: "WAY_TOO_LONG_AE_TITLE".into(),
            ..ScuOptions::default()
        },
        ScuOptions {
            max_pdu_length: 10,
            ..ScuOptions::default()
        },
        ScuOptions {
            timeout: Duration::ZERO,
            ..ScuOptions::default()
        },
    ] {
        assert!(
            matches!(validate(&bad), Err(ScuError::InvalidOptions(_))),
            "{bad:?}"
        );
    }
}

//! `multipart/related` (RFC 2387) as DICOMweb uses it: WADO-RS answers
//! written part by part, STOW-RS requests parsed from one bounded body.

/// One part of a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The part's Content-Type (empty when the part names none).
    pub content_type: String,
    pub body: &'a [u8],
}

/// A boundary no DICOM file is likely to contain (random, 32 hex digits).
pub fn new_boundary() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map(|()| format!("tessera-{}", hex::encode(b)))
        .unwrap_or_else(|_| "tessera-boundary-5f7c1e2a9b3d4c6e8f0a".to_owned())
}

/// The Content-Type of an answer of `part_type` parts.
pub fn content_type(boundary: &str, part_type: &str) -> String {
    format!("multipart/related; type=\"{part_type}\"; boundary={boundary}")
}

/// The bytes before a part's body.
pub fn part_head(boundary: &str, part_type: &str, len: usize) -> Vec<u8> {
    format!("--{boundary}\r\nContent-Type: {part_type}\r\nContent-Length: {len}\r\n\r\n")
        .into_bytes()
}

/// The bytes after the last part (each body is followed by CRLF first).
pub fn closing(boundary: &str) -> Vec<u8> {
    format!("--{boundary}--\r\n").into_bytes()
}

/// A whole answer of `parts`.
pub fn write_all(boundary: &str, part_type: &str, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend(part_head(boundary, part_type, p.len()));
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend(closing(boundary));
    out
}

/// A media-type parameter (`boundary`, `type`), unquoted; names are
/// case-insensitive.
pub fn parameter(content_type: &str, name: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The media type without parameters, lower case.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Splits a `multipart/related` body by the boundary of `content_type`.
pub fn parse<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, String> {
    if media_type(content_type) != "multipart/related" {
        return Err(format!(
            "Content-Type {content_type:?}: multipart/related; type=\"application/dicom\" expected"
        ));
    }
    let boundary = parameter(content_type, "boundary")
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or("Content-Type names no boundary")?;
    let delim = format!("--{boundary}").into_bytes();
    let mut at = find(body, &delim, 0).ok_or("the body holds no part")?;
    let mut parts = Vec::new();
    loop {
        let after = at + delim.len();
        if body.get(after..after + 2) == Some(b"--") {
            break;
        }
        // The rest of the delimiter line (transport padding), then headers.
        let line_end = find(body, b"\r\n", after).ok_or("a part has no header")?;
        // No headers: the delimiter line is followed by an empty line.
        let (headers, start) = if body.get(line_end..line_end + 4) == Some(b"\r\n\r\n") {
            ("", line_end + 4)
        } else {
            let head_end =
                find(body, b"\r\n\r\n", line_end + 2).ok_or("a part's headers do not end")?;
            let h = std::str::from_utf8(&body[line_end + 2..head_end])
                .map_err(|_| "a part's headers are not text")?;
            (h, head_end + 4)
        };
        let content_type = headers
            .split("\r\n")
            .find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        let mut close = delim.clone();
        close.splice(0..0, *b"\r\n");
        let end = find(body, &close, start).ok_or("a part does not end with the boundary")?;
        parts.push(Part {
            content_type,
            body: &body[start..end],
        });
        at = end + 2;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use crate::dicomweb::multipart::*;

    #[test]
    fn written_parts_parse_back_byte_identical() {
        let b = new_boundary();
        let parts = vec![
            b"DICM\r\n--not-the-boundary\r\n".to_vec(),
            vec![0u8; 0],
            (0..=255u8).collect(),
        ];
        let body = write_all(&b, "application/dicom", &parts);
        let ct = content_type(&b, "application/dicom");
        assert_eq!(parameter(&ct, "type").as_deref(), Some("application/dicom"));
        let got = parse(&ct, &body).unwrap();
        assert_eq!(got.len(), 3);
        for (g, p) in got.iter().zip(&parts) {
            assert_eq!(g.content_type, "application/dicom");
            assert_eq!(g.body, p.as_slice());
        }
    }

    #[test]
    fn parses_a_preamble_quoted_boundary_and_no_part_headers() {
        let body = b"preamble\r\n--abc\r\n\r\nONE\r\n--abc\r\ncontent-type: application/dicom\r\n\r\nTWO\r\n--abc--\r\nepilogue";
        let got = parse(
            "Multipart/Related; type=\"application/dicom\"; boundary=\"abc\"",
            body,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Part {
                    content_type: String::new(),
                    body: b"ONE"
                },
                Part {
                    content_type: "application/dicom".into(),
                    body: b"TWO"
                },
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_multipart_related() {
        assert!(parse("application/dicom", b"x").is_err());
        assert!(parse("multipart/related; type=\"application/dicom\"", b"x").is_err());
        assert!(
            parse(
                "multipart/related; boundary=abc",
                b"--abc\r\n\r\nunterminated"
            )
            .is_err()
        );
        assert!(parse("multipart/related; boundary=abc", b"no delimiter").is_err());
    }
}

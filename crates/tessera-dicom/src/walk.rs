//! Finds where things are in the original bytes.
//!
//! The dicom-rs token reader ([`DataSetReader`]) does all the decoding; this
//! module only counts the bytes it consumes, so each element's byte range in
//! the file is known exactly. It also checks every declared value length
//! against the bytes left *before* dicom-rs allocates a buffer for it, so a
//! lying length is refused instead of allocating gigabytes.

use std::cell::Cell;
use std::io::Read;
use std::ops::Range;
use std::rc::Rc;

use dicom_core::header::{HasLength, Header};
use dicom_core::{Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_parser::dataset::DataToken;
use dicom_parser::dataset::read::{DataSetReader, DataSetReaderOptions, ValueReadStrategy};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

use crate::{DicomError, error_chain, is_identifying};

/// Deepest sequence nesting accepted. dicom-object builds nested items
/// recursively, so an unbounded depth could overflow the stack.
pub const MAX_DEPTH: usize = 32;

/// Deflated Explicit VR Little Endian: byte offsets would point into the
/// compressed stream, so the split cannot cut values out of it.
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Where the top-level Pixel Data element sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PixelElement {
    pub value: Range<u64>,
    pub encapsulated: bool,
    pub vr: VR,
}

/// The byte layout of one file.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Offset of "DICM".
    pub magic_at: u64,
    pub transfer_syntax: String,
    /// Outermost identifying elements (header and value), in file order.
    pub identifying: Vec<Range<u64>>,
    pub pixel: Option<PixelElement>,
}

/// A `Read` over a slice that tells how many bytes were handed out.
struct Counting<'a> {
    data: &'a [u8],
    pos: Rc<Cell<usize>>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = self.pos.get().min(self.data.len());
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        self.pos.set(start + n);
        Ok(n)
    }
}

enum Open {
    Element {
        start: u64,
        /// Start of the value (for the pixel sequence).
        value_start: u64,
        cut: bool,
        pixel: bool,
    },
    Item,
}

struct Walker {
    total: u64,
    stack: Vec<Open>,
    /// Inside an element that is cut out whole.
    cut_depth: usize,
    identifying: Vec<Range<u64>>,
    pixel: Option<PixelElement>,
    pending: Option<(Tag, VR, u64, u64, u32)>,
}

impl Walker {
    fn depth(&self) -> usize {
        self.stack
            .iter()
            .filter(|o| matches!(o, Open::Element { .. }))
            .count()
    }

    fn in_pixel_sequence(&self) -> bool {
        self.stack
            .iter()
            .rev()
            .find_map(|o| match o {
                Open::Element { pixel, .. } => Some(*pixel),
                Open::Item => None,
            })
            .unwrap_or(false)
    }

    fn check_len(&self, tag: Tag, len: Length, at: u64) -> Result<(), DicomError> {
        if let Some(len) = len.get() {
            let remaining = self.total.saturating_sub(at);
            if u64::from(len) > remaining {
                return Err(DicomError::LyingLength {
                    tag: fmt_tag(tag),
                    length: len,
                    offset: at,
                    remaining,
                });
            }
        }
        Ok(())
    }

    fn element_done(&mut self, start: u64, end: u64, cut: bool) {
        if cut {
            self.identifying.push(start..end);
            self.cut_depth = 0;
        }
    }

    fn token(&mut self, token: DataToken, before: u64, after: u64) -> Result<(), DicomError> {
        match token {
            DataToken::ElementHeader(h) => {
                self.check_len(h.tag(), h.length(), after)?;
                let len = h.length().get().unwrap_or(0);
                // dicom-object decodes fixed-width binary values in whole
                // words but counts the declared length as read: a length
                // that is not a multiple of the width leaves its reader
                // behind, reading later bytes as headers (found by fuzzing:
                // a 48 KB file made it allocate 1.2 GB). The top-level
                // Pixel Data is never decoded there.
                let pixel = self.depth() == 0 && h.tag() == tags::PIXEL_DATA;
                if let Some(width) = fixed_width(h.vr())
                    && !pixel
                    && len % width != 0
                {
                    return Err(DicomError::Malformed(format!(
                        "element {} {:?}: {len} bytes, not a multiple of {width}",
                        fmt_tag(h.tag()),
                        h.vr()
                    )));
                }
                self.pending = Some((h.tag(), h.vr(), before, after, len));
            }
            DataToken::PrimitiveValue(_) => {
                let (tag, vr, start, value_start, len) = self
                    .pending
                    .take()
                    .ok_or_else(|| DicomError::Malformed("value without a header".into()))?;
                let end = value_start + u64::from(len);
                if end != after {
                    return Err(DicomError::Malformed(format!(
                        "value of {} ends at {after}, expected {end}",
                        fmt_tag(tag)
                    )));
                }
                let top = self.depth() == 0;
                if top && tag == tags::PIXEL_DATA {
                    self.set_pixel(value_start..end, false, vr)?;
                }
                let cut = self.cut_depth == 0 && is_identifying(tag);
                self.element_done(start, end, cut);
            }
            DataToken::SequenceStart { tag, .. } => {
                self.open_element(tag, before, after, false)?;
            }
            DataToken::PixelSequenceStart => {
                self.open_element(tags::PIXEL_DATA, before, after, true)?;
            }
            DataToken::ItemStart { len } => {
                if self.in_pixel_sequence() {
                    self.check_len(Tag(0xFFFE, 0xE000), len, after)?;
                }
                self.stack.push(Open::Item);
            }
            DataToken::ItemEnd => match self.stack.pop() {
                Some(Open::Item) => {}
                Some(Open::Element { .. }) | None => {
                    return Err(DicomError::Malformed("item end outside an item".into()));
                }
            },
            DataToken::SequenceEnd => {
                let depth = self.depth();
                match self.stack.pop() {
                    Some(Open::Element {
                        start,
                        value_start,
                        cut,
                        pixel,
                    }) => self.close_element(start, value_start, after, cut, pixel, depth)?,
                    Some(Open::Item) | None => {
                        return Err(DicomError::Malformed(
                            "sequence end outside a sequence".into(),
                        ));
                    }
                }
            }
            DataToken::ItemValue(_) | DataToken::OffsetTable(_) => {}
        }
        Ok(())
    }

    fn open_element(
        &mut self,
        tag: Tag,
        start: u64,
        value_start: u64,
        pixel: bool,
    ) -> Result<(), DicomError> {
        if self.depth() >= MAX_DEPTH {
            return Err(DicomError::Malformed(format!(
                "sequences nested deeper than {MAX_DEPTH}"
            )));
        }
        let cut = self.cut_depth == 0 && is_identifying(tag);
        self.stack.push(Open::Element {
            start,
            value_start,
            cut,
            pixel,
        });
        if cut {
            self.cut_depth = self.depth();
        }
        Ok(())
    }

    fn close_element(
        &mut self,
        start: u64,
        value_start: u64,
        end: u64,
        cut: bool,
        pixel: bool,
        depth: usize,
    ) -> Result<(), DicomError> {
        if pixel && depth == 1 {
            self.set_pixel(value_start..end, true, VR::OB)?;
        }
        self.element_done(start, end, cut);
        Ok(())
    }

    fn set_pixel(
        &mut self,
        value: Range<u64>,
        encapsulated: bool,
        vr: VR,
    ) -> Result<(), DicomError> {
        if self.pixel.is_some() {
            return Err(DicomError::Malformed("two Pixel Data elements".into()));
        }
        self.pixel = Some(PixelElement {
            value,
            encapsulated,
            vr,
        });
        Ok(())
    }

    /// Closes whatever a truncated-but-accepted stream left open (dicom-rs
    /// ends gracefully at EOF inside an undefined-length sequence).
    fn finish(&mut self, end: u64) -> Result<(), DicomError> {
        if let Some((tag, ..)) = self.pending {
            return Err(DicomError::Malformed(format!(
                "file ends inside {}",
                fmt_tag(tag)
            )));
        }
        while let Some(open) = self.stack.pop() {
            let depth = self.depth() + 1;
            if let Open::Element {
                start,
                value_start,
                cut,
                pixel,
            } = open
            {
                self.close_element(start, value_start, end, cut, pixel, depth)?;
            }
        }
        Ok(())
    }
}

pub fn fmt_tag(tag: Tag) -> String {
    format!("({:04X},{:04X})", tag.group(), tag.element())
}

/// Walks the whole file.
pub fn walk(bytes: &[u8]) -> Result<Layout, DicomError> {
    let magic_at = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        128
    } else if bytes.len() >= 4 && &bytes[..4] == b"DICM" {
        0
    } else {
        return Err(DicomError::NotPart10(
            "no \"DICM\" magic at offset 128 or 0",
        ));
    };
    let total = bytes.len() as u64;
    let mut walker = Walker {
        total,
        stack: Vec::new(),
        cut_depth: 0,
        identifying: Vec::new(),
        pixel: None,
        pending: None,
    };

    // File meta group: always explicit VR little endian; it ends where the
    // next element's group is not 0002.
    let meta_start = magic_at as usize + 4;
    let pos = Rc::new(Cell::new(meta_start));
    let reader = Counting {
        data: bytes,
        pos: pos.clone(),
    };
    let explicit = EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let options = DataSetReaderOptions::default().value_read(ValueReadStrategy::Raw);
    let mut meta = DataSetReader::new_with_ts_options(reader, &explicit, options)
        .map_err(|e| DicomError::Malformed(error_chain(&e)))?;
    let mut transfer_syntax = None;
    let mut current = None;
    loop {
        let at = pos.get();
        if walker.pending.is_none() {
            let group = bytes
                .get(at..at + 2)
                .map(|g| u16::from_le_bytes([g[0], g[1]]));
            if group != Some(0x0002) {
                break;
            }
        }
        let Some(token) = meta.next() else { break };
        let token = token
            .map_err(|e| DicomError::Malformed(format!("file meta group: {}", error_chain(&e))))?;
        match &token {
            DataToken::ElementHeader(h) => current = Some(h.tag()),
            DataToken::PrimitiveValue(v) if current == Some(tags::TRANSFER_SYNTAX_UID) => {
                let raw = v.to_bytes();
                let uid = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\0', ' '])
                    .to_string();
                transfer_syntax = Some(uid);
            }
            DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart => {
                return Err(DicomError::Malformed(
                    "sequence in the file meta group".into(),
                ));
            }
            DataToken::PrimitiveValue(_)
            | DataToken::SequenceEnd
            | DataToken::ItemStart { .. }
            | DataToken::ItemEnd
            | DataToken::ItemValue(_)
            | DataToken::OffsetTable(_) => {}
        }
        walker.token(token, at as u64, pos.get() as u64)?;
    }
    drop(meta);
    let meta_end = pos.get();
    let transfer_syntax = transfer_syntax.ok_or(DicomError::NotPart10(
        "the file meta group has no Transfer Syntax UID (0002,0010)",
    ))?;
    let ts = TransferSyntaxRegistry
        .get(&transfer_syntax)
        .ok_or_else(|| DicomError::UnknownTransferSyntax(transfer_syntax.clone()))?;
    if ts.is_unsupported() || !ts.can_decode_dataset() || ts.uid() == DEFLATED {
        return Err(DicomError::UnsupportedTransferSyntax {
            uid: transfer_syntax,
            name: ts.name().to_string(),
            reason: "the data set is not stored as plain elements (deflated or unknown encoding)",
        });
    }

    // The data set.
    let pos = Rc::new(Cell::new(meta_end));
    let reader = Counting {
        data: bytes,
        pos: pos.clone(),
    };
    let mut data = DataSetReader::new_with_ts_options(reader, ts, options)
        .map_err(|e| DicomError::Malformed(error_chain(&e)))?;
    loop {
        let at = pos.get();
        let Some(token) = data.next() else { break };
        let token = token.map_err(|e| DicomError::Malformed(error_chain(&e)))?;
        walker.token(token, at as u64, pos.get() as u64)?;
    }
    walker.finish(pos.get() as u64)?;
    Ok(Layout {
        magic_at: magic_at as u64,
        transfer_syntax,
        identifying: walker.identifying,
        pixel: walker.pixel,
    })
}

/// The word size of the binary VRs dicom-object decodes word by word.
fn fixed_width(vr: VR) -> Option<u32> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => Some(4),
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => Some(8),
        VR::AE
        | VR::AS
        | VR::CS
        | VR::DA
        | VR::DS
        | VR::DT
        | VR::IS
        | VR::LO
        | VR::LT
        | VR::OB
        | VR::PN
        | VR::SH
        | VR::SQ
        | VR::ST
        | VR::TM
        | VR::UC
        | VR::UI
        | VR::UN
        | VR::UR
        | VR::UT => None,
    }
}

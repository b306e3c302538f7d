//! PS3.15 Annex E Table E.1-1, loaded from `data/table_e1_1.tsv` (the source
//! and the columns are described in that file's header).

use std::collections::HashMap;
use std::sync::LazyLock;

use dicom_core::Tag;

const TABLE_TSV: &str = include_str!("../data/table_e1_1.tsv");

/// The Basic Profile column of Table E.1-1 (names follow the table's
/// notation, hence the acronyms).
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basic {
    /// Remove.
    X,
    /// Zero length (or a dummy value when the VR forbids it).
    Z,
    /// A non-zero-length dummy value.
    D,
    /// A UID replaced consistently (here: keyed mapping, see `UidMap`).
    U,
    /// X unless Z is needed for IOD conformance.
    XZ,
    /// X unless D is needed for IOD conformance.
    XD,
    /// X unless Z or D is needed for IOD conformance.
    XZD,
    /// Z unless D is needed for IOD conformance.
    ZD,
    /// X unless Z, or U on the contained UIDs, is needed for IOD conformance.
    XZUStar,
}

impl Basic {
    fn parse(s: &str) -> Option<Basic> {
        Some(match s {
            "X" => Basic::X,
            "Z" => Basic::Z,
            "D" => Basic::D,
            "U" => Basic::U,
            "X/Z" => Basic::XZ,
            "X/D" => Basic::XD,
            "X/Z/D" => Basic::XZD,
            "Z/D" => Basic::ZD,
            "X/Z/U*" => Basic::XZUStar,
            _ => return None,
        })
    }
}

/// What a Retain Longitudinal Temporal Information option column says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionAction {
    /// The option leaves the basic action alone.
    Basic,
    /// Keep.
    K,
    /// Clean (for dates: shift them).
    C,
}

impl OptionAction {
    fn parse(s: &str) -> Option<OptionAction> {
        Some(match s {
            "-" => OptionAction::Basic,
            "K" => OptionAction::K,
            "C" => OptionAction::C,
            _ => return None,
        })
    }
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub group: u16,
    pub group_mask: u16,
    pub element: u16,
    pub element_mask: u16,
    pub basic: Basic,
    pub full_dates: OptionAction,
    pub modified_dates: OptionAction,
    pub name: &'static str,
}

impl Row {
    fn matches(&self, tag: Tag) -> bool {
        tag.group() & self.group_mask == self.group
            && tag.element() & self.element_mask == self.element
    }
}

pub struct Table {
    exact: HashMap<Tag, Row>,
    /// Rows with repeating groups (50xx,xxxx), (60xx,3000), (60xx,4000).
    patterns: Vec<Row>,
    rows: usize,
}

impl Table {
    pub fn get(&self, tag: Tag) -> Option<&Row> {
        self.exact
            .get(&tag)
            .or_else(|| self.patterns.iter().find(|r| r.matches(tag)))
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    #[cfg(test)]
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.exact.values().chain(self.patterns.iter())
    }
}

/// Parses "0010xx20"-style 8-character tags: `x` is any hex digit.
fn parse_half(s: &str) -> Option<(u16, u16)> {
    if s.len() != 4 {
        return None;
    }
    let mut value = 0u16;
    let mut mask = 0u16;
    for c in s.chars() {
        value <<= 4;
        mask <<= 4;
        if c != 'x' {
            value |= c.to_digit(16)? as u16;
            mask |= 0xF;
        }
    }
    Some((value, mask))
}

pub(crate) fn parse_table(text: &'static str) -> Result<Table, String> {
    let mut exact = HashMap::new();
    let mut patterns = Vec::new();
    let mut rows = 0;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let bad = || format!("table_e1_1.tsv line {}: {line:?}", n + 1);
        let cols: Vec<&'static str> = line.split('\t').collect();
        let [tag, basic, full, modified, name] = cols[..] else {
            return Err(bad());
        };
        if tag.len() != 8 {
            return Err(bad());
        }
        let (group, group_mask) = parse_half(&tag[..4]).ok_or_else(bad)?;
        let (element, element_mask) = parse_half(&tag[4..]).ok_or_else(bad)?;
        let row = Row {
            group,
            group_mask,
            element,
            element_mask,
            basic: Basic::parse(basic).ok_or_else(bad)?,
            full_dates: OptionAction::parse(full).ok_or_else(bad)?,
            modified_dates: OptionAction::parse(modified).ok_or_else(bad)?,
            name,
        };
        rows += 1;
        if group_mask == 0xFFFF && element_mask == 0xFFFF {
            if exact.insert(Tag(group, element), row).is_some() {
                return Err(format!("{} (duplicate tag)", bad()));
            }
        } else {
            patterns.push(row);
        }
    }
    Ok(Table {
        exact,
        patterns,
        rows,
    })
}

/// The table, parsed once. The embedded file is checked by the unit tests
/// below, so the parse cannot fail in a built crate.
pub static TABLE: LazyLock<Table> =
    LazyLock::new(|| parse_table(TABLE_TSV).expect("data/table_e1_1.tsv is checked by unit tests"));

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::DataDictionary;
    use dicom_dictionary_std::StandardDataDictionary;

    #[test]
    fn embedded_table_parses_with_every_row() {
        let table = parse_table(TABLE_TSV).unwrap();
        assert_eq!(table.len(), 620);
        assert_eq!(table.get(Tag(0x0010, 0x0010)).unwrap().basic, Basic::Z);
        assert_eq!(table.get(Tag(0x0020, 0x000D)).unwrap().basic, Basic::U);
        assert_eq!(table.get(Tag(0x6002, 0x3000)).unwrap().name, "Overlay Data");
        assert_eq!(table.get(Tag(0x5010, 0x1234)).unwrap().name, "Curve Data");
        assert!(
            table.get(Tag(0x0028, 0x0010)).is_none(),
            "Rows is not identifying"
        );
        let acq = table.get(Tag(0x0008, 0x0022)).unwrap();
        assert_eq!(
            (acq.full_dates, acq.modified_dates),
            (OptionAction::K, OptionAction::C)
        );
    }

    /// dicom-dictionary-std knows every concrete tag of the table (a new
    /// table row it lacks would still be handled by tag, but should be
    /// noted in docs/DICOM.md).
    #[test]
    fn table_agrees_with_the_dicom_rs_dictionary() {
        let dict = StandardDataDictionary;
        let mut unknown = Vec::new();
        for row in TABLE.rows() {
            if row.group_mask != 0xFFFF || row.element_mask != 0xFFFF {
                continue;
            }
            if dict.by_tag(Tag(row.group, row.element)).is_none() {
                unknown.push(format!(
                    "({:04X},{:04X}) {}",
                    row.group, row.element, row.name
                ));
            }
        }
        unknown.sort();
        println!("table rows unknown to dicom-dictionary-std: {unknown:#?}");
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn malformed_rows_are_rejected() {
        assert!(parse_table("0010001\tZ\t-\t-\tx\n").is_err());
        assert!(parse_table("00100010\tQ\t-\t-\tx\n").is_err());
        assert!(parse_table("00100010\tZ\t-\t-\n").is_err());
        assert!(parse_table("00100010\tZ\t-\t-\ta\n00100010\tZ\t-\t-\tb\n").is_err());
    }
}

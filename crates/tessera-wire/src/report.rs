//! The watermark core's verification report as a `tessera.watermark.v1`
//! message: what the watermark service sends and what the CLI prints after
//! an offline restore.

use tessera_cryptomark::{TamperedBlock, TamperedTile, VerificationReport};
use tessera_proto::watermark::v1 as pb;

use crate::convert::watermark::rect_to_proto;

/// Entries of each tamper list carried in one report; the totals are
/// always exact and `truncated` says when a list was cut.
pub const MAX_REPORT_ENTRIES: usize = 4096;

/// The report as a proto, each list cut at [`MAX_REPORT_ENTRIES`] so the
/// message stays small whatever the damage.
pub fn report_to_proto(r: &VerificationReport) -> pb::VerificationReport {
    let block = |b: &TamperedBlock| pb::TamperedBlock {
        index: b.index,
        frame: b.frame,
        rect: Some(rect_to_proto(&b.rect)),
    };
    let tile = |t: &TamperedTile| pb::TamperedTile {
        index: t.index,
        frame: t.frame,
        rect: Some(rect_to_proto(&t.rect)),
        shares: t.shares.iter().map(|&s| u32::from(s)).collect(),
    };
    pb::VerificationReport {
        intact: r.is_intact(),
        roi_blocks: r.roi_blocks,
        tiles: r.tiles,
        tampered_block_count: r.tampered_blocks.len() as u64,
        tampered_tile_count: r.tampered_tiles.len() as u64,
        tampered_blocks: r
            .tampered_blocks
            .iter()
            .take(MAX_REPORT_ENTRIES)
            .map(block)
            .collect(),
        tampered_tiles: r
            .tampered_tiles
            .iter()
            .take(MAX_REPORT_ENTRIES)
            .map(tile)
            .collect(),
        truncated: r.tampered_blocks.len() > MAX_REPORT_ENTRIES
            || r.tampered_tiles.len() > MAX_REPORT_ENTRIES,
    }
}

#[cfg(test)]
mod tests {
    use tessera_image::Rect;

    use super::*;

    #[test]
    fn report_lists_are_capped_but_counts_exact() {
        let b = TamperedBlock {
            index: 0,
            frame: 0,
            rect: Rect::new(0, 0, 16, 16),
        };
        let r = VerificationReport {
            roi_blocks: 10_000,
            tiles: 10_000,
            tampered_blocks: vec![b; MAX_REPORT_ENTRIES + 1],
            tampered_tiles: vec![],
        };
        let p = report_to_proto(&r);
        assert!(!p.intact && p.truncated);
        assert_eq!(p.tampered_block_count, MAX_REPORT_ENTRIES as u64 + 1);
        assert_eq!(p.tampered_blocks.len(), MAX_REPORT_ENTRIES);
        assert_eq!(p.tampered_tiles.len(), 0);
    }
}

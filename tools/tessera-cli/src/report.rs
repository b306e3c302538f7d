//! One way to print an integrity report, for every command and both demos
//! (offline restores and the gateway's reports alike), and one way to
//! print a rectangle: `x,y,width,height`, the order `--roi` takes.
//!
//! ```text
//! integrity: intact (540 ROI blocks, 1056 tiles verified)
//! integrity: TAMPERED: 1 of 540 ROI blocks, 1 of 1056 tiles
//!   tile 529 (frame 0) at 256,256,16,16 (x,y,w,h): share(s) 2
//!   ROI block 270 (frame 0) at 256,256,16,16 (x,y,w,h)
//! ```

use tessera_image::Rect;
use tessera_proto::watermark::v1 as wpb;

/// Most tampered tiles and blocks listed (the counts are always whole).
const LISTED: usize = 50;

/// A rectangle as `--roi` takes it: `x,y,width,height`.
pub fn rect(r: Rect) -> String {
    format!("{},{},{},{}", r.x, r.y, r.width, r.height)
}

/// One tampered tile or ROI block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    pub index: u64,
    pub frame: u32,
    pub rect: Rect,
    /// The shares that failed (tiles only).
    pub shares: Vec<u32>,
}

/// What every report says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub roi_blocks: u64,
    pub tiles: u64,
    pub tampered_block_count: u64,
    pub tampered_tile_count: u64,
    pub blocks: Vec<Area>,
    pub tiles_listed: Vec<Area>,
}

impl Summary {
    pub fn intact(&self) -> bool {
        self.tampered_block_count == 0 && self.tampered_tile_count == 0
    }

    /// The report's lines, each starting with `indent`.
    pub fn lines(&self, indent: &str) -> Vec<String> {
        if self.intact() {
            return vec![format!(
                "{indent}integrity: intact ({} ROI blocks, {} tiles verified)",
                self.roi_blocks, self.tiles
            )];
        }
        let mut out = vec![format!(
            "{indent}integrity: TAMPERED: {} of {} ROI blocks, {} of {} tiles",
            self.tampered_block_count, self.roi_blocks, self.tampered_tile_count, self.tiles
        )];
        for t in self.tiles_listed.iter().take(LISTED) {
            let shares: Vec<String> = t.shares.iter().map(u32::to_string).collect();
            out.push(format!(
                "{indent}  tile {} (frame {}) at {} (x,y,w,h): share(s) {}",
                t.index,
                t.frame,
                rect(t.rect),
                shares.join(",")
            ));
        }
        for b in self.blocks.iter().take(LISTED) {
            out.push(format!(
                "{indent}  ROI block {} (frame {}) at {} (x,y,w,h)",
                b.index,
                b.frame,
                rect(b.rect)
            ));
        }
        let listed = self.tiles_listed.len().min(LISTED) + self.blocks.len().min(LISTED);
        let total = self.tampered_tile_count + self.tampered_block_count;
        if (listed as u64) < total {
            out.push(format!("{indent}  ... ({} more)", total - listed as u64));
        }
        out
    }

    pub fn print(&self, indent: &str) {
        for l in self.lines(indent) {
            println!("{l}");
        }
    }
}

impl From<&tessera_cryptomark::VerificationReport> for Summary {
    fn from(r: &tessera_cryptomark::VerificationReport) -> Self {
        Summary {
            roi_blocks: r.roi_blocks,
            tiles: r.tiles,
            tampered_block_count: r.tampered_blocks.len() as u64,
            tampered_tile_count: r.tampered_tiles.len() as u64,
            blocks: r
                .tampered_blocks
                .iter()
                .map(|b| Area {
                    index: b.index,
                    frame: b.frame,
                    rect: b.rect,
                    shares: Vec::new(),
                })
                .collect(),
            tiles_listed: r
                .tampered_tiles
                .iter()
                .map(|t| Area {
                    index: t.index,
                    frame: t.frame,
                    rect: t.rect,
                    shares: t.shares.iter().map(|&s| u32::from(s)).collect(),
                })
                .collect(),
        }
    }
}

fn proto_rect(r: Option<&wpb::Rect>) -> Rect {
    let r = r.copied().unwrap_or_default();
    Rect::new(r.x, r.y, r.width, r.height)
}

impl From<&wpb::VerificationReport> for Summary {
    fn from(r: &wpb::VerificationReport) -> Self {
        let mut s = Summary {
            roi_blocks: r.roi_blocks,
            tiles: r.tiles,
            tampered_block_count: r.tampered_block_count,
            tampered_tile_count: r.tampered_tile_count,
            blocks: r
                .tampered_blocks
                .iter()
                .map(|b| Area {
                    index: b.index,
                    frame: b.frame,
                    rect: proto_rect(b.rect.as_ref()),
                    shares: Vec::new(),
                })
                .collect(),
            tiles_listed: r
                .tampered_tiles
                .iter()
                .map(|t| Area {
                    index: t.index,
                    frame: t.frame,
                    rect: proto_rect(t.rect.as_ref()),
                    shares: t.shares.clone(),
                })
                .collect(),
        };
        // A report that says "not intact" without counts still reads so.
        if !r.intact && s.intact() {
            s.tampered_tile_count = s.tiles_listed.len().max(1) as u64;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_format_for_both_kinds_of_report() {
        let intact = Summary {
            roi_blocks: 540,
            tiles: 1056,
            ..Summary::default()
        };
        assert_eq!(
            intact.lines("  "),
            ["  integrity: intact (540 ROI blocks, 1056 tiles verified)"]
        );
        let offline = tessera_cryptomark::VerificationReport {
            roi_blocks: 540,
            tiles: 1056,
            tampered_blocks: Vec::new(),
            tampered_tiles: vec![tessera_cryptomark::TamperedTile {
                index: 529,
                frame: 0,
                rect: Rect::new(256, 256, 16, 16),
                shares: vec![2],
            }],
        };
        let online = wpb::VerificationReport {
            intact: false,
            roi_blocks: 540,
            tiles: 1056,
            tampered_block_count: 0,
            tampered_tile_count: 1,
            tampered_blocks: Vec::new(),
            tampered_tiles: vec![wpb::TamperedTile {
                index: 529,
                frame: 0,
                rect: Some(wpb::Rect {
                    x: 256,
                    y: 256,
                    width: 16,
                    height: 16,
                }),
                shares: vec![2],
            }],
            truncated: false,
        };
        let a = Summary::from(&offline).lines("");
        assert_eq!(a, Summary::from(&online).lines(""));
        assert_eq!(
            a,
            [
                "integrity: TAMPERED: 0 of 540 ROI blocks, 1 of 1056 tiles",
                "  tile 529 (frame 0) at 256,256,16,16 (x,y,w,h): share(s) 2",
            ]
        );
        assert_eq!(rect(Rect::new(96, 40, 320, 432)), "96,40,320,432");
    }
}

//! Reading input images for the offline image commands: raw layouts,
//! bounded reads, dimensions and ROI text.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_image::{Image, ImageSpec, PixelFormat, Rect, codec};

/// How to read an input image.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// PNG or TIFF file, or raw little-endian words with --raw.
    #[arg(long, short, value_name = "FILE")]
    pub input: PathBuf,
    /// Read raw little-endian words of WIDTHxHEIGHT, e.g. `--raw 512x512
    /// --bits 16 --stored 12` (`--raw 512,512,16,12` is read alike).
    #[arg(long, value_name = "WxH")]
    pub raw: Option<String>,
    #[command(flatten)]
    pub layout: RawLayout,
}

/// The words of a raw file, besides its size (`--raw`).
#[derive(Args, Debug, Clone, Default)]
pub struct RawLayout {
    /// Raw: bits allocated per sample, 8 or 16 (default 16).
    #[arg(long, value_name = "BITS")]
    pub bits: Option<u8>,
    /// Raw: bits stored (default: --bits).
    #[arg(long, value_name = "BITS")]
    pub stored: Option<u8>,
    /// Raw: samples are signed.
    #[arg(long)]
    pub signed: bool,
    /// Raw: 1 (gray) or 3 (RGB) samples per pixel (default 1).
    #[arg(long)]
    pub channels: Option<u8>,
    /// Raw: number of frames (default 1).
    #[arg(long)]
    pub frames: Option<u32>,
}

/// `--raw` in either form: `WxH` with `--bits/--stored/--frames/--channels`
/// (the documented one), or `W,H,BITS,STORED[,FRAMES[,CHANNELS]]` (what
/// `store --raw` took first); a number given both ways must agree.
pub fn raw_spec(text: &str, l: &RawLayout) -> Result<ImageSpec> {
    let (width, height, mut bits, mut stored, mut frames, mut channels) = if text.contains(',') {
        let v: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                anyhow::anyhow!(
                    "--raw {text:?}: expected WxH or W,H,BITS,STORED[,FRAMES[,CHANNELS]]"
                )
            })?;
        if !(4..=6).contains(&v.len()) {
            bail!("--raw {text:?}: expected WxH or W,H,BITS,STORED[,FRAMES[,CHANNELS]]");
        }
        let small = |i: usize, what: &str| -> Result<Option<u8>> {
            v.get(i)
                .map(|&n| {
                    u8::try_from(n)
                        .map_err(|_| anyhow::anyhow!("--raw {text:?}: {what} {n} is too large"))
                })
                .transpose()
        };
        (
            v[0],
            v[1],
            small(2, "bits")?,
            small(3, "bits stored")?,
            v.get(4).copied(),
            small(5, "channels")?,
        )
    } else {
        let (w, h) = parse_dims(text)?;
        (w, h, None, None, None, None)
    };
    for (name, from_raw, flag) in [
        ("--bits", &mut bits, l.bits),
        ("--stored", &mut stored, l.stored),
        ("--channels", &mut channels, l.channels),
    ] {
        match (*from_raw, flag) {
            (Some(a), Some(b)) if a != b => bail!("--raw {text:?} says {a}, {name} says {b}"),
            (None, Some(b)) => *from_raw = Some(b),
            _ => {}
        }
    }
    match (frames, l.frames) {
        (Some(a), Some(b)) if a != b => bail!("--raw {text:?} says {a} frames, --frames says {b}"),
        (None, Some(b)) => frames = Some(b),
        _ => {}
    }
    let bits = bits.unwrap_or(16);
    Ok(ImageSpec {
        width,
        height,
        frames: frames.unwrap_or(1),
        format: PixelFormat {
            bits_allocated: bits,
            bits_stored: stored.unwrap_or(bits),
            signed: l.signed,
            channels: channels.unwrap_or(1),
        },
    })
}

impl InputArgs {
    pub fn load(&self) -> Result<Image> {
        let bytes = read_bounded(&self.input)?;
        match &self.raw {
            None => {
                codec::decode(&bytes).with_context(|| format!("decoding {}", self.input.display()))
            }
            Some(dims) => {
                let spec = raw_spec(dims, &self.layout)?;
                codec::decode_raw(spec, &bytes)
                    .with_context(|| format!("raw file {}", self.input.display()))
            }
        }
    }
}

/// Reads a file after checking it is not larger than any image we accept.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let limit = tessera_image::MAX_SAMPLES * 2 + (1 << 20);
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > limit {
        bail!(
            "{} is {len} bytes, more than the {limit}-byte limit",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub(super) fn parse_dims(text: &str) -> Result<(u32, u32)> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .context("dimensions must look like 512x512")?;
    Ok((
        w.trim().parse().context("width")?,
        h.trim().parse().context("height")?,
    ))
}

/// `x,y,w,h`, `full` or `none`.
pub fn parse_roi(text: &str, image: &Image) -> Result<Rect> {
    match text {
        "full" => Ok(image.spec().full_rect()),
        "none" => Ok(Rect::default()),
        _ => {
            let v: Vec<u32> = text
                .split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<std::result::Result<_, _>>()
                .context("ROI must be x,y,width,height (or full, none)")?;
            if v.len() != 4 {
                bail!("ROI must have 4 numbers: x,y,width,height");
            }
            Ok(Rect::new(v[0], v[1], v[2], v[3]))
        }
    }
}

//! `tessera image protect | restore | verify | metrics | keygen`: the
//! crypto-watermarking core on files, offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_cryptomark::{
    Header, PaperKeys, Profile, ProtectKey, RestoreKey, Restored, VerificationReport, protect,
    random_salt, restore,
};
use tessera_image::{Image, PixelFormat, Rect, codec};

use crate::keys::{self, KeyArgs};

mod input;
pub mod metrics;

use input::parse_dims;
pub use input::{InputArgs, RawLayout, parse_roi, raw_spec, read_bounded};
pub use metrics::{MetricsArgs, key_sensitivity, metrics_cmd, print_sensitivity};

#[derive(Args, Debug)]
pub struct ProtectArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Region of interest: x,y,width,height, `full` or `none`.
    #[arg(long, default_value = "full")]
    pub roi: String,
    /// Object id bound into the shares (default: the input file's stem).
    #[arg(long)]
    pub object_id: Option<String>,
    /// secure (AES-256-GCM tiles, default) or paper (the paper's chaotic maps; not for production).
    #[arg(long, default_value = "secure")]
    pub profile: Profile,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Paper profile: protect with these share keys (`hex:hex`, the format
    /// of the paper.key that protect writes) instead of keys derived from
    /// the image as the paper does.
    #[arg(long, value_name = "FILE")]
    pub paper_key: Option<PathBuf>,
    /// Output directory: header.json, share1.bin, share2.bin (+ paper.key).
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct SharesArgs {
    /// Directory written by `protect` (header.json, share1.bin, share2.bin).
    #[arg(long, short)]
    pub dir: PathBuf,
    /// Use this share 1 instead of DIR/share1.bin (e.g. fetched from cloud A).
    #[arg(long)]
    pub share1: Option<PathBuf>,
    /// Use this share 2 instead of DIR/share2.bin.
    #[arg(long)]
    pub share2: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Paper profile: the key file written by protect (default DIR/paper.key).
    #[arg(long)]
    pub paper_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub shares: SharesArgs,
    /// Output image: .png (one frame) or .raw (all frames, little-endian words).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Write the image even when verification finds tampering.
    #[arg(long)]
    pub allow_tampered: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub shares: SharesArgs,
    /// Write a PNG tamper map (frame 0): tampered ROI blocks red, other
    /// tampered tiles orange, the ROI outlined green.
    #[arg(long)]
    pub map: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write a new random 256-bit key (hex, mode 0600).
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PhantomArgs {
    /// Where to write the PNG.
    #[arg(long, short)]
    pub out: PathBuf,
    /// WIDTHxHEIGHT.
    #[arg(long, default_value = "512x512")]
    pub size: String,
}

pub fn phantom(args: PhantomArgs) -> Result<()> {
    let (w, h) = parse_dims(&args.size)?;
    let image = tessera_image::phantom::head_phantom(w, h, 1, PixelFormat::gray16(12, false), 7)?;
    write_file(&args.out, &codec::encode_png(&image, 0)?)?;
    println!(
        "wrote {}: {w}x{h} 16-bit gray (12 bits used), the built-in CT-like head phantom (no patient data)",
        args.out.display()
    );
    Ok(())
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    let k = keys::generate_hex()?;
    keys::write_secret(&args.out, format!("{k}\n").as_bytes())?;
    println!("wrote a new 256-bit key to {}", args.out.display());
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    // Write to a temporary name then rename, so a crash never leaves a
    // half-written file under the final name.
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub fn protect_cmd(args: ProtectArgs) -> Result<()> {
    let image = args.input.load()?;
    let roi = parse_roi(&args.roi, &image)?;
    let object_id = match &args.object_id {
        Some(id) => id.clone(),
        None => args
            .input
            .input
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_owned(),
    };
    let study_key;
    let paper_keys;
    let key = match args.profile {
        Profile::Secure => {
            if args.paper_key.is_some() {
                bail!(
                    "--paper-key is for --profile paper; the secure profile takes --key-file or --passphrase-file"
                );
            }
            study_key = args.key.load(&object_id)?;
            ProtectKey::Secure {
                key: &study_key,
                salt: random_salt()?,
            }
        }
        Profile::Paper => {
            // A study key would be silently ignored: the paper profile's
            // keys are two 128-bit share keys, from the image or given.
            if args.key.key_file.is_some() || args.key.passphrase_file.is_some() {
                bail!(
                    "--profile paper does not use --key-file or --passphrase-file: its keys are two 128-bit share keys; give --paper-key FILE (hex:hex, as in paper.key), or neither to derive them from the image as the paper does"
                );
            }
            match &args.paper_key {
                Some(path) => {
                    paper_keys = read_paper_keys(path)?;
                    ProtectKey::PaperWithKeys(&paper_keys)
                }
                None => ProtectKey::Paper,
            }
        }
    };
    let protected = protect(&image, roi, &object_id, key)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_file(&args.out.join("share1.bin"), &protected.shares[0])?;
    write_file(&args.out.join("share2.bin"), &protected.shares[1])?;
    if let Some(k) = protected.paper_keys {
        let path = args.out.join("paper.key");
        let _ = std::fs::remove_file(&path);
        keys::write_secret(&path, format!("{}\n", k.to_text()).as_bytes())?;
    }
    // The header goes last: its presence marks a complete protect.
    write_file(
        &args.out.join("header.json"),
        protected.header.to_json().as_bytes(),
    )?;
    let original = image.spec().byte_len() as f64;
    let (s1, s2) = (protected.shares[0].len(), protected.shares[1].len());
    println!(
        "protected {} ({}x{}x{} {}) as {:?} profile, object {:?}, ROI {} (x,y,w,h)",
        args.input.input.display(),
        image.width(),
        image.height(),
        image.frames(),
        image.format(),
        args.profile,
        object_id,
        crate::report::rect(roi)
    );
    println!(
        "share1 {s1} B, share2 {s2} B: {:.3}x the {} image bytes",
        (s1 + s2) as f64 / original,
        original
    );
    let written = |name: &str| args.out.join(name).display().to_string();
    println!(
        "wrote {}, {}, {}",
        written("header.json"),
        written("share1.bin"),
        written("share2.bin")
    );
    if args.profile == Profile::Paper {
        println!(
            "paper profile: NOT FOR PRODUCTION; its share keys are in {} (restore reads them there)",
            written("paper.key")
        );
    }
    Ok(())
}

/// Reads a paper.key file: the two share keys as `hex:hex`.
fn read_paper_keys(path: &Path) -> Result<PaperKeys> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    PaperKeys::from_text(&text).with_context(|| format!("paper key file {}", path.display()))
}

/// Loads header and shares and restores.
fn load_and_restore(args: &SharesArgs) -> Result<(Header, Restored)> {
    let header_text = std::fs::read_to_string(args.dir.join("header.json"))
        .with_context(|| format!("reading {}/header.json", args.dir.display()))?;
    let header = Header::from_json(&header_text)?;
    let s1 = read_bounded(
        &args
            .share1
            .clone()
            .unwrap_or_else(|| args.dir.join("share1.bin")),
    )?;
    let s2 = read_bounded(
        &args
            .share2
            .clone()
            .unwrap_or_else(|| args.dir.join("share2.bin")),
    )?;
    let restored = match header.profile {
        Profile::Secure => {
            let k = args.key.load(&header.object_id)?;
            restore(&header, &s1, &s2, RestoreKey::Secure(&k))?
        }
        Profile::Paper => {
            let path = args
                .paper_key
                .clone()
                .unwrap_or_else(|| args.dir.join("paper.key"));
            let k = read_paper_keys(&path)?;
            restore(&header, &s1, &s2, RestoreKey::Paper(&k))?
        }
    };
    Ok((header, restored))
}

/// The report in the one format of every command (see `crate::report`).
pub fn print_report(report: &VerificationReport, indent: &str) {
    crate::report::Summary::from(report).print(indent);
}

pub fn restore_cmd(args: RestoreArgs) -> Result<()> {
    let (_, restored) = load_and_restore(&args.shares)?;
    print_report(&restored.report, "");
    if !restored.report.is_intact() && !args.allow_tampered {
        bail!("not writing a tampered image (use --allow-tampered to write it anyway)");
    }
    write_image(&args.out, &restored.image)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

pub fn write_image(path: &Path, image: &Image) -> Result<()> {
    let bytes = match path.extension().and_then(|e| e.to_str()) {
        Some("png") => {
            if image.frames() > 1 {
                bail!(
                    "PNG holds one frame; write .raw for {} frames",
                    image.frames()
                );
            }
            codec::encode_png(image, 0)?
        }
        Some("raw") => image.to_le_bytes(),
        _ => bail!("output must end in .png or .raw"),
    };
    write_file(path, &bytes)
}

pub fn verify_cmd(args: VerifyArgs) -> Result<()> {
    let (header, restored) = load_and_restore(&args.shares)?;
    print_report(&restored.report, "");
    if let Some(map) = &args.map {
        write_file(map, &tamper_map(&header, &restored)?)?;
        println!("wrote tamper map {}", map.display());
    }
    if !restored.report.is_intact() {
        bail!("verification failed");
    }
    Ok(())
}

/// A PNG of frame 0 in gray (windowed to its min..max), tampered ROI blocks
/// tinted red, other tampered tiles orange, ROI border green.
pub fn tamper_map(header: &Header, restored: &Restored) -> Result<Vec<u8>> {
    let r = &restored.report;
    paint_tamper_map(
        &restored.image,
        r.tampered_tiles
            .iter()
            .filter(|t| t.frame == 0)
            .map(|t| t.rect),
        r.tampered_blocks
            .iter()
            .filter(|b| b.frame == 0)
            .map(|b| b.rect),
        Some(header.roi),
    )
}

/// The one tamper-map painter (offline reports and gateway reports): frame 0
/// in gray, `tiles` tinted orange, `blocks` red, the ROI's border green.
/// Rectangles are clipped to the image.
pub fn paint_tamper_map(
    img: &Image,
    tiles: impl Iterator<Item = Rect>,
    blocks: impl Iterator<Item = Rect>,
    roi: Option<Rect>,
) -> Result<Vec<u8>> {
    let (w, h) = (img.width(), img.height());
    let f = img.format();
    let lum: Vec<i32> = (0..w * h)
        .map(|i| f.value(img.get(0, i % w, i / w, 0)))
        .collect();
    let (lo, hi) = (
        *lum.iter().min().unwrap_or(&0),
        *lum.iter().max().unwrap_or(&1),
    );
    let span = (hi - lo).max(1) as f64;
    let mut rgb: Vec<u8> = lum
        .iter()
        .flat_map(|&v| {
            let g = ((v - lo) as f64 / span * 255.0) as u8;
            [g, g, g]
        })
        .collect();
    let clip = |r: Rect| r.intersect(&Rect::new(0, 0, w, h));
    let mut tint = |r: Rect, color: [u8; 3]| {
        let r = clip(r);
        for y in r.y..r.y + r.height {
            for x in r.x..r.x + r.width {
                let i = ((y * w + x) * 3) as usize;
                for c in 0..3 {
                    rgb[i + c] = ((rgb[i + c] as u16 + color[c] as u16 * 3) / 4) as u8;
                }
            }
        }
    };
    for t in tiles {
        tint(t, [255, 140, 0]);
    }
    for b in blocks {
        tint(b, [255, 0, 0]);
    }
    if let Some(roi) = roi.map(clip).filter(|r| !r.is_empty()) {
        for y in roi.y..roi.y + roi.height {
            for x in roi.x..roi.x + roi.width {
                let edge = x == roi.x
                    || y == roi.y
                    || x + 1 == roi.x + roi.width
                    || y + 1 == roi.y + roi.height;
                if edge {
                    let i = ((y * w + x) * 3) as usize;
                    rgb[i..i + 3].copy_from_slice(&[0, 220, 0]);
                }
            }
        }
    }
    Ok(codec::encode_png_rgb8(w, h, rgb)?)
}

//! `tessera image protect | restore | verify | metrics | keygen`: the
//! crypto-watermarking core on files, offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tessera_cryptomark::{
    Header, PaperKeys, Profile, ProtectKey, RestoreKey, Restored, VerificationReport, protect,
    random_salt, restore, share_metric_view,
};
use tessera_image::metrics::{Direction, adjacent_correlation, entropy, npcr_uaci};
use tessera_image::{Image, ImageSpec, PixelFormat, Rect, codec};

use crate::keys::{self, KeyArgs};

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

fn parse_dims(text: &str) -> Result<(u32, u32)> {
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
pub struct MetricsArgs {
    /// Image to measure (entropy, adjacent correlation).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Share to measure (needs --header); with --against, NPCR/UACI too.
    #[arg(long)]
    pub share: Option<PathBuf>,
    #[arg(long)]
    pub header: Option<PathBuf>,
    /// A second share (e.g. made with a key differing in one bit).
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Run the paper's key-sensitivity experiment (Tables 3-4) on the
    /// built-in 512x512 head phantom, in both profiles.
    #[arg(long)]
    pub tables: bool,
    /// Key sensitivity over N random keys: protect, flip one random key
    /// bit (paper: one bit of each share key), protect again; prints the
    /// minimum, median and maximum NPCR/UACI per share and the worst key.
    /// On --image (PNG/TIFF) or the built-in 512x512 8-bit head phantom.
    #[arg(long, value_name = "N")]
    pub key_sensitivity: Option<usize>,
    /// Profile for --key-sensitivity (the secure profile keeps the salt,
    /// so only the key differs).
    #[arg(long, default_value = "paper")]
    pub profile: Profile,
    /// ROI for --key-sensitivity on --image: x,y,width,height, `full` (the
    /// default) or `none`. The phantom uses the paper's ROI 83,55,351,431.
    #[arg(long)]
    pub roi: Option<String>,
    /// Seed of the --key-sensitivity keys (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
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

/// One row of the key-sensitivity table.
pub struct SensitivityRow {
    pub profile: Profile,
    pub share: usize,
    pub npcr: f64,
    pub uaci: f64,
    pub corr: [f64; 3],
}

/// The paper's Tables 3-4 experiment: flip the last key bit, compare shares.
pub fn key_sensitivity(image: &Image, roi: Rect) -> Result<Vec<SensitivityRow>> {
    let mut rows = Vec::new();
    let key = tessera_cryptomark::StudyKey::from_bytes([0x5a; 32]);
    let mut flipped = [0x5a; 32];
    flipped[31] ^= 1;
    let flipped = tessera_cryptomark::StudyKey::from_bytes(flipped);
    let salt = random_salt()?;
    let a = protect(image, roi, "tables", ProtectKey::Secure { key: &key, salt })?;
    let b = protect(
        image,
        roi,
        "tables",
        ProtectKey::Secure {
            key: &flipped,
            salt,
        },
    )?;
    for s in 0..2 {
        rows.push(compare(Profile::Secure, s, &a, &b)?);
    }
    let a = protect(image, roi, "tables", ProtectKey::Paper)?;
    let keys = a.paper_keys.context("paper keys")?;
    for s in 0..2 {
        let mut k = keys;
        if s == 0 {
            k.share1[15] ^= 1;
        } else {
            k.share2[15] ^= 1;
        }
        let b = protect(image, roi, "tables", ProtectKey::PaperWithKeys(&k))?;
        rows.push(compare(Profile::Paper, s, &a, &b)?);
    }
    Ok(rows)
}

fn compare(
    profile: Profile,
    share: usize,
    a: &tessera_cryptomark::Protected,
    b: &tessera_cryptomark::Protected,
) -> Result<SensitivityRow> {
    let (va, w, h, max) = share_metric_view(&a.header, &a.shares[share]).context("share view")?;
    let (vb, _, _, _) = share_metric_view(&b.header, &b.shares[share]).context("share view")?;
    let (npcr, uaci) = npcr_uaci(&va, &vb, max).context("share sizes differ")?;
    let corr =
        Direction::ALL.map(|d| adjacent_correlation(&va, w, h, d, 16384, 7).unwrap_or(f64::NAN));
    Ok(SensitivityRow {
        profile,
        share: share + 1,
        npcr,
        uaci,
        corr,
    })
}

pub fn print_sensitivity(rows: &[SensitivityRow]) {
    println!("| profile | share | NPCR % | UACI % | r horizontal | r vertical | r diagonal |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {:?} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            r.profile, r.share, r.npcr, r.uaci, r.corr[0], r.corr[1], r.corr[2]
        );
    }
    println!(
        "| paper, Table 3-4 (IM-0001-0012) | 1 / 2 | 99.59 | 33.48 | -0.0085 / -0.0016 | -0.0131 / 0.0044 | 0.0011 / 0.0001 |"
    );
    println!("| ideal (random 8-bit) | | 99.6094 | 33.4635 | 0 | 0 | 0 |");
}

/// One `--key-sensitivity` trial: each share against the same share under
/// the key with one bit flipped.
#[derive(Clone, Debug)]
pub struct Trial {
    pub npcr: [f64; 2],
    pub uaci: [f64; 2],
    /// The unflipped key: `hex:hex` (paper) or the hex study key (secure).
    pub key: String,
    /// The bit flipped in each share's key (the same study-key bit twice
    /// for the secure profile), counted from the most significant.
    pub bits: [usize; 2],
    /// Largest value of a share sample: 255 or 65535.
    pub max: u16,
}

/// Key material of trial `i`, reproducible from the seed.
fn trial_bytes(seed: u64, i: u64, label: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"tessera/image-metrics/key-sensitivity")
        .chain_update(seed.to_be_bytes())
        .chain_update(i.to_be_bytes())
        .chain_update(label)
        .finalize()
        .into()
}

fn flip(bytes: &mut [u8], bit: usize) {
    bytes[bit / 8] ^= 0x80 >> (bit % 8);
}

/// Trial `i` of the key-sensitivity experiment.
pub fn sensitivity_trial(
    image: &Image,
    roi: Rect,
    profile: Profile,
    seed: u64,
    i: u64,
) -> Result<Trial> {
    let r = trial_bytes(seed, i, b"bits");
    let (a, b, key, bits) = match profile {
        Profile::Paper => {
            let k = trial_bytes(seed, i, b"keys");
            let keys = PaperKeys {
                share1: k[..16].try_into().expect("16 bytes"),
                share2: k[16..].try_into().expect("16 bytes"),
            };
            let bits = [r[0] as usize % 128, r[1] as usize % 128];
            let mut flipped = keys;
            flip(&mut flipped.share1, bits[0]);
            flip(&mut flipped.share2, bits[1]);
            (
                protect(image, roi, "keysens", ProtectKey::PaperWithKeys(&keys))?,
                protect(image, roi, "keysens", ProtectKey::PaperWithKeys(&flipped))?,
                keys.to_text(),
                bits,
            )
        }
        Profile::Secure => {
            let k = trial_bytes(seed, i, b"key");
            let salt = trial_bytes(seed, i, b"salt");
            let bit = r[0] as usize;
            let mut f = k;
            flip(&mut f, bit);
            let (key, flipped) = (
                tessera_cryptomark::StudyKey::from_bytes(k),
                tessera_cryptomark::StudyKey::from_bytes(f),
            );
            (
                protect(
                    image,
                    roi,
                    "keysens",
                    ProtectKey::Secure { key: &key, salt },
                )?,
                protect(
                    image,
                    roi,
                    "keysens",
                    ProtectKey::Secure {
                        key: &flipped,
                        salt,
                    },
                )?,
                tessera_cryptomark::hex(&k),
                [bit, bit],
            )
        }
    };
    let mut t = Trial {
        npcr: [0.0; 2],
        uaci: [0.0; 2],
        key,
        bits,
        max: 255,
    };
    for s in 0..2 {
        let (va, _, _, max) = share_metric_view(&a.header, &a.shares[s]).context("share view")?;
        let (vb, _, _, _) = share_metric_view(&b.header, &b.shares[s]).context("share view")?;
        (t.npcr[s], t.uaci[s]) = npcr_uaci(&va, &vb, max).context("share sizes differ")?;
        t.max = max;
    }
    Ok(t)
}

/// Runs `n` trials on all cores, with a progress bar on a terminal.
pub fn run_sensitivity(
    image: &Image,
    roi: Rect,
    profile: Profile,
    seed: u64,
    n: usize,
) -> Result<Vec<Trial>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("  keys {bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if n < 10 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Trial>>>> = Mutex::new((0..n).map(|_| None).collect());
    let workers = std::thread::available_parallelism()
        .map_or(1, |c| c.get())
        .min(n.max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t = sensitivity_trial(image, roi, profile, seed, i as u64);
                    let failed = t.is_err();
                    results.lock().expect("results lock")[i] = Some(t);
                    bar.inc(1);
                    if failed {
                        next.store(n, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .flatten()
        .collect()
}

/// min, median, max of a non-empty list.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

/// The NPCR a one-bit key change must reach: 99.5 % on 8-bit share
/// samples, 99.99 % on 16-bit ones (random values give 99.61 / 99.998 %).
pub fn npcr_floor(max: u16) -> f64 {
    if max > 255 { 99.99 } else { 99.5 }
}

pub fn print_trials(trials: &[Trial]) {
    println!("| share | NPCR % min | median | max | UACI % min | median | max |");
    println!("|---|---|---|---|---|---|---|");
    for s in 0..2 {
        let (n0, n1, n2) = spread(trials.iter().map(|t| t.npcr[s]).collect());
        let (u0, u1, u2) = spread(trials.iter().map(|t| t.uaci[s]).collect());
        println!(
            "| {} | {n0:.4} | {n1:.4} | {n2:.4} | {u0:.4} | {u1:.4} | {u2:.4} |",
            s + 1
        );
    }
    for s in 0..2 {
        let below = trials
            .iter()
            .filter(|t| t.npcr[s] < npcr_floor(t.max))
            .count();
        println!(
            "share {}: {below} of {} keys below the NPCR floor",
            s + 1,
            trials.len()
        );
    }
    for s in 0..2 {
        let Some(w) = trials.iter().min_by(|a, b| a.npcr[s].total_cmp(&b.npcr[s])) else {
            continue;
        };
        let floor = npcr_floor(w.max);
        println!(
            "worst key for share {}: NPCR {:.4} %, UACI {:.4} %, key {}, bit {} flipped: {} the {floor} % floor",
            s + 1,
            w.npcr[s],
            w.uaci[s],
            w.key,
            w.bits[s],
            if w.npcr[s] >= floor { "meets" } else { "BELOW" }
        );
    }
}

fn key_sensitivity_cmd(args: &MetricsArgs, n: usize) -> Result<()> {
    if n == 0 {
        bail!("--key-sensitivity needs at least one key");
    }
    let (image, roi, what) = match &args.image {
        Some(path) => {
            let image = codec::decode(&read_bounded(path)?)
                .with_context(|| format!("decoding {}", path.display()))?;
            let roi = parse_roi(args.roi.as_deref().unwrap_or("full"), &image)?;
            (image, roi, path.display().to_string())
        }
        None => {
            let image =
                tessera_image::phantom::head_phantom(512, 512, 1, PixelFormat::GRAY8, 2023)?;
            let roi = match &args.roi {
                Some(text) => parse_roi(text, &image)?,
                None => Rect::new(83, 55, 351, 431),
            };
            (image, roi, "the built-in head phantom".to_owned())
        }
    };
    let seed = match args.seed {
        Some(s) => s,
        None => u64::from_be_bytes(random_salt()?[..8].try_into().expect("8 bytes")),
    };
    println!(
        "key sensitivity, {:?} profile, {n} random keys (--seed {seed}), on {what} ({}x{}x{} {}), ROI {} (x,y,w,h):",
        args.profile,
        image.width(),
        image.height(),
        image.frames(),
        image.format(),
        crate::report::rect(roi),
    );
    match args.profile {
        Profile::Paper => {
            println!(
                "one random bit flipped in each share's 128-bit key; each share against its own"
            )
        }
        Profile::Secure => {
            println!("one random bit of the 256-bit study key flipped, same salt")
        }
    }
    let trials = run_sensitivity(&image, roi, args.profile, seed, n)?;
    print_trials(&trials);
    Ok(())
}

pub fn metrics_cmd(args: MetricsArgs) -> Result<()> {
    if let Some(n) = args.key_sensitivity {
        return key_sensitivity_cmd(&args, n);
    }
    let mut did = false;
    if let Some(path) = &args.image {
        let img = codec::decode(&read_bounded(path)?)?;
        let f = img.format();
        let frame: Vec<u16> = img
            .frame(0)
            .iter()
            .step_by(f.channels as usize)
            .copied()
            .collect();
        println!("{}: {}x{} {}", path.display(), img.width(), img.height(), f);
        println!(
            "  entropy {:.4} bits (256 bins)",
            entropy(&frame, f.bits_allocated, 8)
        );
        for d in Direction::ALL {
            let r = adjacent_correlation(
                &frame,
                img.width() as usize,
                img.height() as usize,
                d,
                16384,
                7,
            );
            println!(
                "  correlation {d:?}: {}",
                r.map_or("n/a".into(), |r| format!("{r:.4}"))
            );
        }
        did = true;
    }
    if let Some(path) = &args.share {
        let hpath = args.header.clone().context("--share needs --header")?;
        let header = Header::from_json(&std::fs::read_to_string(&hpath)?)?;
        let share = read_bounded(path)?;
        let (v, w, h, max) =
            share_metric_view(&header, &share).context("share does not match the header")?;
        println!(
            "{}: share viewed as {w}x{h}, values 0..={max}",
            path.display()
        );
        let bits = if max == 255 { 8 } else { 16 };
        println!("  entropy {:.4} bits (256 bins)", entropy(&v, bits, 8));
        for d in Direction::ALL {
            let r = adjacent_correlation(&v, w, h, d, 16384, 7);
            println!(
                "  correlation {d:?}: {}",
                r.map_or("n/a".into(), |r| format!("{r:.4}"))
            );
        }
        if let Some(other) = &args.against {
            let o = read_bounded(other)?;
            let (vo, _, _, _) =
                share_metric_view(&header, &o).context("second share does not match")?;
            let (npcr, uaci) = npcr_uaci(&v, &vo, max).context("share sizes differ")?;
            println!(
                "  against {}: NPCR {npcr:.4} %, UACI {uaci:.4} %",
                other.display()
            );
        }
        did = true;
    }
    if args.tables {
        let image = tessera_image::phantom::head_phantom(512, 512, 1, PixelFormat::GRAY8, 2023)?;
        println!(
            "Tables 3-4 (key sensitivity and share statistics) on the 512x512 8-bit head phantom, ROI 83,55,351,431 (x,y,w,h: the paper's ROI for its image IM-0001-0012):"
        );
        print_sensitivity(&key_sensitivity(&image, Rect::new(83, 55, 351, 431))?);
        did = true;
    }
    if !did {
        bail!("give --image, --share (with --header), --tables or --key-sensitivity N");
    }
    Ok(())
}

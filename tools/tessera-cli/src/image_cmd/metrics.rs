//! `tessera image metrics`: entropy, correlation, NPCR/UACI and the
//! paper's key-sensitivity experiment (Tables 3-4).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tessera_cryptomark::{
    Header, PaperKeys, Profile, ProtectKey, protect, random_salt, share_metric_view,
};
use tessera_image::metrics::{Direction, adjacent_correlation, entropy, npcr_uaci};
use tessera_image::{Image, PixelFormat, Rect, codec};

use super::input::{parse_roi, read_bounded};
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

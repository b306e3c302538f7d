//! `tessera demo --offline`: the imaging core alone, no services, on a
//! built-in head phantom (protect into two shares, restore bit for bit,
//! tamper and localize, reject a wrong key, the paper's statistics, GA-ES);
//! every step is checked and the command exits non-zero if one fails. The
//! networked demo (the default) is in `suite_demo.rs`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_cryptomark::{
    Profile, ProtectKey, RestoreKey, SHARE_PREAMBLE, StudyKey, protect, random_salt, restore,
    share_metric_view,
};
use tessera_image::phantom::head_phantom;
use tessera_image::{PixelFormat, Rect, codec};

use crate::image_cmd::{key_sensitivity, print_report, print_sensitivity, tamper_map};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its PNGs (and, for the suite, its PKI and redb
    /// files under OUT/suite); `--offline` writes into OUT/offline.
    #[arg(long, default_value = ".tessera/demo")]
    pub out: PathBuf,
    /// Run the imaging core alone (no services): protect/restore, the paper's
    /// statistics, GA-ES in one process; outputs in OUT/offline.
    #[arg(long)]
    pub offline: bool,
    /// A DICOM Part 10 file to walk through the suite instead of the
    /// built-in slice: stored over StoreDicom, retrieved byte-identical by a
    /// clinician and de-identified by a researcher, then deleted.
    #[arg(long, value_name = "FILE", conflicts_with = "offline")]
    pub input: Option<PathBuf>,
}

/// Checked demo steps.
#[derive(Default)]
pub struct Steps {
    pub failed: Vec<String>,
}

impl Steps {
    pub fn new() -> Self {
        Self { failed: Vec::new() }
    }

    pub fn check(&mut self, name: &str, ok: bool) {
        println!("  [{}] {name}", if ok { "ok" } else { "FAILED" });
        if !ok {
            self.failed.push(name.to_owned());
        }
    }
}

/// Now, as a moment files written from here on are not older than (whole
/// seconds: some file systems keep no finer times).
pub fn run_started() -> SystemTime {
    let now = SystemTime::now();
    now.duration_since(UNIX_EPOCH)
        .map(|d| UNIX_EPOCH + std::time::Duration::from_secs(d.as_secs()))
        .unwrap_or(now)
}

/// `dir` as an absolute path (for messages: a relative one says nothing
/// once the user has changed directory).
pub fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned())
}

/// The demo's closing lines: the absolute output directory and every file
/// this run wrote there (modified since `since`), sorted, with sizes;
/// subdirectories are named with what they hold.
pub fn print_outputs(dir: &Path, since: SystemTime, subdirs: &[(&str, &str)]) -> Result<()> {
    let abs = absolute(dir);
    println!("Outputs in {}:", abs.display());
    let mut files: Vec<(String, u64)> = Vec::new();
    for e in std::fs::read_dir(&abs).with_context(|| format!("listing {}", abs.display()))? {
        let e = e.with_context(|| format!("listing {}", abs.display()))?;
        let meta = e.metadata()?;
        let fresh = meta.modified().is_ok_and(|m| m >= since);
        if meta.is_file() && fresh {
            files.push((e.file_name().to_string_lossy().into_owned(), meta.len()));
        }
    }
    files.sort();
    for (name, len) in &files {
        println!("  {name} ({len} bytes)");
    }
    for (name, what) in subdirs {
        if abs.join(name).is_dir() {
            println!("  {name}/ ({what})");
        }
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<()> {
    // Its own folder: the suite demo writes PNGs of the same names.
    let dir = args.out.join("offline");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let since = run_started();
    let out = |name: &str| dir.join(name);
    let mut steps = Steps::new();

    println!("== 1. A 512x512 12-bit CT-like head slice (synthetic phantom, no patient data)");
    let image = head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 7)?;
    std::fs::write(out("original.png"), codec::encode_png(&image, 0)?)?;
    let roi = Rect::new(96, 40, 320, 432);
    println!(
        "  ROI {} (x,y,w,h); wrote {}",
        crate::report::rect(roi),
        out("original.png").display()
    );

    println!(
        "== 2. Protect (secure profile: S-box, bit planes, embedded block hashes, AES-256-GCM tiles)"
    );
    let key = StudyKey::from_bytes({
        let mut k = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
            .map_err(|_| anyhow::anyhow!("random number generator failed"))?;
        k
    });
    let protected = protect(
        &image,
        roi,
        "demo-study-1",
        ProtectKey::Secure {
            key: &key,
            salt: random_salt()?,
        },
    )?;
    let original = image.spec().byte_len();
    let (s1, s2) = (&protected.shares[0], &protected.shares[1]);
    println!(
        "  share 1 (cloud A) {} B, share 2 (cloud B) {} B: {:.3}x the {} image bytes",
        s1.len(),
        s2.len(),
        (s1.len() + s2.len()) as f64 / original as f64,
        original
    );
    for (i, s) in [s1, s2].into_iter().enumerate() {
        let (v, w, h, _) = share_metric_view(&protected.header, s).context("share view")?;
        let img = tessera_image::Image::new(
            tessera_image::ImageSpec::new(w as u32, h as u32, PixelFormat::GRAY8),
            v,
        )?;
        std::fs::write(
            out(&format!("share{}.png", i + 1)),
            codec::encode_png(&img, 0)?,
        )?;
        std::fs::write(out(&format!("share{}.bin", i + 1)), s)?;
    }
    std::fs::write(out("header.json"), protected.header.to_json())?;
    println!(
        "  wrote {}, {} (what each cloud sees), {}, {} and {}",
        out("share1.png").display(),
        out("share2.png").display(),
        out("share1.bin").display(),
        out("share2.bin").display(),
        out("header.json").display()
    );

    println!("== 3. Restore with the key: bit-identical and verified");
    let r = restore(&protected.header, s1, s2, RestoreKey::Secure(&key))?;
    print_report(&r.report, "  ");
    steps.check(
        "restored image is bit-identical to the original",
        r.image == image,
    );
    steps.check(
        "verification reports every ROI block intact",
        r.report.is_intact(),
    );

    println!("== 4. Tamper: change one byte of share 2 on cloud B, inside the ROI");
    let mut tampered = s2.clone();
    let pos = SHARE_PREAMBLE + tampered.len() / 2;
    tampered[pos] ^= 0x10;
    let t = restore(&protected.header, s1, &tampered, RestoreKey::Secure(&key))?;
    print_report(&t.report, "  ");
    std::fs::write(out("tamper-map.png"), tamper_map(&protected.header, &t)?)?;
    println!("  wrote {}", out("tamper-map.png").display());
    steps.check(
        "exactly one tile flagged, in share 2",
        t.report.tampered_tiles.len() == 1 && t.report.tampered_tiles[0].shares == vec![2],
    );
    let wrong_pixels = (0..image.samples().len())
        .filter(|&i| t.image.samples()[i] != image.samples()[i])
        .count();
    let tile_area = t
        .report
        .tampered_tiles
        .first()
        .map_or(0, |t| t.rect.area() as usize);
    steps.check(
        "every pixel outside the flagged tile restored exactly",
        wrong_pixels <= tile_area,
    );

    println!("== 5. A wrong key (one bit flipped) is refused, never garbage pixels");
    let mut wrong = *key.as_bytes();
    wrong[0] ^= 1;
    let err = restore(
        &protected.header,
        s1,
        s2,
        RestoreKey::Secure(&StudyKey::from_bytes(wrong)),
    );
    match &err {
        Err(e) => println!("  refused: {e}"),
        Ok(_) => println!("  restored with a wrong key!"),
    }
    steps.check("wrong key refused", err.is_err());

    println!("== 6. Key sensitivity and share statistics (paper 003, Tables 3-4), 8-bit phantom");
    let gray8 = head_phantom(512, 512, 1, PixelFormat::GRAY8, 2023)?;
    let rows = key_sensitivity(&gray8, Rect::new(83, 55, 351, 431))?;
    print_sensitivity(&rows);
    let secure_ok = rows
        .iter()
        .filter(|r| r.profile == Profile::Secure)
        .all(|r| {
            (99.55..=99.67).contains(&r.npcr)
                && (33.2..=33.7).contains(&r.uaci)
                && r.corr.iter().all(|c| c.abs() < 0.03)
        });
    steps.check(
        "secure shares: NPCR/UACI at the ideal, no adjacent correlation",
        secure_ok,
    );

    println!(
        "== 7. GA-ES segmentation (paper 000): each region's fragment alone is filtered, the merge equals the whole"
    );
    let config = tessera_segment::SegmentConfig {
        max_regions: 3,
        ..tessera_segment::SegmentConfig::default()
    };
    let seg = tessera_segment::segment(&image, &config)?;
    println!(
        "  {} regions (one per storage node), thresholds {:?}, {} generations, fitness {:.4}",
        seg.fitness.regions,
        seg.thresholds
            .iter()
            .map(|t| format!("{t:.3}"))
            .collect::<Vec<_>>(),
        seg.generations,
        seg.fitness.total
    );
    let fragments = tessera_segment::make_fragments(
        &image,
        &seg.region_map,
        tessera_segment::Operation::Gaussian.halo(),
    )?;
    for f in &fragments {
        let held: usize = f.tiles.iter().map(|t| t.samples.len()).sum();
        println!(
            "  region {}: {} blocks, {} of {} samples ({:.1} %) incl. halo",
            f.region,
            f.blocks.len(),
            held,
            image.samples().len(),
            100.0 * held as f64 / image.samples().len() as f64
        );
    }
    let outputs = fragments
        .iter()
        .map(|f| f.apply(tessera_segment::Operation::Gaussian))
        .collect::<Result<Vec<_>, _>>()?;
    let merged = tessera_segment::merge(image.spec(), &outputs)?;
    let whole = tessera_segment::process_whole(&image, tessera_segment::Operation::Gaussian)?;
    std::fs::write(
        out("gaussian-region-wise.png"),
        codec::encode_png(&merged, 0)?,
    )?;
    steps.check(
        "region-wise Gaussian filter equals the whole-image filter, bit for bit",
        merged == whole,
    );

    println!();
    if steps.failed.is_empty() {
        println!("demo: every step held.");
        print_outputs(&dir, since, &[])?;
        Ok(())
    } else {
        bail!(
            "demo: {} step(s) failed: {:?}",
            steps.failed.len(),
            steps.failed
        )
    }
}

//! `tessera image segment | process` and `tessera bench segment`: GA-ES
//! (paper 000) and region-wise processing on files, offline and in-process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, PixelFormat, codec};
use tessera_segment::{
    CostModel, GaParams, Operation, Problem, RegionMap, SegmentConfig, Segmentation, Weights,
    make_fragments, process_regions, process_whole,
};

use crate::image_cmd::InputArgs;
use crate::timing::median;

/// GA-ES knobs shared by `segment` and `process`.
#[derive(Args, Debug, Clone)]
pub struct GaArgs {
    /// Block side in pixels (edge blocks may be smaller).
    #[arg(long, default_value_t = tessera_segment::DEFAULT_BLOCK_SIZE)]
    pub block_size: u32,
    /// Storage nodes available: the largest number of regions.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// GA seed (the result is deterministic for a seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cost T of one block in ns; default: time the operation on one block.
    #[arg(long)]
    pub block_ns: Option<f64>,
    /// Fixed cost of each extra region (dispatch, round trip, merge), in µs.
    #[arg(long, default_value_t = 100.0)]
    pub region_overhead_us: f64,
    /// Fitness weight of the normalized makespan.
    #[arg(long, default_value_t = Weights::default().cost)]
    pub w_cost: f64,
    /// Fitness weight of the largest information share of one region.
    #[arg(long, default_value_t = Weights::default().info)]
    pub w_info: f64,
    /// Fitness weight of the largest |Cor(image, region mosaic)|.
    #[arg(long, default_value_t = Weights::default().cor)]
    pub w_cor: f64,
    /// Fitness weight of 1 - smallest NPCR(image, region mosaic).
    #[arg(long, default_value_t = Weights::default().npcr)]
    pub w_npcr: f64,
    /// GA population size.
    #[arg(long, default_value_t = GaParams::default().population)]
    pub population: usize,
    /// Stop after this many generations without improvement.
    #[arg(long, default_value_t = GaParams::default().stall_generations)]
    pub stall: usize,
}

#[derive(Args, Debug)]
pub struct SegmentArgs {
    // Boxed: keeps the `tessera` subcommand enum small.
    #[command(flatten)]
    pub input: Box<InputArgs>,
    #[command(flatten)]
    pub ga: Box<GaArgs>,
    /// `auto` (GA picks N up to --nodes) or a fixed number of regions.
    #[arg(long, default_value = "auto")]
    pub regions: String,
    /// Operation whose per-block time calibrates the cost model.
    #[arg(long, default_value = "gaussian")]
    pub op: String,
    /// Region map PNG (one color per region, shaded by the image).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct ProcessArgs {
    // Boxed: keeps the `tessera` subcommand enum small.
    #[command(flatten)]
    pub input: Box<InputArgs>,
    #[command(flatten)]
    pub ga: Box<GaArgs>,
    /// gaussian, median, unsharp, sobel or histeq.
    #[arg(long)]
    pub op: String,
    /// `auto` (GA picks N up to --nodes) or a fixed number of regions.
    #[arg(long, default_value = "auto")]
    pub regions: String,
    /// Result PNG (frames after the first go to <stem>-f<k>.png).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// Do not re-run the operation on the whole image to check the merge.
    #[arg(long)]
    pub skip_verify: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Timed repetitions per measurement (the median is printed).
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// Side of the square test image.
    #[arg(long, default_value_t = 512)]
    pub size: u32,
}

/// `auto` -> None, `N` -> Some(N).
fn parse_regions(text: &str) -> Result<Option<usize>> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let n: usize = text
        .parse()
        .with_context(|| format!("--regions must be `auto` or a number, got {text:?}"))?;
    if n == 0 {
        bail!("--regions must be at least 1");
    }
    Ok(Some(n))
}

/// Median time of `op` on one block-sized image of `format`: the `T` of eq. 12.
pub fn calibrate_block_ns(op: Operation, format: PixelFormat, block_size: u32) -> Result<f64> {
    let block = head_phantom(block_size, block_size, 1, format, 7)?;
    let t = median(31, || process_whole(&block, op));
    Ok(t.as_nanos() as f64)
}

fn config(ga: &GaArgs, regions: Option<usize>, block_ns: f64) -> SegmentConfig {
    let (min_regions, max_regions) = match regions {
        Some(n) => (n, n),
        None => (1, ga.nodes),
    };
    SegmentConfig {
        block_size: ga.block_size,
        min_regions,
        max_regions,
        cost: CostModel {
            block_ns,
            region_overhead_ns: ga.region_overhead_us * 1e3,
        },
        weights: Weights {
            cost: ga.w_cost,
            info: ga.w_info,
            cor: ga.w_cor,
            npcr: ga.w_npcr,
        },
        ga: GaParams {
            population: ga.population,
            stall_generations: ga.stall,
            seed: ga.seed,
            ..GaParams::default()
        },
    }
}

/// Runs GA-ES and returns the segmentation and its wall time.
fn run_ga(
    image: &Image,
    ga: &GaArgs,
    regions: &str,
    op: Operation,
) -> Result<(Segmentation, Duration, f64)> {
    let regions = parse_regions(regions)?;
    if ga.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let block_ns = match ga.block_ns {
        Some(t) => t,
        None => calibrate_block_ns(
            op,
            image.format(),
            ga.block_size.min(image.width()).min(image.height()).max(1),
        )?,
    };
    let config = config(ga, regions, block_ns);
    let start = Instant::now();
    let problem = Problem::new(image, &config)?;
    let result = problem.ga(&config.ga)?;
    let seg = problem.segmentation(&result);
    Ok((seg, start.elapsed(), block_ns))
}

fn print_segmentation(seg: &Segmentation, elapsed: Duration, block_ns: f64) {
    let f = &seg.fitness;
    println!("regions N: {}", f.regions);
    let thresholds: Vec<String> = seg.thresholds.iter().map(|t| format!("{t:.4}")).collect();
    println!("entropy thresholds (bits): [{}]", thresholds.join(", "));
    println!("blocks per region: {:?}", seg.region_map.region_sizes());
    println!("distinct block entropies: {}", seg.levels);
    println!("fitness total: {:.6}", f.total);
    println!(
        "  cost (makespan / one node): {:.4}  (makespan {:.1} µs, T = {:.0} ns per block)",
        f.cost,
        f.makespan_ns / 1e3,
        block_ns
    );
    println!(
        "  largest information share of one region: {:.4}",
        f.info_share
    );
    println!("  largest |Cor(image, region mosaic)|: {:.4}", f.cor);
    println!("  smallest NPCR(image, region mosaic): {:.2} %", f.npcr);
    println!(
        "generations: {} ({} fitness evaluations), GA-ES time {:.2} ms",
        seg.generations,
        seg.evaluations,
        elapsed.as_secs_f64() * 1e3
    );
}

const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

/// One color per region, shaded by the first channel of frame 0.
fn region_map_png(image: &Image, map: &RegionMap) -> Result<Vec<u8>> {
    let (w, h) = (image.width(), image.height());
    let fmt = image.format();
    let (lo, hi) = fmt.value_range();
    let span = (hi - lo).max(1) as f64;
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            let region = map.assignment[map.grid.block_of(x, y)] as usize;
            let lum = (fmt.value(image.get(0, x, y, 0)) - lo) as f64 / span;
            let shade = 0.35 + 0.65 * lum;
            for c in PALETTE[region % PALETTE.len()] {
                rgb.push((c as f64 * shade).round() as u8);
            }
        }
    }
    Ok(codec::encode_png_rgb8(w, h, rgb)?)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn segment(args: SegmentArgs) -> Result<()> {
    let op: Operation = args.op.parse()?;
    let image = args.input.load()?;
    let (seg, elapsed, block_ns) = run_ga(&image, &args.ga, &args.regions, op)?;
    print_segmentation(&seg, elapsed, block_ns);
    write(&args.output, &region_map_png(&image, &seg.region_map)?)?;
    println!("region map: {}", args.output.display());
    Ok(())
}

pub fn process(args: ProcessArgs) -> Result<()> {
    let op: Operation = args.op.parse()?;
    let image = args.input.load()?;
    let (seg, elapsed, block_ns) = run_ga(&image, &args.ga, &args.regions, op)?;
    print_segmentation(&seg, elapsed, block_ns);
    let fragments = make_fragments(&image, &seg.region_map, op.halo())?;
    let held: usize = fragments
        .iter()
        .flat_map(|f| &f.tiles)
        .map(|t| t.rect.area() as usize)
        .sum();
    let pixels = image.width() as usize * image.height() as usize;
    println!(
        "{op}: {} fragments, halo {} px, pixels sent / image pixels = {:.3}",
        fragments.len(),
        op.halo(),
        held as f64 / pixels as f64
    );
    let start = Instant::now();
    let result = process_regions(&image, &seg.region_map, op)?;
    println!(
        "region-wise {op}: {:.2} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    if !args.skip_verify {
        let whole = process_whole(&image, op)?;
        if whole != result {
            bail!("region-wise result differs from whole-image processing");
        }
        println!("bit-identical to whole-image {op}: yes");
    }
    for frame in 0..result.frames() {
        let path = if frame == 0 {
            args.output.clone()
        } else {
            let stem = args.output.with_extension("");
            PathBuf::from(format!("{}-f{frame}.png", stem.display()))
        };
        write(&path, &codec::encode_png(&result, frame)?)?;
        println!("result: {}", path.display());
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `tessera bench segment` report: GA-ES time on a `size` x `size`
/// phantom and region-wise vs whole-image time for every operation, measured
/// in the same run.
pub fn bench_report(iterations: usize, size: u32) -> Result<String> {
    let mut out = String::new();
    let n = iterations.max(1);
    writeln!(
        out,
        "== tessera bench segment: {size}x{size} head phantom, median of {n} runs, one thread =="
    )?;
    for format in [PixelFormat::GRAY8, PixelFormat::gray16(12, true)] {
        let image = head_phantom(size, size, 1, format, 1)?;
        let block_ns = calibrate_block_ns(Operation::Gaussian, format, 16)?;
        let config = SegmentConfig {
            cost: CostModel {
                block_ns,
                ..CostModel::default()
            },
            ..SegmentConfig::default()
        };
        let stats_time = median(n, || {
            tessera_segment::block_stats(
                &image,
                &tessera_segment::BlockGrid::for_image(&image, 16)?,
            )
        });
        let problem = Problem::new(&image, &config)?;
        let result = problem.ga(&config.ga)?;
        let ga_time = median(n, || problem.ga(&config.ga));
        let total = median(n, || tessera_segment::segment(&image, &config));
        let per_gen = ga_time.as_secs_f64() * 1e6 / result.generations.max(1) as f64;
        writeln!(out)?;
        writeln!(out, "### {format}: GA-ES (target < 50 ms)")?;
        writeln!(
            out,
            "GA-ES total {:.2} ms = block entropies {:.2} ms + GA {:.2} ms; {} generations, {:.1} µs per generation, {} evaluations; N = {}, fitness {:.4}",
            ms(total),
            ms(stats_time),
            ms(ga_time),
            result.generations,
            per_gen,
            result.evaluations,
            result.fitness.regions,
            result.fitness.total
        )?;
        let seg = problem.segmentation(&result);
        writeln!(out)?;
        writeln!(
            out,
            "| op | whole ms | region-wise ms | ratio (target <= 1.3x) | pixels sent / image |"
        )?;
        writeln!(out, "|---|---|---|---|---|")?;
        for op in Operation::ALL {
            let whole = median(n, || process_whole(&image, op));
            let regions = median(n, || process_regions(&image, &seg.region_map, op));
            let fragments = make_fragments(&image, &seg.region_map, op.halo())?;
            let held: u64 = fragments
                .iter()
                .flat_map(|f| &f.tiles)
                .map(|t| t.rect.area())
                .sum();
            writeln!(
                out,
                "| {op} | {:.2} | {:.2} | {:.2}x | {:.3} |",
                ms(whole),
                ms(regions),
                regions.as_secs_f64() / whole.as_secs_f64().max(1e-12),
                held as f64 / (size as f64 * size as f64)
            )?;
        }
    }
    Ok(out)
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.size < 16 {
        bail!("--size must be at least 16");
    }
    print!("{}", bench_report(args.iterations, args.size)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_argument() {
        assert_eq!(parse_regions("auto").unwrap(), None);
        assert_eq!(parse_regions("3").unwrap(), Some(3));
        assert!(parse_regions("0").is_err());
        assert!(parse_regions("many").is_err());
    }

    #[test]
    fn region_map_png_decodes_to_the_image_size() {
        let image = head_phantom(40, 24, 1, PixelFormat::GRAY16, 1).unwrap();
        let map = RegionMap::single(tessera_segment::BlockGrid::for_image(&image, 8).unwrap());
        let png = region_map_png(&image, &map).unwrap();
        let back = codec::decode(&png).unwrap();
        assert_eq!((back.width(), back.height()), (40, 24));
        assert_eq!(back.format(), PixelFormat::RGB8);
    }
}

//! GA-ES (Algorithm 1): choose the number of regions `N` and the entropy
//! thresholds with a genetic algorithm against a concrete fitness.
//!
//! **Encoding.** The distinct block entropies, sorted, are the *levels*
//! `e_0 < e_1 < ... < e_{L-1}`; a threshold can only usefully sit between two
//! consecutive levels, so the `K = L - 1` candidate cuts are those gaps, and a
//! chromosome is a strictly ascending list of `N - 1` cut indices (threshold
//! `(e_c + e_{c+1}) / 2`). Every region of a chromosome is therefore non-empty,
//! and `N` is bounded by both the node count and `L`.
//!
//! **Fitness** (minimized; see `docs/SEGMENTATION.md`) is a weighted sum of
//! four terms in `[0, 1]`: the makespan of eq. 12 run in parallel plus a
//! per-region overhead, normalized by the one-node time; the largest share of
//! the image's information (entropy x samples) one region holds; the largest
//! |Cor| (eq. 7-10) between the image and one region's mosaic; and
//! `1 - NPCR/100` (eq. 11) for the region whose mosaic differs least from the
//! image. A region is a contiguous range of levels, so every term comes from
//! per-level prefix sums in O(N) per evaluation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tessera_image::Image;

use crate::fragment::RegionMap;
use crate::grid::{BlockGrid, BlockStats, DEFAULT_BLOCK_SIZE, block_stats};
use crate::{Result, SegmentError};

/// Processing-time model of eq. 12: `T` per block and a fixed cost per region.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Time to process one full block with the chosen operation (`T`), in ns.
    /// The CLI calibrates it by timing the operation on one block.
    pub block_ns: f64,
    /// Fixed cost of one more region (fragment building, dispatch, round
    /// trip, merge), in ns.
    pub region_overhead_ns: f64,
}

impl Default for CostModel {
    fn default() -> CostModel {
        CostModel {
            block_ns: 2_000.0,
            region_overhead_ns: 100_000.0,
        }
    }
}

/// Weights of the four normalized fitness terms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub cost: f64,
    pub info: f64,
    pub cor: f64,
    pub npcr: f64,
}

impl Default for Weights {
    fn default() -> Weights {
        Weights {
            cost: 0.4,
            info: 0.3,
            cor: 0.15,
            npcr: 0.15,
        }
    }
}

/// Genetic-algorithm parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GaParams {
    pub population: usize,
    pub max_generations: usize,
    /// Stop when the best fitness has not improved for this many generations.
    pub stall_generations: usize,
    pub crossover_rate: f64,
    pub mutation_rate: f64,
    pub tournament: usize,
    pub elitism: usize,
    pub seed: u64,
}

impl Default for GaParams {
    fn default() -> GaParams {
        GaParams {
            population: 32,
            max_generations: 300,
            stall_generations: 30,
            crossover_rate: 0.9,
            mutation_rate: 0.4,
            tournament: 3,
            elitism: 2,
            seed: 0,
        }
    }
}

/// Everything GA-ES needs besides the image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub block_size: u32,
    /// Smallest acceptable `N` (set equal to `max_regions` for a fixed `N`).
    pub min_regions: usize,
    /// Largest `N`: the number of nodes available.
    pub max_regions: usize,
    pub cost: CostModel,
    pub weights: Weights,
    pub ga: GaParams,
}

impl Default for SegmentConfig {
    fn default() -> SegmentConfig {
        SegmentConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            min_regions: 1,
            max_regions: 4,
            cost: CostModel::default(),
            weights: Weights::default(),
            ga: GaParams::default(),
        }
    }
}

/// The fitness of one chromosome, term by term.
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct FitnessTerms {
    pub regions: usize,
    /// `max_i(R_i T) + N overhead`, ns.
    pub makespan_ns: f64,
    /// Makespan / one-node time `(B T + overhead)`.
    pub cost: f64,
    /// Largest share of the image's information held by one region.
    pub info_share: f64,
    /// Largest |Cor(image, region mosaic)|.
    pub cor: f64,
    /// Smallest NPCR(image, region mosaic) in percent.
    pub npcr: f64,
    /// The weighted sum (lower is better).
    pub total: f64,
}

/// Outcome of one search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub cuts: Vec<u32>,
    pub fitness: FitnessTerms,
    pub evaluations: u64,
    pub generations: usize,
    /// Best total fitness after each generation (GA only).
    pub history: Vec<f64>,
}

/// The chosen segmentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segmentation {
    pub region_map: RegionMap,
    /// Entropy of every block, row-major.
    pub entropies: Vec<f64>,
    /// `N - 1` ascending entropy thresholds: region `i` holds the blocks with
    /// `thresholds[i-1] < H <= thresholds[i]`.
    pub thresholds: Vec<f64>,
    pub fitness: FitnessTerms,
    pub generations: usize,
    pub evaluations: u64,
    pub history: Vec<f64>,
    /// Distinct entropy values (`K + 1`).
    pub levels: usize,
}

/// A segmentation problem: the image reduced to per-level prefix sums.
#[derive(Clone, Debug)]
pub struct Problem {
    grid: BlockGrid,
    entropies: Vec<f64>,
    levels: Vec<f64>,
    level_of_block: Vec<u32>,
    sorted_block_levels: Vec<u32>,
    p_blocks: Vec<u64>,
    p_samples: Vec<u64>,
    p_info: Vec<f64>,
    p_sum: Vec<i128>,
    p_sq: Vec<i128>,
    p_nonzero: Vec<u64>,
    min_len: usize,
    max_len: usize,
    cost: CostModel,
    weights: Weights,
}

type Individual = (Vec<u32>, FitnessTerms);

fn sort_population(pop: &mut [Individual]) {
    pop.sort_by(|a, b| a.1.total.total_cmp(&b.1.total).then_with(|| a.0.cmp(&b.0)));
}

fn better(a: &FitnessTerms, b: &FitnessTerms) -> bool {
    a.total < b.total
}

fn finite_non_negative(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(SegmentError::Parameter(format!(
            "{name} must be finite and non-negative, got {v}"
        )))
    }
}

impl Problem {
    pub fn new(image: &Image, config: &SegmentConfig) -> Result<Problem> {
        let grid = BlockGrid::for_image(image, config.block_size)?;
        if config.min_regions == 0 || config.max_regions == 0 {
            return Err(SegmentError::ZeroRegions);
        }
        if config.min_regions > config.max_regions {
            return Err(SegmentError::Parameter(format!(
                "min_regions {} exceeds max_regions {}",
                config.min_regions, config.max_regions
            )));
        }
        if config.min_regions > grid.len() {
            return Err(SegmentError::TooManyRegions {
                requested: config.min_regions,
                blocks: grid.len(),
            });
        }
        let w = config.weights;
        for (name, v) in [
            ("block_ns", config.cost.block_ns),
            ("region_overhead_ns", config.cost.region_overhead_ns),
            ("weight cost", w.cost),
            ("weight info", w.info),
            ("weight cor", w.cor),
            ("weight npcr", w.npcr),
        ] {
            finite_non_negative(name, v)?;
        }
        let stats = block_stats(image, &grid)?;
        Problem::from_stats(grid, &stats, config)
    }

    fn from_stats(
        grid: BlockGrid,
        stats: &[BlockStats],
        config: &SegmentConfig,
    ) -> Result<Problem> {
        let entropies: Vec<f64> = stats.iter().map(|s| s.entropy).collect();
        let mut levels = entropies.clone();
        levels.sort_by(f64::total_cmp);
        levels.dedup();
        if config.min_regions > levels.len() {
            return Err(SegmentError::NotEnoughEntropyLevels {
                requested: config.min_regions,
                levels: levels.len(),
            });
        }
        let level_of_block: Vec<u32> = entropies
            .iter()
            .map(|e| levels.partition_point(|l| l < e) as u32)
            .collect();
        let mut sorted_block_levels = level_of_block.clone();
        sorted_block_levels.sort_unstable();
        let l = levels.len();
        let mut blocks = vec![0u64; l];
        let mut samples = vec![0u64; l];
        let mut info = vec![0f64; l];
        let mut sum = vec![0i128; l];
        let mut sq = vec![0i128; l];
        let mut nonzero = vec![0u64; l];
        for (s, &lv) in stats.iter().zip(&level_of_block) {
            let i = lv as usize;
            blocks[i] += 1;
            samples[i] += s.samples;
            info[i] += s.entropy * s.samples as f64;
            sum[i] += s.sum as i128;
            sq[i] += s.sum_sq as i128;
            nonzero[i] += s.nonzero;
        }
        fn prefix<T: Copy + std::ops::Add<Output = T> + Default>(v: &[T]) -> Vec<T> {
            let mut out = Vec::with_capacity(v.len() + 1);
            let mut acc = T::default();
            out.push(acc);
            for &x in v {
                acc = acc + x;
                out.push(acc);
            }
            out
        }
        Ok(Problem {
            grid,
            entropies,
            min_len: config.min_regions - 1,
            max_len: config.max_regions.min(l) - 1,
            p_blocks: prefix(&blocks),
            p_samples: prefix(&samples),
            p_info: prefix(&info),
            p_sum: prefix(&sum),
            p_sq: prefix(&sq),
            p_nonzero: prefix(&nonzero),
            levels,
            level_of_block,
            sorted_block_levels,
            cost: config.cost,
            weights: config.weights,
        })
    }

    /// Number of candidate cuts `K`.
    pub fn candidate_cuts(&self) -> usize {
        self.levels.len() - 1
    }

    /// Allowed region counts.
    pub fn region_range(&self) -> (usize, usize) {
        (self.min_len + 1, self.max_len + 1)
    }

    pub fn grid(&self) -> &BlockGrid {
        &self.grid
    }

    /// Checks a chromosome: ascending, distinct, in range, allowed length.
    pub fn check(&self, cuts: &[u32]) -> Result<()> {
        let k = self.candidate_cuts();
        if cuts.len() < self.min_len || cuts.len() > self.max_len {
            return Err(SegmentError::Parameter(format!(
                "{} cuts, allowed {}..={}",
                cuts.len(),
                self.min_len,
                self.max_len
            )));
        }
        if cuts.windows(2).any(|w| w[0] >= w[1]) || cuts.iter().any(|&c| c as usize >= k) {
            return Err(SegmentError::Parameter(
                "cuts must be strictly ascending and below the candidate count".into(),
            ));
        }
        Ok(())
    }

    /// Fitness of a chromosome.
    pub fn evaluate(&self, cuts: &[u32]) -> Result<FitnessTerms> {
        self.check(cuts)?;
        Ok(self.eval(cuts))
    }

    fn eval(&self, cuts: &[u32]) -> FitnessTerms {
        let l = self.levels.len();
        let n_regions = cuts.len() + 1;
        let total_blocks = self.p_blocks[l] as f64;
        let n = self.p_samples[l] as f64;
        let info_total = self.p_info[l];
        let sx = self.p_sum[l] as f64;
        let sxx = self.p_sq[l] as f64;
        let z_total = self.p_nonzero[l];
        let mx = sx / n;
        let var_x = (sxx / n - mx * mx).max(0.0);
        let (mut max_blocks, mut max_info, mut max_cor, mut min_npcr) = (0u64, 0f64, 0f64, 100f64);
        let mut start = 0usize;
        for i in 0..n_regions {
            let end = if i < cuts.len() {
                cuts[i] as usize + 1
            } else {
                l
            };
            let blocks = self.p_blocks[end] - self.p_blocks[start];
            let samples = self.p_samples[end] - self.p_samples[start];
            max_blocks = max_blocks.max(blocks);
            let info = if info_total > 0.0 {
                (self.p_info[end] - self.p_info[start]) / info_total
            } else {
                samples as f64 / n
            };
            max_info = max_info.max(info);
            // Mosaic m: the region's samples, 0 elsewhere; so sum(m) = S_r,
            // sum(m^2) = sum(x m) = Q_r.
            let sm = (self.p_sum[end] - self.p_sum[start]) as f64;
            let smm = (self.p_sq[end] - self.p_sq[start]) as f64;
            let mm = sm / n;
            let var_m = (smm / n - mm * mm).max(0.0);
            let cov = smm / n - mx * mm;
            let cor = if var_x > 0.0 && var_m > 0.0 {
                (cov / (var_x.sqrt() * var_m.sqrt())).clamp(-1.0, 1.0)
            } else if samples as f64 == n {
                1.0
            } else {
                0.0
            };
            max_cor = max_cor.max(cor.abs());
            let z_region = self.p_nonzero[end] - self.p_nonzero[start];
            let npcr = 100.0 * (z_total - z_region) as f64 / n;
            min_npcr = min_npcr.min(npcr);
            start = end;
        }
        let t = self.cost.block_ns;
        let o = self.cost.region_overhead_ns;
        let makespan = max_blocks as f64 * t + n_regions as f64 * o;
        let one_node = total_blocks * t + o;
        let cost = if one_node > 0.0 {
            makespan / one_node
        } else {
            1.0
        };
        let w = self.weights;
        let total =
            w.cost * cost + w.info * max_info + w.cor * max_cor + w.npcr * (1.0 - min_npcr / 100.0);
        FitnessTerms {
            regions: n_regions,
            makespan_ns: makespan,
            cost,
            info_share: max_info,
            cor: max_cor,
            npcr: min_npcr,
            total,
        }
    }

    /// Entropy thresholds of a chromosome (midpoints between levels).
    pub fn thresholds(&self, cuts: &[u32]) -> Vec<f64> {
        cuts.iter()
            .map(|&c| (self.levels[c as usize] + self.levels[c as usize + 1]) / 2.0)
            .collect()
    }

    /// The region map of a chromosome.
    pub fn region_map(&self, cuts: &[u32]) -> RegionMap {
        let assignment = self
            .level_of_block
            .iter()
            .map(|&lv| cuts.partition_point(|&c| c < lv) as u16)
            .collect();
        RegionMap {
            grid: self.grid,
            regions: (cuts.len() + 1) as u16,
            assignment,
        }
    }

    /// The full answer for a search result.
    pub fn segmentation(&self, r: &SearchResult) -> Segmentation {
        Segmentation {
            region_map: self.region_map(&r.cuts),
            entropies: self.entropies.clone(),
            thresholds: self.thresholds(&r.cuts),
            fitness: r.fitness,
            generations: r.generations,
            evaluations: r.evaluations,
            history: r.history.clone(),
            levels: self.levels.len(),
        }
    }

    fn random_absent(&self, v: &[u32], rng: &mut ChaCha8Rng) -> Option<u32> {
        let k = self.candidate_cuts();
        if v.len() >= k {
            return None;
        }
        for _ in 0..8 {
            let c = rng.random_range(0..k as u32);
            if v.binary_search(&c).is_err() {
                return Some(c);
            }
        }
        let absent: Vec<u32> = (0..k as u32)
            .filter(|c| v.binary_search(c).is_err())
            .collect();
        Some(absent[rng.random_range(0..absent.len())])
    }

    fn insert(v: &mut Vec<u32>, c: u32) {
        if let Err(pos) = v.binary_search(&c) {
            v.insert(pos, c);
        }
    }

    /// Sorted, distinct, length within bounds.
    fn repair(&self, v: &mut Vec<u32>, rng: &mut ChaCha8Rng) {
        v.sort_unstable();
        v.dedup();
        while v.len() > self.max_len {
            let i = rng.random_range(0..v.len());
            v.remove(i);
        }
        while v.len() < self.min_len {
            match self.random_absent(v, rng) {
                Some(c) => Problem::insert(v, c),
                None => break,
            }
        }
    }

    fn random_chromosome(&self, rng: &mut ChaCha8Rng) -> Vec<u32> {
        let len = rng.random_range(self.min_len..=self.max_len);
        let mut v: Vec<u32> = rand::seq::index::sample(rng, self.candidate_cuts(), len)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        v.sort_unstable();
        v
    }

    /// The paper's rule as seeds: for each allowed `N`, thresholds that give
    /// every region about `blocks / N` blocks.
    fn paper_seeds(&self, rng: &mut ChaCha8Rng) -> Vec<Vec<u32>> {
        let b = self.sorted_block_levels.len();
        let k = self.candidate_cuts() as u32;
        (self.min_len + 1..=self.max_len + 1)
            .map(|n| {
                let mut v: Vec<u32> = (1..n)
                    .map(|j| self.sorted_block_levels[(j * b / n).max(1) - 1])
                    .filter(|&c| c < k)
                    .collect();
                self.repair(&mut v, rng);
                v
            })
            .collect()
    }

    fn mutate(&self, v: &mut Vec<u32>, rng: &mut ChaCha8Rng) {
        let k = self.candidate_cuts();
        if k == 0 {
            return;
        }
        let choice = rng.random_range(0..4u8);
        if choice == 0 && !v.is_empty() {
            // Shift one cut by a log-uniform step: coarse and fine moves.
            let i = rng.random_range(0..v.len());
            let e = rng.random_range(0..=usize::BITS - k.leading_zeros());
            let step = rng.random_range(1..=1i64 << e);
            let to = v[i] as i64 + if rng.random_bool(0.5) { step } else { -step };
            if (0..k as i64).contains(&to) && v.binary_search(&(to as u32)).is_err() {
                v.remove(i);
                Problem::insert(v, to as u32);
                return;
            }
        }
        let add = choice == 1 && v.len() < self.max_len;
        if let Some(c) = add.then(|| self.random_absent(v, rng)).flatten() {
            Problem::insert(v, c);
            return;
        }
        if choice == 2 && v.len() > self.min_len {
            let i = rng.random_range(0..v.len());
            v.remove(i);
            return;
        }
        // Otherwise replace a random cut (or add one to an empty list).
        let Some(c) = self.random_absent(v, rng) else {
            return;
        };
        if !v.is_empty() {
            let i = rng.random_range(0..v.len());
            v.remove(i);
        } else if v.len() >= self.max_len {
            return;
        }
        Problem::insert(v, c);
    }

    /// One-point crossover on the entropy axis: `a`'s cuts below a random
    /// point, `b`'s from it on.
    fn crossover(&self, a: &[u32], b: &[u32], rng: &mut ChaCha8Rng) -> Vec<u32> {
        let t = rng.random_range(0..=self.candidate_cuts() as u32);
        let mut v: Vec<u32> = a.iter().copied().filter(|&c| c < t).collect();
        v.extend(b.iter().copied().filter(|&c| c >= t));
        self.repair(&mut v, rng);
        v
    }

    /// Algorithm 1: initial population (the paper's equal-count thresholds
    /// for each `N`, then random chromosomes), then tournament selection,
    /// crossover, mutation and fitness with elitism, until the best fitness
    /// has not improved for `stall_generations` generations.
    pub fn ga(&self, p: &GaParams) -> Result<SearchResult> {
        if p.population < 2
            || p.tournament == 0
            || p.elitism >= p.population
            || !(0.0..=1.0).contains(&p.crossover_rate)
            || !(0.0..=1.0).contains(&p.mutation_rate)
        {
            return Err(SegmentError::Parameter(format!("bad GA parameters {p:?}")));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        let mut evaluations = 0u64;
        let mut eval = |c: Vec<u32>| {
            evaluations += 1;
            let f = self.eval(&c);
            (c, f)
        };
        let mut pop: Vec<Individual> = Vec::with_capacity(p.population);
        for seed in self.paper_seeds(&mut rng).into_iter().take(p.population) {
            pop.push(eval(seed));
        }
        while pop.len() < p.population {
            let c = self.random_chromosome(&mut rng);
            pop.push(eval(c));
        }
        sort_population(&mut pop);
        let mut best = pop[0].clone();
        let mut history = Vec::new();
        let mut stall = 0;
        let mut generations = 0;
        while generations < p.max_generations && stall < p.stall_generations {
            generations += 1;
            let mut next: Vec<Individual> = pop[..p.elitism].to_vec();
            // Niche elitism: the best chromosome of every region count
            // survives too, so a good N that is momentarily second best is
            // not lost to premature convergence on another N.
            for ind in &pop {
                if next.len() + 1 >= p.population {
                    break;
                }
                if !next.iter().any(|e| e.0.len() == ind.0.len()) {
                    next.push(ind.clone());
                }
            }
            while next.len() < p.population {
                // Population is sorted: the smallest index drawn wins.
                let mut pick = || {
                    (0..p.tournament)
                        .map(|_| rng.random_range(0..pop.len()))
                        .min()
                        .unwrap_or(0)
                };
                let (i, j) = (pick(), pick());
                let mut child = if rng.random_bool(p.crossover_rate) {
                    self.crossover(&pop[i].0, &pop[j].0, &mut rng)
                } else {
                    pop[i].0.clone()
                };
                if rng.random_bool(p.mutation_rate) {
                    self.mutate(&mut child, &mut rng);
                }
                // A duplicate adds nothing: mutate it (a few tries).
                for _ in 0..3 {
                    if !next.iter().any(|e| e.0 == child) {
                        break;
                    }
                    self.mutate(&mut child, &mut rng);
                }
                next.push(eval(child));
            }
            sort_population(&mut next);
            pop = next;
            if better(&pop[0].1, &best.1) {
                best = pop[0].clone();
                stall = 0;
            } else {
                stall += 1;
            }
            history.push(best.1.total);
        }
        Ok(SearchResult {
            cuts: best.0,
            fitness: best.1,
            evaluations,
            generations,
            history,
        })
    }

    /// Best of `evaluations` uniformly random chromosomes (the baseline).
    pub fn random_search(&self, evaluations: u64, seed: u64) -> SearchResult {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut best: Option<Individual> = None;
        for _ in 0..evaluations.max(1) {
            let c = self.random_chromosome(&mut rng);
            let f = self.eval(&c);
            if best.as_ref().is_none_or(|b| better(&f, &b.1)) {
                best = Some((c, f));
            }
        }
        let (cuts, fitness) = best.unwrap_or_default();
        SearchResult {
            cuts,
            fitness,
            evaluations: evaluations.max(1),
            generations: 0,
            history: Vec::new(),
        }
    }

    /// Number of chromosomes in the search space.
    pub fn search_space(&self) -> u128 {
        let k = self.candidate_cuts() as u128;
        let mut total = 0u128;
        for len in self.min_len..=self.max_len {
            let mut c = 1u128;
            for i in 0..len as u128 {
                c = c.saturating_mul(k - i) / (i + 1);
            }
            total = total.saturating_add(c);
        }
        total
    }

    /// Every chromosome, when there are at most `limit`.
    pub fn exhaustive(&self, limit: u128) -> Result<SearchResult> {
        let space = self.search_space();
        if space > limit {
            return Err(SegmentError::SearchSpaceTooLarge(space));
        }
        let k = self.candidate_cuts() as u32;
        let mut best: Option<Individual> = None;
        let mut evaluations = 0u64;
        for len in self.min_len..=self.max_len {
            let mut c: Vec<u32> = (0..len as u32).collect();
            loop {
                evaluations += 1;
                let f = self.eval(&c);
                if best.as_ref().is_none_or(|b| better(&f, &b.1)) {
                    best = Some((c.clone(), f));
                }
                // Next combination in lexicographic order: bump the rightmost
                // position that can still grow.
                let mut i = len;
                let mut found = false;
                while i > 0 {
                    i -= 1;
                    if c[i] < k - (len - i) as u32 {
                        found = true;
                        break;
                    }
                }
                if !found {
                    break;
                }
                c[i] += 1;
                for j in i + 1..len {
                    c[j] = c[j - 1] + 1;
                }
            }
        }
        let (cuts, fitness) = best.unwrap_or_default();
        Ok(SearchResult {
            cuts,
            fitness,
            evaluations,
            generations: 0,
            history: Vec::new(),
        })
    }
}

/// GA-ES on an image.
pub fn segment(image: &Image, config: &SegmentConfig) -> Result<Segmentation> {
    let problem = Problem::new(image, config)?;
    let result = problem.ga(&config.ga)?;
    Ok(problem.segmentation(&result))
}

#[cfg(test)]
mod tests;

//! `tessera bench erasure`: k-of-n encode and decode throughput on one core
//! against a memcpy and one SHA-256 pass over the same bytes, measured in
//! the same run (the goal: erasure coding costs no more than
//! SHA-256 of the same bytes).

use anyhow::{Result, anyhow};
use clap::Args;
use sha2::{Digest, Sha256};
use tessera_erasure::Scheme;

use crate::timing::fastest;

#[derive(Args, Debug)]
pub struct ErasureBenchArgs {
    /// Object size in MiB (a 512x512 16-bit share is 0.5 MiB).
    #[arg(long, default_value_t = 8)]
    pub mib: usize,
    /// Data fragments k.
    #[arg(long, default_value_t = 3)]
    pub data: usize,
    /// Parity fragments m.
    #[arg(long, default_value_t = 2)]
    pub parity: usize,
    #[arg(long, default_value_t = 9)]
    pub iterations: usize,
}

pub fn erasure(a: ErasureBenchArgs) -> Result<()> {
    let scheme = Scheme::new(a.data, a.parity).map_err(|e| anyhow!("{e}"))?;
    let len = a.mib.max(1) << 20;
    // Incompressible bytes (a share is ciphertext).
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let frags = tessera_erasure::encode("bench.s1", scheme, &data).map_err(|e| anyhow!("{e}"))?;
    // Decode with the first m data fragments lost (worst case: parity used).
    let lost = a.parity.min(a.data);
    let given: Vec<(usize, &[u8])> = (lost..scheme.n())
        .take(scheme.k)
        .map(|i| (i, frags[i].as_slice()))
        .collect();
    let back = tessera_erasure::decode("bench.s1", scheme, &given).map_err(|e| anyhow!("{e}"))?;
    if back != data {
        return Err(anyhow!("decode did not give the object back"));
    }
    let n = a.iterations;
    let copy = fastest(n, || data.clone());
    let sha = fastest(n, || Sha256::digest(&data));
    let enc = fastest(n, || tessera_erasure::encode("bench.s1", scheme, &data));
    let dec = fastest(n, || tessera_erasure::decode("bench.s1", scheme, &given));
    let mbs = |d: std::time::Duration| len as f64 / d.as_secs_f64() / 1e6;
    let ratio = |d: std::time::Duration| d.as_secs_f64() / sha.as_secs_f64();
    println!(
        "== tessera bench erasure ({}+{}, {} MiB object, one core, fastest of {n}) ==",
        a.data, a.parity, a.mib
    );
    println!("| operation | MB/s | time vs SHA-256 of the same bytes |");
    println!("|---|---:|---:|");
    println!("| memcpy | {:.0} | {:.2}x |", mbs(copy), ratio(copy));
    println!("| SHA-256 (baseline) | {:.0} | 1.00x |", mbs(sha));
    println!(
        "| encode (+ fragment SHA-256 header) | {:.0} | {:.2}x |",
        mbs(enc),
        ratio(enc)
    );
    println!(
        "| decode, {lost} data fragment(s) lost | {:.0} | {:.2}x |",
        mbs(dec),
        ratio(dec)
    );
    println!(
        "storage overhead: {:.2}x (mirroring the same tolerance: {}x)",
        scheme.n() as f64 / scheme.k as f64,
        a.parity + 1
    );
    Ok(())
}

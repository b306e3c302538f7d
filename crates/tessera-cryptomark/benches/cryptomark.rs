//! Criterion: protect and restore of a 512x512 16-bit slice beside one
//! SHA-256 pass over the same bytes (the floor: every ROI block is hashed).
//! Compare the reported times as ratios; `tessera bench image` prints them.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use tessera_cryptomark::{ProtectKey, RestoreKey, StudyKey, protect, restore};
use tessera_image::phantom::head_phantom;
use tessera_image::{PixelFormat, Rect};

fn slice_16bit(c: &mut Criterion) {
    let image = head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 42).expect("phantom");
    let roi = Rect::new(64, 48, 384, 416);
    let bytes = image.to_le_bytes();
    let key = StudyKey::from_bytes([7; 32]);
    let pk = ProtectKey::Secure {
        key: &key,
        salt: [9; 32],
    };
    let protected = protect(&image, roi, "bench", pk).expect("protect");
    let paper = protect(&image, roi, "bench", ProtectKey::Paper).expect("protect");
    let paper_keys = paper.paper_keys.expect("keys");

    let mut g = c.benchmark_group("512x512_12in16bit");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(20);
    g.bench_function("sha256_baseline", |b| b.iter(|| Sha256::digest(&bytes)));
    g.bench_function("protect_secure", |b| {
        b.iter(|| protect(&image, roi, "bench", pk).expect("protect"))
    });
    g.bench_function("restore_secure", |b| {
        b.iter(|| {
            restore(
                &protected.header,
                &protected.shares[0],
                &protected.shares[1],
                RestoreKey::Secure(&key),
            )
            .expect("restore")
        })
    });
    g.sample_size(10);
    g.bench_function("protect_paper", |b| {
        b.iter(|| {
            protect(&image, roi, "bench", ProtectKey::PaperWithKeys(&paper_keys)).expect("protect")
        })
    });
    g.finish();
}

criterion_group!(benches, slice_16bit);
criterion_main!(benches);

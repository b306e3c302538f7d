//! Criterion: protect and restore of a 512x512 16-bit slice beside one
//! SHA-256 pass over the same bytes (the floor: every ROI block is hashed).
//! Compare the reported times as ratios; `tessera bench image` prints them.

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use tessera_cryptomark::{
    ProtectKey, Protected, RestoreKey, StudyKey, protect, protect_with_threads, restore,
    restore_with_threads,
};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, PixelFormat, Rect};

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
    bench_restore(
        &mut g,
        "restore_secure",
        &protected,
        RestoreKey::Secure(&key),
        None,
    );
    secure_one_thread(&mut g, &image, roi, &key, pk, &protected);
    g.sample_size(10);
    let ppk = ProtectKey::PaperWithKeys(&paper_keys);
    g.bench_function("protect_paper", |b| {
        b.iter(|| protect(&image, roi, "bench", ppk).expect("protect"))
    });
    g.bench_function("protect_paper_1thread", |b| {
        b.iter(|| protect_with_threads(&image, roi, "bench", ppk, 1).expect("protect"))
    });
    bench_restore(
        &mut g,
        "restore_paper",
        &paper,
        RestoreKey::Paper(&paper_keys),
        None,
    );
    g.finish();
}

/// Protect and restore + verify, secure profile, on one thread (the fair
/// ratio to the one-thread SHA-256 pass).
fn secure_one_thread(
    g: &mut BenchmarkGroup<'_, WallTime>,
    image: &Image,
    roi: Rect,
    key: &StudyKey,
    pk: ProtectKey<'_>,
    protected: &Protected,
) {
    g.bench_function("protect_secure_1thread", |b| {
        b.iter(|| protect_with_threads(image, roi, "bench", pk, 1).expect("protect"))
    });
    bench_restore(
        g,
        "restore_secure_1thread",
        protected,
        RestoreKey::Secure(key),
        Some(1),
    );
}

/// Restore + verify of `p` under `key`, on `threads` (None: the default).
fn bench_restore(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    p: &Protected,
    key: RestoreKey<'_>,
    threads: Option<usize>,
) {
    g.bench_function(name, |b| {
        b.iter(|| {
            let (h, s1, s2) = (&p.header, &p.shares[0], &p.shares[1]);
            match threads {
                None => restore(h, s1, s2, key),
                Some(t) => restore_with_threads(h, s1, s2, key, t),
            }
            .expect("restore")
        })
    });
}

/// The same slice with full 16-bit samples (payload 16 bits, planes of 9-bit
/// values: `tessera bench image`'s "16-bit" rows), secure profile, one
/// thread.
fn slice_full_16bit(c: &mut Criterion) {
    let image = head_phantom(512, 512, 1, PixelFormat::GRAY16, 42).expect("phantom");
    let roi = Rect::new(64, 48, 384, 416);
    let bytes = image.to_le_bytes();
    let key = StudyKey::from_bytes([7; 32]);
    let pk = ProtectKey::Secure {
        key: &key,
        salt: [9; 32],
    };
    let protected = protect(&image, roi, "bench", pk).expect("protect");
    let mut g = c.benchmark_group("512x512_16bit");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(20);
    g.bench_function("sha256_baseline", |b| b.iter(|| Sha256::digest(&bytes)));
    secure_one_thread(&mut g, &image, roi, &key, pk, &protected);
    g.finish();
}

/// The stages a secure protect of that slice cannot avoid, each over the
/// same 512x512 16-bit slice: SHA-256 of every 16x16 block (512 bytes
/// each, as the ROI block hashes), and AES-256-GCM of two shares of 7-bit
/// values (224 bytes per tile and share, one seal per tile). The paper
/// profile's chaotic streams: 2 x 262,144 values of each map.
fn stages(c: &mut Criterion) {
    let bytes: Vec<u8> = (0..512 * 512 * 2u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut g = c.benchmark_group("stages_512x512_16bit");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(20);
    g.bench_function("sha256_one_pass", |b| b.iter(|| Sha256::digest(&bytes)));
    g.bench_function("sha256_per_16x16_block", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for block in bytes.chunks_exact(512) {
                acc ^= Sha256::digest(block)[0];
            }
            acc
        })
    });
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[3u8; 32]).expect("key"),
    );
    let mut body = vec![0u8; 224];
    g.bench_function("aes_gcm_2x1024_tiles_of_224_bytes", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for t in 0..2048u64 {
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&t.to_be_bytes());
                let tag = key
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(n),
                        ring::aead::Aad::from([t as u8; 41]),
                        &mut body,
                    )
                    .expect("seal");
                acc ^= tag.as_ref()[0];
            }
            acc
        })
    });
    g.sample_size(10);
    g.bench_function("chaos_streams_2x262144", |b| {
        b.iter(|| {
            let mut plane = vec![0u16; 512 * 512];
            tessera_cryptomark::chaos::diffuse_stream(&mut plane, b"0123456789abcdef", 65536);
            plane[0]
        })
    });
    g.finish();
}

criterion_group!(benches, slice_16bit, slice_full_16bit, stages);
criterion_main!(benches);

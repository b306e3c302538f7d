//! GA-ES on a 512x512 image, and region-wise vs whole-image processing for
//! every operation (compare the two lines of each group).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tessera_image::PixelFormat;
use tessera_image::phantom::head_phantom;
use tessera_segment::{Operation, SegmentConfig, process_regions, process_whole, segment};

fn bench(c: &mut Criterion) {
    let img = head_phantom(512, 512, 1, PixelFormat::GRAY8, 1).expect("phantom");
    let config = SegmentConfig::default();
    c.bench_function("ga_es_512x512", |b| {
        b.iter(|| segment(black_box(&img), &config).expect("segment"))
    });
    let seg = segment(&img, &config).expect("segment");
    for op in Operation::ALL {
        let mut g = c.benchmark_group(format!("process_{op}_512x512"));
        g.sample_size(20);
        g.bench_function("whole", |b| {
            b.iter(|| process_whole(black_box(&img), op).expect("whole"))
        });
        g.bench_function("regions", |b| {
            b.iter(|| process_regions(black_box(&img), &seg.region_map, op).expect("regions"))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

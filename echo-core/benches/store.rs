//! Store insert throughput (20 B, 16 KiB, 1 MiB samples; 1, 2 and 4 producers, one
//! payload per write call, a consumer thread taking every batch) against the
//! machine's plain memcpy bandwidth measured in the same run.
//!
//! `cargo bench -p echo-core --bench store`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use echo_core::store::Store;
use echo_core::Spec;

const SIZES: [(usize, usize, &str); 3] = [
    (20, 4096, "20B"),
    (16 * 1024, 64, "16KiB"),
    (1024 * 1024, 8, "1MiB"),
];

struct Rig {
    store: Store,
    consumed: Arc<AtomicU64>,
    consumer: Option<std::thread::JoinHandle<()>>,
}

impl Rig {
    fn new(size: usize, batch: usize) -> Rig {
        let store = Store::new(Spec::bytes(size as u32).unwrap(), batch, 4).unwrap();
        let consumed = Arc::new(AtomicU64::new(0));
        let consumer = {
            let store = store.clone();
            let consumed = consumed.clone();
            std::thread::spawn(move || {
                while let Some(b) = store.next_batch_blocking() {
                    black_box(b.leaf(0).bytes()[0]);
                    consumed.fetch_add(1, Release);
                }
            })
        };
        Rig {
            store,
            consumed,
            consumer: Some(consumer),
        }
    }

    /// Writes `batches` batches from `producers` threads; returns the elapsed time
    /// until the consumer has taken them all.
    fn run(&self, batches: u64, producers: usize, payload: &Arc<Vec<u8>>) -> Duration {
        let batch = self.store.batch_size() as u64;
        let target = self.consumed.load(Acquire) + batches;
        let per = batches * batch / producers as u64;
        let start = Instant::now();
        let handles: Vec<_> = (0..producers)
            .map(|_| {
                let store = self.store.clone();
                let payload = payload.clone();
                std::thread::spawn(move || {
                    for _ in 0..per {
                        store.write_blocking(&payload).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        while self.consumed.load(Acquire) < target {
            std::thread::yield_now();
        }
        start.elapsed()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.store.close();
        if let Some(c) = self.consumer.take() {
            c.join().unwrap();
        }
    }
}

fn store_insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_insert");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (size, batch, label) in SIZES {
        let rig = Rig::new(size, batch);
        let payload = Arc::new(vec![7u8; size]);
        for producers in [1usize, 2, 4] {
            group.throughput(Throughput::Bytes((size * batch) as u64));
            group.bench_with_input(
                BenchmarkId::new(label, format!("{producers}p")),
                &producers,
                |b, &p| b.iter_custom(|iters| rig.run(iters, p, &payload)),
            );
        }
    }
    group.finish();
}

fn memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (size, batch, label) in SIZES {
        // Copy into a destination as large as the store's ring, slot after slot.
        let slots = batch * 4;
        let src = vec![7u8; size];
        let mut dst = vec![0u8; size * slots];
        let mut slot = 0;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                dst[slot * size..(slot + 1) * size].copy_from_slice(black_box(&src));
                slot = (slot + 1) % slots;
            })
        });
        black_box(&dst);
    }
    group.finish();
}

criterion_group!(benches, memcpy, store_insert);
criterion_main!(benches);

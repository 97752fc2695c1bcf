//! Steady state allocates nothing per sample: after warm-up, pushing samples
//! through a connection's queue into the store and consuming batches performs a
//! number of allocations bounded by the number of batches, not samples.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use echo_core::{Server, Spec};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn push_samples(conn: &mut echo_core::Connection, from: u32, n: u32, per_push: u32) {
    let mut sp = conn.splitter();
    let mut seq = from;
    while seq < from + n {
        for _ in 0..per_push {
            let mut p = [0u8; 64];
            p[..4].copy_from_slice(&seq.to_le_bytes());
            assert_eq!(sp.feed(&p), 64);
            seq += 1;
        }
        let chunk = sp.take(conn.buffer());
        conn.push(chunk).await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn ingress_and_store_allocate_per_batch_not_per_sample() {
    const BATCH: usize = 500;
    let server = Server::builder(Spec::bytes(64).unwrap())
        .batch_size(BATCH)
        .build()
        .unwrap();
    let consumer = {
        let server = server.clone();
        std::thread::spawn(move || {
            let mut next = 0u32;
            while let Some(b) = server.next_batch_blocking() {
                for p in b.leaf(0).bytes().chunks_exact(64) {
                    assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), next);
                    next += 1;
                }
            }
            next
        })
    };
    let ingress = server.ingress();
    let mut conn = ingress.open("test", "alloc-check").unwrap();
    // Warm-up: the connection's buffer pool grows to its bound.
    push_samples(&mut conn, 0, 5_000, 1).await;
    let before = ALLOCS.load(Relaxed);
    let samples = 49_000u32; // a multiple of 7
    push_samples(&mut conn, 5_000, samples, 1).await;
    push_samples(&mut conn, 5_000 + samples, samples, 7).await;
    let allocs = ALLOCS.load(Relaxed) - before;
    let batches = (2 * samples) as u64 / BATCH as u64;
    drop(conn);
    server.shutdown().await.unwrap();
    assert_eq!(consumer.join().unwrap(), 5_000 + 2 * samples);
    // Waiting for a batch may allocate a listener; nothing is allocated per sample.
    assert!(
        allocs <= 4 * batches + 64,
        "{allocs} allocations for {} samples in {batches} batches",
        2 * samples
    );
    eprintln!("{allocs} allocations for {} samples", 2 * samples);
}

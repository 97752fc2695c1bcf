//! A loom model of the store's reserve / commit / wake protocol.
//!
//! `src/store.rs` is compiled a second time here, against loom's atomics and a
//! loom-visible `Event` (a generation counter under a mutex and condvar, which has
//! the semantics the store relies on: a listener registered before a `notify`
//! sees it). Loom then runs each scenario under every interleaving it can reach
//! within its preemption bound, failing on a deadlock (a lost wake-up leaves every
//! thread blocked), on a panic, or when an assertion about the batches fails.
//!
//! The scenarios are tiny (a ring of 2 batches of 1 or 2 samples, 2 or 3 threads)
//! so that the state space is explored completely in seconds; they cover writers
//! waiting for ring space, the consumer waiting for a batch, writes racing a close,
//! the non-blocking `try_write` racing a blocking writer, and an abort racing
//! writers that wait holding reserved slots (without the store ending at a slot
//! given up, the consumer deadlocks there).
//!
//! The preemption bound is 2 (about 30 s for all five in a debug build); loom's
//! `LOOM_MAX_PREEMPTIONS` raises it for a deeper run, e.g. 3, which takes a few
//! minutes: `LOOM_MAX_PREEMPTIONS=3 cargo test --release -p echo-core --test loom_store`.
//! With bound 2 the model finds the lost wake-up that the fences in the store's
//! `closed_after_commit` and `try_take` prevent (remove them and the close
//! scenario deadlocks).

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    missing_debug_implementations
)]

use echo_core::{DType, Leaf, Spec};
pub use echo_core::{Error, Result};

/// What `store.rs` finds at `crate::spec`.
mod spec {
    pub use echo_core::spec::*;
}

/// What `store.rs` finds at `crate::sync`: loom's atomics and a loom `Event`.
mod sync {
    use loom::sync::{Arc, Condvar, Mutex};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use loom::sync::atomic;

    pub struct Event {
        inner: Arc<(Mutex<u64>, Condvar)>,
    }

    impl Event {
        pub fn new() -> Event {
            Event {
                inner: Arc::new((Mutex::new(0), Condvar::new())),
            }
        }

        pub fn listen(&self) -> EventListener {
            let seen = *self.inner.0.lock().unwrap();
            EventListener {
                inner: self.inner.clone(),
                seen,
            }
        }

        pub fn notify(&self, _n: usize) {
            *self.inner.0.lock().unwrap() += 1;
            self.inner.1.notify_all();
        }
    }

    pub struct EventListener {
        inner: Arc<(Mutex<u64>, Condvar)>,
        seen: u64,
    }

    pub trait Listener {
        fn wait(self);
    }

    impl Listener for EventListener {
        fn wait(self) {
            let mut generation = self.inner.0.lock().unwrap();
            while *generation == self.seen {
                generation = self.inner.1.wait(generation).unwrap();
            }
        }
    }

    impl Future for EventListener {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            unreachable!("the loom model drives the store's blocking paths only")
        }
    }
}

#[path = "../src/store.rs"]
mod store;

use store::Store;

fn spec() -> Spec {
    Spec::new(vec![Leaf::new("id", vec![], DType::Uint32)]).unwrap()
}

fn payloads(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn ids(batch: &store::Batch) -> Vec<u32> {
    batch.leaf(0).as_slice::<u32>().unwrap().to_vec()
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

/// Drains `store` on this thread until it is closed and empty; returns every id.
fn drain(store: &Store) -> Vec<u32> {
    let mut got = Vec::new();
    while let Some(batch) = store.next_batch_blocking() {
        got.extend(ids(&batch));
    }
    got
}

/// One writer thread per id, each writing that one sample with `write_blocking`
/// and returning it if it was accepted, `None` if refused with `Shutdown`.
fn spawn_writers(store: &Store, ids: &[u32]) -> Vec<loom::thread::JoinHandle<Option<u32>>> {
    ids.iter()
        .map(|&id| {
            let s = store.clone();
            loom::thread::spawn(move || match s.write_blocking(&payloads(&[id])) {
                Ok(()) => Some(id),
                Err(Error::Shutdown) => None,
                Err(e) => panic!("unexpected error {e}"),
            })
        })
        .collect()
}

#[test]
fn writers_wait_for_ring_space_and_the_consumer_for_batches() {
    // Ring of 2 batches of 1 sample; 3 samples from 2 writers, so one writer
    // always has to wait for the consumer to drop a batch.
    model(|| {
        let store = Store::new(spec(), 1, 2).unwrap();
        let a = {
            let s = store.clone();
            loom::thread::spawn(move || {
                s.write_blocking(&payloads(&[1])).unwrap();
                s.write_blocking(&payloads(&[2])).unwrap();
            })
        };
        let b = {
            let s = store.clone();
            loom::thread::spawn(move || s.write_blocking(&payloads(&[3])).unwrap())
        };
        let mut got = Vec::new();
        for _ in 0..3 {
            let batch = store.next_batch_blocking().expect("a batch");
            assert!(!batch.is_partial());
            got.extend(ids(&batch));
        }
        a.join().unwrap();
        b.join().unwrap();
        let one = got.iter().position(|&i| i == 1).unwrap();
        let two = got.iter().position(|&i| i == 2).unwrap();
        assert!(one < two, "a writer's samples keep their order: {got:?}");
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3], "every sample exactly once");
        assert_eq!(store.counters().notify_count, 3);
    });
}

#[test]
fn one_write_spanning_batches_fills_each_and_wakes_the_consumer_per_batch() {
    // A 3-sample write into batches of 2 reserves across the boundary in two
    // steps; a concurrent 1-sample writer may slot in between.
    model(|| {
        let store = Store::new(spec(), 2, 2).unwrap();
        let a = {
            let s = store.clone();
            loom::thread::spawn(move || s.write_blocking(&payloads(&[1, 2, 3])).unwrap())
        };
        let b = {
            let s = store.clone();
            loom::thread::spawn(move || s.write_blocking(&payloads(&[4])).unwrap())
        };
        let first = store.next_batch_blocking().expect("first batch");
        let second = store.next_batch_blocking().expect("second batch");
        let mut got = ids(&first);
        got.extend(ids(&second));
        drop((first, second));
        a.join().unwrap();
        b.join().unwrap();
        let pos = |x| got.iter().position(|&i| i == x).unwrap();
        assert!(pos(1) < pos(2) && pos(2) < pos(3), "order kept: {got:?}");
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4]);
    });
}

#[test]
fn a_close_racing_writers_loses_nothing_that_was_accepted() {
    // Writers race a close; a write either succeeds (and its sample reaches the
    // consumer, in a full or the final partial batch) or fails with Shutdown (and
    // its sample appears nowhere). The consumer then gets None, never a hang.
    model(|| {
        let store = Store::new(spec(), 2, 2).unwrap();
        let writers = spawn_writers(&store, &[1, 2]);
        let consumer = {
            let s = store.clone();
            loom::thread::spawn(move || drain(&s))
        };
        store.close();
        let mut accepted: Vec<u32> = writers
            .into_iter()
            .filter_map(|w| w.join().unwrap())
            .collect();
        let mut got = consumer.join().unwrap();
        got.sort_unstable();
        accepted.sort_unstable();
        assert_eq!(got, accepted, "delivered exactly the accepted samples");
    });
}

#[test]
fn try_write_racing_a_blocking_writer_never_waits_and_never_overwrites() {
    // Ring of 2 batches of 1 sample, filled by a blocking writer while another
    // thread calls try_write; the consumer takes what was written.
    model(|| {
        let store = Store::new(spec(), 1, 2).unwrap();
        let blocking = {
            let s = store.clone();
            loom::thread::spawn(move || s.write_blocking(&payloads(&[1, 2])).unwrap())
        };
        let trying = {
            let s = store.clone();
            loom::thread::spawn(move || s.try_write(&payloads(&[3])).unwrap())
        };
        let wrote = trying.join().unwrap();
        assert!(
            wrote == 0 || wrote == 4,
            "whole payloads only, got {wrote} bytes"
        );
        let expected = if wrote == 4 { 3 } else { 2 };
        let mut got = Vec::new();
        for _ in 0..expected {
            got.extend(ids(&store.next_batch_blocking().expect("a batch")));
        }
        blocking.join().unwrap();
        store.close();
        assert!(store.next_batch_blocking().is_none());
        got.sort_unstable();
        let mut want = vec![1, 2];
        if wrote == 4 {
            want.push(3);
        }
        assert_eq!(got, want);
    });
}

#[test]
fn an_abort_racing_blocked_writers_and_the_consumer_never_hangs() {
    // Ring of 2 batches of 1 sample, already full; two writers reserve batches
    // 2 and 3 and wait for ring space while the consumer drains and the store
    // is aborted. Each writer either completes (its sample was accepted) or
    // gives up with Shutdown, leaving its slot unfilled; the consumer never
    // waits for such a slot, never gets a batch holding one, and sees the
    // accepted samples in order up to the first one given up.
    model(|| {
        let store = Store::new(spec(), 1, 2).unwrap();
        store.write_blocking(&payloads(&[1, 2])).unwrap();
        let writers = spawn_writers(&store, &[3, 4]);
        let consumer = {
            let s = store.clone();
            loom::thread::spawn(move || drain(&s))
        };
        store.abort();
        let accepted: Vec<Option<u32>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        let got = consumer.join().unwrap();
        // Batches 0 and 1 were committed before anything else happened.
        assert!(got.starts_with(&[1, 2]), "{got:?}");
        for id in &got[2..] {
            assert!(
                accepted.contains(&Some(*id)),
                "{id} was handed out but refused: {got:?}"
            );
        }
        let mut sorted = got.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), got.len(), "a sample twice: {got:?}");
    });
}

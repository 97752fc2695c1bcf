//! Many writer threads, one consumer, millions of slots: every sample arrives in
//! exactly one batch, intact, in per-writer order, with reservations of varying
//! sizes straddling batch boundaries and the ring full most of the time.

use echo_core::store::Store;
use echo_core::{DType, Leaf, Spec};

fn payload(id: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(id as f32).to_le_bytes());
    out.extend_from_slice(&(!id).to_le_bytes());
}

#[test]
fn writers_and_consumer_exactly_once_over_millions_of_slots() {
    const WRITERS: u32 = 8;
    const PER: u32 = 250_000;
    let spec = Spec::new(vec![
        Leaf::new("id", vec![], DType::Uint32),
        Leaf::new("x", vec![], DType::Float32),
        Leaf::new("not", vec![], DType::Uint32),
    ])
    .unwrap();
    let store = Store::new(spec, 256, 3).unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = store.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut i = 0;
                while i < PER {
                    let n = (1 + (i % 37)).min(PER - i);
                    buf.clear();
                    for k in i..i + n {
                        payload(w * PER + k, &mut buf);
                    }
                    s.write_blocking(&buf).unwrap();
                    i += n;
                }
            })
        })
        .collect();
    let closer = {
        let s = store.clone();
        std::thread::spawn(move || {
            for h in writers {
                h.join().unwrap();
            }
            s.close();
        })
    };
    let total = (WRITERS * PER) as usize;
    let mut seen = vec![false; total];
    let mut last = vec![None::<u32>; WRITERS as usize];
    let mut count = 0usize;
    let mut partial = 0;
    while let Some(b) = store.next_batch_blocking() {
        partial += usize::from(b.is_partial());
        let ids = b.leaf(0).as_slice::<u32>().unwrap();
        let xs = b.leaf(1).as_slice::<f32>().unwrap();
        let nots = b.leaf(2).as_slice::<u32>().unwrap();
        for k in 0..b.len() {
            let id = ids[k];
            assert!(
                !std::mem::replace(&mut seen[id as usize], true),
                "duplicate {id}"
            );
            assert_eq!(xs[k], id as f32);
            assert_eq!(nots[k], !id);
            let w = (id / PER) as usize;
            assert!(last[w].is_none_or(|l| l < id), "writer {w} out of order");
            last[w] = Some(id);
        }
        count += b.len();
    }
    closer.join().unwrap();
    assert_eq!(count, total);
    assert!(seen.iter().all(|s| *s));
    assert!(partial <= 1);
    let c = store.counters();
    assert_eq!(c.inserted, total as u64);
    assert!(c.notify_count >= (total / 256) as u64 - 1);
}

//! The store's basic contract: batches contiguous per leaf with typed views, a
//! full ring blocking writers, close handing out the partial remainder, refusals;
//! reservations filled in place, and what an unfilled one does.

use echo_core::store::Store;
use echo_core::Reservation;
use echo_core::{DType, Error, Leaf, Spec};

fn spec() -> Spec {
    Spec::new(vec![
        Leaf::new("id", vec![], DType::Uint32),
        Leaf::new("x", vec![2], DType::Float32),
    ])
    .unwrap()
}

fn payload(id: u32) -> Vec<u8> {
    let mut p = id.to_le_bytes().to_vec();
    p.extend_from_slice(&(id as f32).to_le_bytes());
    p.extend_from_slice(&(-(id as f32)).to_le_bytes());
    p
}

#[test]
fn try_write_fills_free_batches_only_and_never_waits() {
    let s = Store::new(spec(), 4, 2).unwrap();
    let all: Vec<u8> = (0..11).flat_map(payload).collect();
    let ps = spec().payload_size();
    // Two batches fit in the ring; the rest is left for later.
    assert_eq!(s.try_write(&all).unwrap(), 8 * ps);
    assert_eq!(s.try_write(&all[8 * ps..]).unwrap(), 0);
    assert_eq!(s.size(), 8, "nothing reserved beyond what was written");
    let b = s.try_next_batch().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[0, 1, 2, 3]);
    drop(b);
    assert_eq!(s.try_write(&all[8 * ps..]).unwrap(), 3 * ps);
    let b = s.try_next_batch().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[4, 5, 6, 7]);
    drop(b);
    s.close();
    let b = s.try_next_batch().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[8, 9, 10]);
    assert!(matches!(s.try_write(&all[..ps]), Err(Error::Shutdown)));
    assert!(s.try_write(&all[..ps - 1]).is_err(), "not a whole payload");
}

#[test]
fn batches_are_contiguous_per_leaf_with_typed_views() {
    let s = Store::new(spec(), 4, 2).unwrap();
    let all: Vec<u8> = (0..8).flat_map(payload).collect();
    s.write_blocking(&all).unwrap();
    let b = s.try_next_batch().unwrap();
    assert_eq!((b.seq(), b.len(), b.is_partial()), (0, 4, false));
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[0, 1, 2, 3]);
    assert_eq!(b.leaf(1).shape(), vec![4, 2]);
    assert_eq!(
        b.leaf_by_name("x").unwrap().as_slice::<f32>().unwrap(),
        &[0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]
    );
    assert!(b.leaf(1).as_slice::<f64>().is_err());
    let mut out = Vec::new();
    b.copy_sample(2, &mut out);
    assert_eq!(out, payload(2));
    // The second batch is ready too; the ring is now full.
    let b2 = s.try_next_batch().unwrap();
    assert_eq!(b2.leaf(0).as_slice::<u32>().unwrap(), &[4, 5, 6, 7]);
    assert!(s.try_next_batch().is_none());
}

#[test]
fn full_ring_blocks_writers_until_a_batch_is_dropped() {
    let s = Store::new(spec(), 2, 2).unwrap();
    let first: Vec<u8> = (0..4).flat_map(payload).collect();
    s.write_blocking(&first).unwrap();
    let held = s.try_next_batch().unwrap();
    let s2 = s.clone();
    let writer = std::thread::spawn(move || {
        let more: Vec<u8> = (4..6).flat_map(payload).collect();
        s2.write_blocking(&more).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!writer.is_finished(), "writer must wait: the ring is full");
    // The held batch is intact while the writer waits.
    assert_eq!(held.leaf(0).as_slice::<u32>().unwrap(), &[0, 1]);
    drop(held);
    writer.join().unwrap();
    assert_eq!(s.counters().push_blocked, 1);
    let b = s.next_batch_blocking().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[2, 3]);
    drop(b);
    let b = s.next_batch_blocking().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[4, 5]);
}

#[test]
fn close_hands_out_partial_then_none() {
    let s = Store::new(spec(), 4, 3).unwrap();
    let all: Vec<u8> = (0..6).flat_map(payload).collect();
    s.write_blocking(&all).unwrap();
    s.close();
    assert!(matches!(
        s.write_blocking(&payload(9)),
        Err(Error::Shutdown)
    ));
    let b = s.next_batch_blocking().unwrap();
    assert!(!b.is_partial());
    drop(b);
    let b = s.next_batch_blocking().unwrap();
    assert!(b.is_partial());
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[4, 5]);
    drop(b);
    assert!(s.next_batch_blocking().is_none());
}

#[test]
fn wrong_sizes_are_refused() {
    let s = Store::new(spec(), 4, 2).unwrap();
    assert!(matches!(
        s.write_blocking(&[0; 13]),
        Err(Error::PayloadSize {
            expected: 12,
            got: 13
        })
    ));
    assert!(Store::new(spec(), 0, 2).is_err());
    assert!(Store::new(spec(), 4, 1).is_err());
    assert!(Store::new(Spec::bytes(u32::MAX).unwrap(), usize::MAX / 2, 4).is_err());
}

/// Fills a reservation the way a vectored socket read would: the payloads'
/// wire bytes, scattered over the regions in order.
fn fill_wire(res: &mut Reservation<'_>, wire: &[u8]) {
    let mut at = 0;
    for region in res.regions() {
        region.copy_from_slice(&wire[at..at + region.len()]);
        at += region.len();
    }
    assert_eq!(
        at,
        wire.len(),
        "regions cover exactly the reserved payloads"
    );
}

#[test]
fn reservations_are_filled_in_place_in_wire_order() {
    let s = Store::new(spec(), 4, 2).unwrap();
    let ps = spec().payload_size();
    s.write_blocking(&payload(0)).unwrap();
    // Stops at the batch boundary: 3 of the 5 asked for.
    let mut res = s.try_reserve(5).unwrap().unwrap();
    assert_eq!(res.len(), 3);
    let lens: Vec<usize> = res.regions().map(|r| r.len()).collect();
    assert_eq!(lens, [4, 8, 4, 8, 4, 8], "payload by payload, leaf by leaf");
    let wire: Vec<u8> = (1..4).flat_map(payload).collect();
    fill_wire(&mut res, &wire);
    assert!(s.try_next_batch().is_none(), "not committed yet");
    res.commit();
    let b = s.try_next_batch().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[0, 1, 2, 3]);
    assert_eq!(
        b.leaf(1).as_slice::<f32>().unwrap(),
        &[0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]
    );
    drop(b);
    assert_eq!(s.counters().inserted, 4);
    // One leaf: the reserved slots are one region.
    let one = Store::new(Spec::bytes(ps as u32).unwrap(), 4, 2).unwrap();
    let mut res = one.try_reserve(3).unwrap().unwrap();
    assert_eq!(res.regions().map(|r| r.len()).collect::<Vec<_>>(), [3 * ps]);
    fill_wire(&mut res, &wire);
    res.commit();
    one.close();
    assert_eq!(one.try_next_batch().unwrap().leaf(0).bytes(), &wire[..]);
}

#[test]
fn try_reserve_never_waits_for_a_full_ring() {
    let s = Store::new(spec(), 2, 2).unwrap();
    let all: Vec<u8> = (0..4).flat_map(payload).collect();
    s.write_blocking(&all).unwrap();
    assert!(s.try_reserve(1).unwrap().is_none(), "the ring is full");
    assert_eq!(s.size(), 4, "nothing was reserved");
    drop(s.try_next_batch().unwrap());
    let mut res = s.try_reserve(1).unwrap().unwrap();
    fill_wire(&mut res, &payload(4));
    res.commit();
    s.close();
    assert!(matches!(s.try_reserve(1), Err(Error::Shutdown)));
}

#[test]
fn an_unfilled_reservation_ends_the_store_before_its_batch() {
    let s = Store::new(spec(), 2, 3).unwrap();
    s.write_blocking(&[payload(0), payload(1)].concat())
        .unwrap();
    let res = s.try_reserve(1).unwrap().unwrap();
    // Another writer completes the batch around the hole.
    s.write_blocking(&payload(3)).unwrap();
    assert!(!s.is_broken());
    drop(res);
    assert!(s.is_broken() && s.is_closed());
    // Everything before the hole's batch is still handed out; then nothing,
    // rather than a batch with an unfilled slot or a wait for it.
    let b = s.next_batch_blocking().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[0, 1]);
    drop(b);
    assert!(s.next_batch_blocking().is_none());
    assert!(matches!(
        s.write_blocking(&payload(5)),
        Err(Error::Shutdown)
    ));
}

#[test]
fn writers_waiting_behind_a_broken_batch_give_up() {
    // One sample per batch, two ring slots. Batch 0 is held by the consumer,
    // batch 1 is the hole; writer A waits for batch 2 (slot of batch 0),
    // writer B for batch 3 (slot of batch 1, which is never consumed).
    let s = Store::new(spec(), 1, 2).unwrap();
    s.write_blocking(&payload(0)).unwrap();
    let held = s.try_next_batch().unwrap();
    let res = s.try_reserve(1).unwrap().unwrap();
    let writer = |p: Vec<u8>| {
        let s = s.clone();
        std::thread::spawn(move || s.write_blocking(&p))
    };
    let a = writer(payload(2));
    while s.size() < 2 {
        std::thread::yield_now();
    }
    let b = writer(payload(3));
    while s.size() < 3 {
        std::thread::yield_now();
    }
    drop(res);
    assert!(matches!(b.join().unwrap(), Err(Error::Shutdown)));
    assert!(!a.is_finished(), "batch 0's slot is still held");
    drop(held);
    // A's slot came free, so its write completes; nothing after the hole is
    // handed out.
    a.join().unwrap().unwrap();
    assert!(s.next_batch_blocking().is_none());
}

#[test]
fn a_write_dropped_while_waiting_for_space_leaves_nothing_behind() {
    use futures::FutureExt;
    // Two batches of two, both full: a third write waits for ring space.
    // Dropped there (a cancelled `submit`), it must not leave slots reserved
    // that nothing will fill (the consumer would wait for them forever) nor
    // end the store (taking other writers' samples with it).
    let s = Store::new(spec(), 2, 2).unwrap();
    s.write_blocking(&[payload(0), payload(1), payload(2), payload(3)].concat())
        .unwrap();
    assert!(s.write(&payload(99)).now_or_never().is_none(), "it waited");
    assert!(!s.is_broken() && !s.is_closed());
    assert_eq!(s.size(), 4, "the dropped write reserved a slot");
    let b = s.next_batch_blocking().unwrap();
    assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[0, 1]);
    drop(b);
    // The store goes on: later writes fill batch 2 as usual.
    s.write_blocking(&[payload(4), payload(5)].concat())
        .unwrap();
    for want in [[2, 3], [4, 5]] {
        let b = s.next_batch_blocking().unwrap();
        assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &want);
    }
}

#[test]
fn an_async_write_waits_for_space_and_counts_as_blocked_once() {
    let s = Store::new(spec(), 1, 2).unwrap();
    s.write_blocking(&[payload(0), payload(1)].concat())
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let consumer = {
        let s = s.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            (0..4)
                .map(|_| {
                    s.next_batch_blocking()
                        .unwrap()
                        .leaf(0)
                        .as_slice::<u32>()
                        .unwrap()[0]
                })
                .collect::<Vec<_>>()
        })
    };
    rt.block_on(s.write(&[payload(2), payload(3)].concat()))
        .unwrap();
    assert_eq!(consumer.join().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(s.counters().push_blocked, 1);
}

#[test]
fn an_abort_lets_waiting_writers_go_and_ends_the_store_before_their_batch() {
    let s = Store::new(spec(), 1, 2).unwrap();
    s.write_blocking(&[payload(0), payload(1)].concat())
        .unwrap();
    let waiting = {
        let s = s.clone();
        std::thread::spawn(move || s.write_blocking(&payload(2)))
    };
    while s.size() < 3 {
        std::thread::yield_now();
    }
    s.abort();
    assert!(matches!(waiting.join().unwrap(), Err(Error::Shutdown)));
    for want in [0, 1] {
        let b = s.next_batch_blocking().unwrap();
        assert_eq!(b.leaf(0).as_slice::<u32>().unwrap(), &[want]);
    }
    assert!(
        s.next_batch_blocking().is_none(),
        "waited for the abandoned slot"
    );
}

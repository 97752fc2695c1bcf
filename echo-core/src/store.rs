//! The batching store: one pre-allocated buffer per leaf, `num_buffers x batch_size`
//! slots, so that every batch is contiguous per leaf.
//!
//! Writers reserve slots with a CAS (never across a batch boundary), wait until
//! the ring slot of that batch is free, copy, and commit. The writer whose commit
//! completes a batch wakes the consumer: once per full batch. The consumer takes
//! batches in order as [`Batch`] guards; dropping a guard hands its slots back to
//! the writers. When the ring is full writers wait: nothing is overwritten or dropped.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::spec::{DType, Spec};
// Atomics and wake-ups come through `crate::sync` so that the loom model
// (echo-core/tests/loom_store.rs) can compile this file against loom's.
use crate::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use crate::sync::{Event, EventListener, Listener};
use crate::{Error, Result};

const CLOSED: u64 = 1 << 63;
const ALIGN: usize = 64;

struct LeafBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain bytes; concurrent access is coordinated by the
// reserve/commit/release protocol below (writers touch only slots they reserved
// and that are free; readers only slots of a committed batch they hold).
unsafe impl Send for LeafBuf {}
// SAFETY: see above.
unsafe impl Sync for LeafBuf {}

impl LeafBuf {
    fn new(len: usize) -> Result<LeafBuf> {
        let layout = Layout::from_size_align(len, ALIGN)
            .map_err(|_| Error::Config(format!("store buffer of {len} bytes is too large")))?;
        // SAFETY: len > 0 (specs have no zero-byte leaves, batch_size and num_buffers >= 1).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            Error::Config(format!("could not allocate a store buffer of {len} bytes"))
        })?;
        Ok(LeafBuf { ptr, len })
    }
}

impl Drop for LeafBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        }
    }
}

struct BatchSlot {
    /// Samples committed into this ring slot for its current batch.
    committed: AtomicUsize,
    /// The batch sequence number allowed to write here (`seq % num_buffers == index`).
    free_for: AtomicU64,
}

struct Inner {
    spec: Spec,
    batch_size: usize,
    num_buffers: usize,
    leaves: Vec<LeafBuf>,
    /// Next slot sequence number to reserve; the high bit marks the store closed.
    next: AtomicU64,
    /// Next batch sequence number the consumer takes.
    consumed: AtomicU64,
    slots: Vec<BatchSlot>,
    aborted: AtomicBool,
    /// The first batch that can never complete (a [`Reservation`] dropped without
    /// commit); `u64::MAX` while there is none.
    broken_at: AtomicU64,
    space: Event,
    ready: Event,
    inserted: AtomicU64,
    push_blocked: AtomicU64,
    notify_count: AtomicU64,
}

/// The pre-allocated batching store. Cheap to clone (shared).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("batch_size", &self.inner.batch_size)
            .field("num_buffers", &self.inner.num_buffers)
            .field("size", &self.size())
            .finish()
    }
}

/// Counters kept by the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Samples reserved and not yet handed to the consumer.
    pub size: u64,
    /// Samples committed.
    pub inserted: u64,
    /// Waits for ring space.
    pub push_blocked: u64,
    /// Consumer wake-ups for a full batch.
    pub notify_count: u64,
    /// Batches handed out.
    pub batches: u64,
}

impl Store {
    /// Allocates `num_buffers x batch_size` slots per leaf.
    pub fn new(spec: Spec, batch_size: usize, num_buffers: usize) -> Result<Store> {
        if batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1, got 0".into()));
        }
        if num_buffers < 2 {
            return Err(Error::Config(format!(
                "num_buffers must be at least 2, got {num_buffers}"
            )));
        }
        let slots = batch_size
            .checked_mul(num_buffers)
            .filter(|s| (*s as u64) < CLOSED / 4)
            .ok_or_else(|| {
                Error::Config(format!(
                    "batch_size {batch_size} x num_buffers {num_buffers} overflows"
                ))
            })?;
        let leaves = (0..spec.leaves().len())
            .map(|i| {
                let len = spec.leaf_bytes(i).checked_mul(slots).ok_or_else(|| {
                    Error::Config(format!(
                        "store for leaf `{}` ({} bytes x {slots} slots) overflows",
                        spec.leaves()[i].name,
                        spec.leaf_bytes(i)
                    ))
                })?;
                LeafBuf::new(len)
            })
            .collect::<Result<Vec<_>>>()?;
        let slots = (0..num_buffers)
            .map(|i| BatchSlot {
                committed: AtomicUsize::new(0),
                free_for: AtomicU64::new(i as u64),
            })
            .collect();
        Ok(Store {
            inner: Arc::new(Inner {
                spec,
                batch_size,
                num_buffers,
                leaves,
                next: AtomicU64::new(0),
                consumed: AtomicU64::new(0),
                slots,
                aborted: AtomicBool::new(false),
                broken_at: AtomicU64::new(u64::MAX),
                space: Event::new(),
                ready: Event::new(),
                inserted: AtomicU64::new(0),
                push_blocked: AtomicU64::new(0),
                notify_count: AtomicU64::new(0),
            }),
        })
    }

    /// The spec.
    pub fn spec(&self) -> &Spec {
        &self.inner.spec
    }

    /// Samples per batch.
    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }

    /// Batches in the ring.
    pub fn num_buffers(&self) -> usize {
        self.inner.num_buffers
    }

    /// Samples reserved and not yet handed to the consumer.
    pub fn size(&self) -> u64 {
        let next = self.inner.next.load(Acquire) & !CLOSED;
        let consumed = self.inner.consumed.load(Acquire) * self.inner.batch_size as u64;
        next.saturating_sub(consumed)
    }

    /// The store's counters.
    pub fn counters(&self) -> StoreCounters {
        StoreCounters {
            size: self.size(),
            inserted: self.inner.inserted.load(Relaxed),
            push_blocked: self.inner.push_blocked.load(Relaxed),
            notify_count: self.inner.notify_count.load(Relaxed),
            batches: self.inner.consumed.load(Relaxed),
        }
    }

    /// Writes whole payloads (back to back) from async code, waiting for ring space.
    pub async fn write(&self, payloads: &[u8]) -> Result<()> {
        // Never holds a reservation across an await: only slots of a batch
        // whose ring slot is free now are reserved, and filled at once. So a
        // write whose future is dropped while it waits (a cancelled
        // `Server::submit`) leaves nothing half-reserved behind; the payloads
        // it had written are in, the rest are not.
        let mut rest = self.check_len(payloads)?;
        let mut blocked = false;
        loop {
            let n = self.try_write(rest)?;
            rest = &rest[n..];
            if rest.is_empty() {
                return Ok(());
            }
            if n == 0 {
                self.wait_for_room(&mut blocked).await?;
            }
        }
    }

    /// Writes whole payloads (back to back) from a plain thread, blocking for ring space.
    pub fn write_blocking(&self, payloads: &[u8]) -> Result<()> {
        let mut rest = self.check_len(payloads)?;
        while !rest.is_empty() {
            let (start, n) = self
                .inner
                .reserve(rest.len() / self.inner.spec.payload_size())?;
            // Reserved, then waiting for ring space: if the store is aborted
            // meanwhile, nothing will fill these slots.
            let unfilled = Unfilled::new(&self.inner, start);
            let batch = start / self.inner.batch_size as u64;
            let mut blocked = false;
            while let Some(l) = self
                .inner
                .listen_unless(|| self.inner.is_free(batch), &mut blocked)?
            {
                l.wait();
            }
            rest = self.inner.fill(start, n, rest);
            unfilled.filled();
        }
        Ok(())
    }

    /// Writes whole payloads from the front of `payloads`, in order, as long as
    /// their batch's ring slot is free, without ever waiting; returns how many bytes
    /// were written (a multiple of the payload size, maybe 0). For async writers
    /// that copy inline when the ring has room and queue the rest.
    pub fn try_write(&self, payloads: &[u8]) -> Result<usize> {
        let mut rest = self.check_len(payloads)?;
        let ps = self.inner.spec.payload_size();
        while !rest.is_empty() {
            let Some((start, n)) = self.inner.try_reserve(rest.len() / ps)? else {
                break;
            };
            rest = self.inner.fill(start, n, rest);
        }
        Ok(payloads.len() - rest.len())
    }

    /// Reserves up to `want` slots (fewer at a batch boundary) of the batch being
    /// filled, only if its ring slot is free now: never waits. The caller fills
    /// them in place (for example by reading a socket straight into them) and
    /// [`commit`](Reservation::commit)s. `None` when the ring has no room now.
    ///
    /// The reservation holds up its batch until committed: fill it without
    /// waiting on anything outside the caller's control.
    pub fn try_reserve(&self, want: usize) -> Result<Option<Reservation<'_>>> {
        if want == 0 {
            return Ok(None);
        }
        Ok(self.inner.try_reserve(want)?.map(|(start, n)| Reservation {
            inner: &self.inner,
            start,
            n,
            committed: false,
        }))
    }

    /// Waits until the batch being filled has its ring slot free, so that
    /// [`try_reserve`](Self::try_reserve) can succeed (unless another writer
    /// fills that batch first). `Err(Shutdown)` once the store is closed.
    pub async fn room(&self) -> Result<()> {
        self.wait_for_room(&mut false).await
    }

    /// [`room`](Self::room), counting the writer as blocked only if `blocked`
    /// is still false (one count per write, however many times it waits).
    async fn wait_for_room(&self, blocked: &mut bool) -> Result<()> {
        let bs = self.inner.batch_size as u64;
        let free = || -> Result<bool> {
            let next = self.inner.next.load(Acquire);
            if next & CLOSED != 0 {
                return Err(Error::Shutdown);
            }
            self.inner.is_free(next / bs)
        };
        while let Some(l) = self.inner.listen_unless(free, blocked)? {
            l.await;
        }
        Ok(())
    }

    /// True once reserved slots were given up unfilled (a dropped
    /// [`Reservation`], or a blocking write let go by [`abort`](Self::abort)):
    /// the store then ends before the batch holding them.
    pub fn is_broken(&self) -> bool {
        self.inner.broken_at.load(Acquire) != u64::MAX
    }

    fn check_len<'a>(&self, payloads: &'a [u8]) -> Result<&'a [u8]> {
        let ps = self.inner.spec.payload_size();
        if payloads.is_empty() || payloads.len() % ps != 0 {
            return Err(Error::PayloadSize {
                expected: ps,
                got: payloads.len(),
            });
        }
        Ok(payloads)
    }

    /// Takes the next batch, waiting for it; `None` once the store is closed and empty.
    pub async fn next_batch(&self) -> Option<Batch> {
        loop {
            match self.inner.try_take() {
                Take::Batch(b) => return Some(self.batch(b)),
                Take::Done => return None,
                Take::Wait => {}
            }
            let listener = self.inner.ready.listen();
            match self.inner.try_take() {
                Take::Batch(b) => return Some(self.batch(b)),
                Take::Done => return None,
                Take::Wait => listener.await,
            }
        }
    }

    /// Takes the next batch from a plain thread, blocking; `None` once closed and empty.
    pub fn next_batch_blocking(&self) -> Option<Batch> {
        loop {
            match self.inner.try_take() {
                Take::Batch(b) => return Some(self.batch(b)),
                Take::Done => return None,
                Take::Wait => {}
            }
            let listener = self.inner.ready.listen();
            match self.inner.try_take() {
                Take::Batch(b) => return Some(self.batch(b)),
                Take::Done => return None,
                Take::Wait => listener.wait(),
            }
        }
    }

    /// Takes the next batch if it is ready, without waiting.
    pub fn try_next_batch(&self) -> Option<Batch> {
        match self.inner.try_take() {
            Take::Batch(b) => Some(self.batch(b)),
            _ => None,
        }
    }

    fn batch(&self, (seq, len): (u64, usize)) -> Batch {
        Batch {
            store: self.inner.clone(),
            seq,
            len,
        }
    }

    /// Refuses new writes. Writes already reserved still complete; the consumer then
    /// gets every full batch, the remainder as a partial batch, then `None`.
    pub fn close(&self) {
        self.inner.close();
    }

    /// Closes and makes writers still waiting for ring space give up with an error
    /// (used when the consumer is gone for good).
    pub fn abort(&self) {
        self.inner.aborted.store(true, Release);
        self.close();
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.next.load(Acquire) & CLOSED != 0
    }
}

enum Take {
    Batch((u64, usize)),
    Wait,
    Done,
}

impl Inner {
    fn reserve(&self, want: usize) -> Result<(u64, usize)> {
        let bs = self.batch_size as u64;
        let mut cur = self.next.load(Relaxed);
        loop {
            if cur & CLOSED != 0 {
                return Err(Error::Shutdown);
            }
            let boundary = (cur / bs + 1) * bs;
            let n = (want as u64).min(boundary - cur);
            match self
                .next
                .compare_exchange_weak(cur, cur + n, AcqRel, Relaxed)
            {
                Ok(_) => return Ok((cur, n as usize)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Like [`reserve`](Self::reserve), but only slots of a batch whose ring slot is
    /// free now (`None` otherwise). A free ring slot stays free until its batch has
    /// been filled and consumed, which needs this reservation's commit.
    fn try_reserve(&self, want: usize) -> Result<Option<(u64, usize)>> {
        let bs = self.batch_size as u64;
        let mut cur = self.next.load(Acquire);
        loop {
            if cur & CLOSED != 0 {
                return Err(Error::Shutdown);
            }
            let batch = cur / bs;
            if !self.is_free(batch)? {
                return Ok(None);
            }
            let n = (want as u64).min((batch + 1) * bs - cur);
            match self
                .next
                .compare_exchange_weak(cur, cur + n, AcqRel, Acquire)
            {
                Ok(_) => return Ok(Some((cur, n as usize))),
                Err(actual) => cur = actual,
            }
        }
    }

    /// `None` once `free` holds; until then a listener for ring space to wait
    /// on before asking again (taken between two checks, so no hand-back in
    /// between is missed), counting the writer as blocked the first time.
    fn listen_unless(
        &self,
        free: impl Fn() -> Result<bool>,
        blocked: &mut bool,
    ) -> Result<Option<EventListener>> {
        if free()? {
            return Ok(None);
        }
        let listener = self.space.listen();
        if free()? {
            return Ok(None);
        }
        if !*blocked {
            *blocked = true;
            self.push_blocked.fetch_add(1, Relaxed);
        }
        Ok(Some(listener))
    }

    fn is_free(&self, batch: u64) -> Result<bool> {
        let slot = &self.slots[(batch % self.num_buffers as u64) as usize];
        if slot.free_for.load(Acquire) == batch {
            return Ok(true);
        }
        // Batches from `broken_at` on are never consumed, so the ring slot a batch
        // `num_buffers` later waits for is never handed back.
        let broken = self.broken_at.load(Acquire);
        if self.aborted.load(Acquire) || batch >= broken.saturating_add(self.num_buffers as u64) {
            return Err(Error::Shutdown);
        }
        Ok(false)
    }

    /// Copies `n` payloads from the front of `src` into reserved slots starting at
    /// `start` (whose ring slot is free), commits them, returns the rest of `src`.
    fn fill<'a>(&self, start: u64, n: usize, src: &'a [u8]) -> &'a [u8] {
        let ps = self.spec.payload_size();
        let ring_slot = (start % (self.batch_size * self.num_buffers) as u64) as usize;
        for (i, leaf) in self.leaves.iter().enumerate() {
            let lb = self.spec.leaf_bytes(i);
            let off = self.spec.leaf_offset(i);
            // SAFETY: slots [ring_slot, ring_slot + n) lie inside one batch of the ring
            // (reserve never crosses a batch boundary), so the range is in bounds; they
            // were reserved by this writer alone and their batch is free (no guard holds it).
            let dst = unsafe { leaf.ptr.as_ptr().add(ring_slot * lb) };
            if self.leaves.len() == 1 {
                // SAFETY: as above; n * lb == n * ps bytes, src holds at least that many.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n * ps) };
            } else {
                for k in 0..n {
                    let s = &src[k * ps + off..k * ps + off + lb];
                    // SAFETY: as above, slot k of the reserved range.
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), dst.add(k * lb), lb) };
                }
            }
        }
        self.commit(start, n);
        &src[n * ps..]
    }

    /// Marks `n` slots from `start`, filled by their writer, as committed.
    fn commit(&self, start: u64, n: usize) {
        self.inserted.fetch_add(n as u64, Relaxed);
        let batch = start / self.batch_size as u64;
        let slot = &self.slots[(batch % self.num_buffers as u64) as usize];
        let done = slot.committed.fetch_add(n, AcqRel) + n;
        if done == self.batch_size {
            self.notify_count.fetch_add(1, Relaxed);
            self.ready.notify(usize::MAX);
        } else if self.closed_after_commit() {
            // A partial last batch may now be complete.
            self.ready.notify(usize::MAX);
        }
    }

    /// Gives up on the batch holding slot `start`: it can never be completed
    /// (a reserved slot was not filled). The consumer gets every batch before it,
    /// then `None`; writers are refused from now on.
    fn break_at(&self, start: u64) {
        self.broken_at
            .fetch_min(start / self.batch_size as u64, AcqRel);
        self.close();
    }

    fn close(&self) {
        self.next.fetch_or(CLOSED, AcqRel);
        self.ready.notify(usize::MAX);
        self.space.notify(usize::MAX);
    }

    /// Whether the store is closed, read after this writer's commit. The fence
    /// pairs with the one in `try_take`: without the two, a writer could read `next`
    /// from before a close while the consumer, having seen the close, reads
    /// `committed` from before the writer's commit, and neither would wake the
    /// consumer for the partial last batch (a lost wake-up the loom model in
    /// tests/loom_store.rs found).
    fn closed_after_commit(&self) -> bool {
        fence(SeqCst);
        self.next.load(Acquire) & CLOSED != 0
    }

    fn try_take(&self) -> Take {
        let bs = self.batch_size as u64;
        loop {
            let seq = self.consumed.load(Acquire);
            if seq >= self.broken_at.load(Acquire) {
                return Take::Done;
            }
            let next = self.next.load(Acquire);
            let target = if next & CLOSED != 0 {
                // Pairs with the fence in `fill`.
                fence(SeqCst);
                let end = next & !CLOSED;
                let n = end.saturating_sub(seq * bs).min(bs);
                if n == 0 {
                    return Take::Done;
                }
                n as usize
            } else {
                self.batch_size
            };
            let slot = &self.slots[(seq % self.num_buffers as u64) as usize];
            if slot.free_for.load(Acquire) != seq || slot.committed.load(Acquire) != target {
                return Take::Wait;
            }
            if self
                .consumed
                .compare_exchange(seq, seq + 1, AcqRel, Acquire)
                .is_ok()
            {
                return Take::Batch((seq, target));
            }
        }
    }

    fn release(&self, seq: u64) {
        let slot = &self.slots[(seq % self.num_buffers as u64) as usize];
        slot.committed.store(0, Relaxed);
        slot.free_for.store(seq + self.num_buffers as u64, Release);
        self.space.notify(usize::MAX);
        // A consumer waiting for the batch that reuses this slot may be able to go on.
        self.ready.notify(usize::MAX);
    }
}

/// Slots a blocking write reserved and has not filled yet. If the write gives
/// up before filling them (the store was aborted, or broken earlier, while it
/// waited for ring space), nothing else ever will: the store then ends at
/// their batch, as for a dropped [`Reservation`], instead of leaving the
/// consumer waiting for it. (The async [`Store::write`] never waits holding
/// a reservation.)
struct Unfilled<'a> {
    inner: &'a Inner,
    start: u64,
}

impl<'a> Unfilled<'a> {
    fn new(inner: &'a Inner, start: u64) -> Self {
        Unfilled { inner, start }
    }

    /// The slots are filled and committed.
    fn filled(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unfilled<'_> {
    fn drop(&mut self) {
        self.inner.break_at(self.start);
    }
}

/// Slots reserved by [`Store::try_reserve`], to be filled in place and committed.
///
/// Their batch's ring slot is free, so they can be written at once. Dropping a
/// reservation without [`commit`](Self::commit) leaves slots that nothing will
/// ever fill: rather than hand out a batch with garbage in it, or wait for it
/// forever, the store then ends (is closed, and the consumer gets every batch
/// before that one, then `None`).
pub struct Reservation<'a> {
    inner: &'a Inner,
    start: u64,
    n: usize,
    committed: bool,
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("start", &self.start)
            .field("len", &self.n)
            .finish()
    }
}

impl<'a> Reservation<'a> {
    /// Payloads reserved (at least 1).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Never true: a reservation holds at least one slot.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The reserved memory as the payloads' bytes appear on the wire: for each
    /// payload in turn, its part of each leaf in leaf order (with a single leaf,
    /// one region for all payloads). Ready for a vectored read.
    pub fn regions(&mut self) -> Regions<'_> {
        let ring_slot =
            (self.start % (self.inner.batch_size * self.inner.num_buffers) as u64) as usize;
        Regions {
            inner: self.inner,
            ring_slot,
            n: self.n,
            next: 0,
            _slots: std::marker::PhantomData,
        }
    }

    /// Hands the filled slots to their batch.
    pub fn commit(mut self) {
        self.committed = true;
        self.inner.commit(self.start, self.n);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            tracing::error!(
                "store: {} reserved slot(s) from {} were never filled; \
                 the store ends before their batch",
                self.n,
                self.start
            );
            self.inner.break_at(self.start);
        }
    }
}

/// The regions of a [`Reservation`], in wire order (see [`Reservation::regions`]).
pub struct Regions<'r> {
    inner: &'r Inner,
    ring_slot: usize,
    n: usize,
    /// Next region: payload `next / leaves`, leaf `next % leaves`.
    next: usize,
    _slots: std::marker::PhantomData<&'r mut [u8]>,
}

impl std::fmt::Debug for Regions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regions").field("next", &self.next).finish()
    }
}

impl<'r> Iterator for Regions<'r> {
    type Item = &'r mut [u8];

    fn next(&mut self) -> Option<&'r mut [u8]> {
        let leaves = self.inner.leaves.len();
        // With one leaf, consecutive slots are one contiguous region.
        let (k, i, count) = if leaves == 1 {
            (0, 0, self.n)
        } else {
            (self.next / leaves, self.next % leaves, 1)
        };
        let total = if leaves == 1 { 1 } else { self.n * leaves };
        if self.next >= total {
            return None;
        }
        self.next += 1;
        let lb = self.inner.spec.leaf_bytes(i);
        // SAFETY: slots [ring_slot, ring_slot + n) lie inside one batch of the ring
        // (reservations never cross a batch boundary), were reserved by the
        // `Reservation` this iterator mutably borrows, and their batch is free (no
        // guard reads it). Each (payload, leaf) region is yielded once, so the
        // slices never overlap.
        Some(unsafe {
            std::slice::from_raw_parts_mut(
                self.inner.leaves[i]
                    .ptr
                    .as_ptr()
                    .add((self.ring_slot + k) * lb),
                count * lb,
            )
        })
    }
}

/// A batch handed to the consumer: per-leaf contiguous slices of `len` samples.
///
/// Its slots are the consumer's until the guard is dropped; writers cannot touch
/// them meanwhile.
pub struct Batch {
    store: Arc<Inner>,
    seq: u64,
    len: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("seq", &self.seq)
            .field("len", &self.len)
            .field("partial", &self.is_partial())
            .finish()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.store.release(self.seq);
    }
}

impl Batch {
    /// The batch's sequence number (0, 1, 2, ...).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Samples in the batch: `batch_size`, or fewer for the last batch after shutdown.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a batch holds at least one sample.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True for the final, short batch handed out after a graceful shutdown.
    pub fn is_partial(&self) -> bool {
        self.len < self.store.batch_size
    }

    /// The spec.
    pub fn spec(&self) -> &Spec {
        &self.store.spec
    }

    /// The leaves, in wire order.
    pub fn leaves(&self) -> impl Iterator<Item = LeafView<'_>> + '_ {
        (0..self.store.leaves.len()).map(move |i| self.leaf(i))
    }

    /// Leaf `i` (panics if `i` is out of range, like slice indexing).
    pub fn leaf(&self, i: usize) -> LeafView<'_> {
        let spec = &self.store.spec;
        let lb = spec.leaf_bytes(i);
        let first = (self.seq % self.store.num_buffers as u64) as usize * self.store.batch_size;
        // SAFETY: the batch's slots are committed and held by this guard; no writer
        // touches them until it drops. The range lies inside the leaf buffer.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.store.leaves[i].ptr.as_ptr().add(first * lb),
                self.len * lb,
            )
        };
        LeafView {
            leaf: &spec.leaves()[i],
            batch: self.len,
            bytes,
        }
    }

    /// The leaf with this name.
    pub fn leaf_by_name(&self, name: &str) -> Option<LeafView<'_>> {
        let i = self
            .store
            .spec
            .leaves()
            .iter()
            .position(|l| l.name == name)?;
        Some(self.leaf(i))
    }

    /// Reassembles sample `k` as it was on the wire into `out` (cleared first).
    pub fn copy_sample(&self, k: usize, out: &mut Vec<u8>) {
        out.clear();
        for leaf in self.leaves() {
            let lb = leaf.bytes.len() / self.len.max(1);
            out.extend_from_slice(&leaf.bytes[k * lb..(k + 1) * lb]);
        }
    }
}

/// One leaf of a batch: `batch` samples of the leaf's shape, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct LeafView<'a> {
    leaf: &'a crate::spec::Leaf,
    batch: usize,
    bytes: &'a [u8],
}

impl<'a> LeafView<'a> {
    /// The leaf's name.
    pub fn name(&self) -> &'a str {
        &self.leaf.name
    }

    /// The leaf's dtype.
    pub fn dtype(&self) -> DType {
        self.leaf.dtype
    }

    /// `(batch, *leaf_shape)`.
    pub fn shape(&self) -> Vec<usize> {
        std::iter::once(self.batch)
            .chain(self.leaf.shape.iter().map(|&d| d as usize))
            .collect()
    }

    /// The raw bytes, C order.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The elements as `T`, checking that `T` is this leaf's dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        if T::DTYPE != self.leaf.dtype {
            return Err(Error::Other(format!(
                "leaf `{}` is {}, not {}",
                self.leaf.name,
                self.leaf.dtype,
                T::DTYPE
            )));
        }
        let ptr = self.bytes.as_ptr();
        if (ptr as usize) % std::mem::align_of::<T>() != 0 {
            return Err(Error::Other(format!(
                "leaf `{}` is misaligned",
                self.leaf.name
            )));
        }
        // SAFETY: T is a plain numeric type with no invalid bit patterns, the pointer is
        // aligned (checked) and the length is a whole number of elements (itemsize == size_of T).
        Ok(unsafe {
            std::slice::from_raw_parts(ptr.cast::<T>(), self.bytes.len() / std::mem::size_of::<T>())
        })
    }
}

/// A Rust type that can view a leaf's bytes: plain numbers with no invalid bit patterns.
pub trait Element: Copy + private::Sealed + 'static {
    /// The matching numpy dtype.
    const DTYPE: DType;
}

mod private {
    pub trait Sealed {}
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl private::Sealed for $t {}
        impl Element for $t { const DTYPE: DType = DType::$d; }
    )*};
}

element!(
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64,
    f32 => Float32, f64 => Float64, [f32; 2] => Complex64, [f64; 2] => Complex128,
);

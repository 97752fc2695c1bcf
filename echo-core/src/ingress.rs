//! Ingress: one bounded queue per connection and a small pool of drainer threads
//! that move queued payloads into the store.
//!
//! A transport opens a [`Connection`] per peer, fills receive buffers taken from
//! the connection's pool (see [`crate::wire::PayloadSplitter`]) and pushes whole
//! payloads; a payload is acknowledged to the peer once `push` returns. Drainers
//! take one chunk per connection per round (the connection then goes to the back
//! of the line), so no connection starves. Buffers go back to their connection's
//! pool after the copy into the store, so steady state allocates nothing.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Semaphore};

use crate::metrics::TransportCounters;
use crate::spec::Spec;
use crate::store::{Reservation, Store};
use crate::wire::{Chunk, HandshakeLimits, PayloadSplitter};
use crate::{Error, Result};

/// Limits and sizes every transport honours.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Chunks a connection may have queued before its reads pause (default 8).
    pub queue_size: usize,
    /// Target bytes per receive buffer; a buffer holds at least one payload (default 256 KiB).
    pub chunk_bytes: usize,
    /// Most open connections over all transports; the next is refused (default 1024).
    pub max_connections: usize,
    /// How long a peer may take to finish its hello or read the handshake (default 10 s).
    pub handshake_timeout: Duration,
    /// Limits for decoding handshakes (clients).
    pub handshake: HandshakeLimits,
    /// How long a connection that has just been drained polls its socket before
    /// it waits for the next bytes (default 50 µs; zero turns it off). It
    /// applies to streams that can be read without waiting (TCP and Unix
    /// sockets), payloads of at most [`busy::MAX_PAYLOAD`](crate::busy::MAX_PAYLOAD)
    /// bytes, and processes with few such streams open; capped at
    /// [`busy::MAX_BUDGET`](crate::busy::MAX_BUDGET); see [`busy`](crate::busy).
    pub busy_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_size: 8,
            chunk_bytes: 256 * 1024,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            handshake: HandshakeLimits::default(),
            busy_poll: crate::busy::DEFAULT_BUSY_POLL,
        }
    }
}

/// Pushes of at most this many bytes are copied into the store by the pushing
/// task itself when the ring has room and nothing of the connection is queued:
/// the hop to a drainer thread (a wake-up and a context switch each time) costs
/// more than the copy, and on a busy machine the extra thread buys no parallelism.
/// Larger pushes are queued for a drainer, so that one copy never holds an async
/// worker for long.
pub const INLINE_MAX_BYTES: usize = 4 << 20;

/// What a queue holds: whole payloads, back to back.
#[derive(Debug)]
enum Item {
    Chunk(Chunk),
    Bytes(Bytes),
}

impl Item {
    fn bytes(&self) -> &[u8] {
        match self {
            Item::Chunk(c) => c.bytes(),
            Item::Bytes(b) => b,
        }
    }
}

struct ConnQueue {
    id: u64,
    state: Mutex<QueueState>,
    space: Semaphore,
    pool: Mutex<Vec<Vec<u8>>>,
    counters: Arc<TransportCounters>,
}

/// When an item was queued (only kept with the `latency-metrics` feature).
#[cfg(feature = "latency-metrics")]
type Stamp = std::time::Instant;
#[cfg(not(feature = "latency-metrics"))]
type Stamp = ();

fn stamp() -> Stamp {
    #[cfg(feature = "latency-metrics")]
    return std::time::Instant::now();
}

struct QueueState {
    items: VecDeque<(Item, Stamp)>,
    scheduled: bool,
}

struct Ready {
    list: VecDeque<Arc<ConnQueue>>,
    live: usize,
    closing: bool,
    /// Nobody will consume any more (the server was dropped without a
    /// shutdown): drainers leave without draining.
    abandoned: bool,
    drainers: usize,
}

pub(crate) struct IngressInner {
    spec: Spec,
    limits: Limits,
    store: Store,
    ready: Mutex<Ready>,
    ready_cv: Condvar,
    queues: Mutex<BTreeMap<u64, Arc<ConnQueue>>>,
    transports: Mutex<BTreeMap<String, Arc<TransportCounters>>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    shutdown_tx: watch::Sender<bool>,
    closing: AtomicBool,
    drain_error: Mutex<Option<String>>,
    #[cfg(feature = "latency-metrics")]
    latency: Mutex<crate::metrics::LatencyHistogram>,
}

/// The handle transports use to feed payloads into the server. Cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<IngressInner>,
}

impl fmt::Debug for Ingress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress")
            .field("payload_size", &self.inner.spec.payload_size())
            .field("active", &self.inner.active.load(Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ingress {
    /// Starts an ingress feeding `store` with `drainers` threads.
    pub(crate) fn start(store: Store, limits: Limits, drainers: usize) -> Result<Ingress> {
        if limits.queue_size == 0 {
            return Err(Error::Config("queue_size must be at least 1, got 0".into()));
        }
        if drainers == 0 {
            return Err(Error::Config("drainers must be at least 1, got 0".into()));
        }
        let (shutdown_tx, _) = watch::channel(false);
        let inner = Arc::new(IngressInner {
            spec: store.spec().clone(),
            limits,
            store,
            ready: Mutex::new(Ready {
                list: VecDeque::new(),
                live: 0,
                closing: false,
                abandoned: false,
                drainers,
            }),
            ready_cv: Condvar::new(),
            queues: Mutex::new(BTreeMap::new()),
            transports: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            shutdown_tx,
            closing: AtomicBool::new(false),
            drain_error: Mutex::new(None),
            #[cfg(feature = "latency-metrics")]
            latency: Mutex::new(Default::default()),
        });
        for i in 0..drainers {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("echo-drainer-{i}"))
                .spawn(move || drain(&inner))
                .map_err(Error::Io)?;
        }
        Ok(Ingress { inner })
    }

    /// The spec samples must follow.
    pub fn spec(&self) -> &Spec {
        &self.inner.spec
    }

    /// Bytes per payload.
    pub fn payload_size(&self) -> usize {
        self.inner.spec.payload_size()
    }

    /// The limits transports honour.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The counters of a transport scheme (created on first use).
    pub fn counters(&self, scheme: &str) -> Arc<TransportCounters> {
        lock(&self.inner.transports)
            .entry(scheme.to_string())
            .or_default()
            .clone()
    }

    pub(crate) fn all_counters(&self) -> BTreeMap<String, Arc<TransportCounters>> {
        lock(&self.inner.transports).clone()
    }

    /// Opens a connection for a peer of transport `scheme`. Refused with
    /// [`Error::Shutdown`] while shutting down, and with `ConnectionClosed` when
    /// `max_connections` are already open.
    pub fn open(&self, scheme: &str, peer: impl Into<String>) -> Result<Connection> {
        let counters = self.counters(scheme);
        if self.inner.closing.load(Acquire) {
            counters.connections_refused.fetch_add(1, Relaxed);
            return Err(Error::Shutdown);
        }
        let max = self.inner.limits.max_connections;
        if self
            .inner
            .active
            .fetch_update(AcqRel, Acquire, |a| (a < max).then_some(a + 1))
            .is_err()
        {
            counters.connections_refused.fetch_add(1, Relaxed);
            return Err(Error::closed(format!(
                "connection limit reached ({max} open); refusing {}",
                peer.into()
            )));
        }
        counters.connections_total.fetch_add(1, Relaxed);
        counters.connections_active.fetch_add(1, Relaxed);
        let id = self.inner.next_id.fetch_add(1, Relaxed);
        let queue = Arc::new(ConnQueue {
            id,
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                scheduled: false,
            }),
            space: Semaphore::new(self.inner.limits.queue_size),
            pool: Mutex::new(Vec::new()),
            counters,
        });
        lock(&self.inner.ready).live += 1;
        lock(&self.inner.queues).insert(id, queue.clone());
        Ok(Connection {
            ingress: self.inner.clone(),
            queue,
            peer: peer.into(),
            shutdown: self.inner.shutdown_tx.subscribe(),
        })
    }

    /// A signal that fires when the server starts shutting down.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.inner.shutdown_tx.subscribe())
    }

    /// True once shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.closing.load(Acquire)
    }

    /// Open connections.
    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Acquire)
    }

    /// (sum, max) of chunks queued over connections.
    pub(crate) fn queue_depths(&self) -> (u64, u64) {
        let queues = lock(&self.inner.queues);
        queues.values().fold((0, 0), |(sum, max), q| {
            let d = lock(&q.state).items.len() as u64;
            (sum + d, max.max(d))
        })
    }

    /// Starts shutting down: refuses new connections and pushes, tells transports.
    pub(crate) fn begin_shutdown(&self) {
        self.inner.closing.store(true, Release);
        self.inner.shutdown_tx.send_replace(true);
    }

    /// Lets the drainers go at once, without draining: for a server dropped
    /// without a shutdown, whose store is aborted (nobody consumes any more).
    /// Does not wait for them.
    pub(crate) fn abandon(&self) {
        let mut ready = lock(&self.inner.ready);
        ready.abandoned = true;
        ready.closing = true;
        drop(ready);
        self.inner.ready_cv.notify_all();
    }

    /// True once [`abandon`](Self::abandon)ed.
    pub(crate) fn is_abandoned(&self) -> bool {
        lock(&self.inner.ready).abandoned
    }

    /// Waits until every queue is drained into the store and the drainers exit.
    /// With `force`, stops waiting for connections that are still open.
    pub(crate) fn finish(&self, force: bool) {
        let mut ready = lock(&self.inner.ready);
        ready.closing = true;
        if force {
            ready.live = 0;
        }
        self.inner.ready_cv.notify_all();
        while ready.drainers > 0 {
            ready = self
                .inner
                .ready_cv
                .wait(ready)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queue-to-store latency percentiles (feature `latency-metrics`), else `None`.
    pub(crate) fn latency(&self) -> Option<crate::metrics::LatencySummary> {
        #[cfg(feature = "latency-metrics")]
        return Some(lock(&self.inner.latency).summary());
        #[cfg(not(feature = "latency-metrics"))]
        None
    }

    /// An error a drainer met (the store refusing writes), if any.
    pub(crate) fn drain_error(&self) -> Option<String> {
        lock(&self.inner.drain_error).clone()
    }
}

/// Resolves once the server starts shutting down.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// A signal that fires when `rx` sees `true`.
    pub fn from_watch(rx: watch::Receiver<bool>) -> Self {
        ShutdownSignal(rx)
    }

    /// Waits for shutdown.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// True once shutdown started.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until this signal or `other` fires (a server's shutdown or its
    /// transport's stop, say).
    pub async fn wait_or(&mut self, other: &mut ShutdownSignal) {
        tokio::select! {
            _ = self.wait() => {},
            _ = other.wait() => {},
        }
    }
}

/// One peer's queue into the server. Dropping it closes the connection's queue
/// (what was pushed is still drained).
pub struct Connection {
    ingress: Arc<IngressInner>,
    queue: Arc<ConnQueue>,
    peer: String,
    shutdown: watch::Receiver<bool>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.queue.id)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Connection {
    /// The peer, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The spec.
    pub fn spec(&self) -> &Spec {
        &self.ingress.spec
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.ingress.limits
    }

    /// A splitter sized for this connection's receive buffers.
    pub fn splitter(&self) -> PayloadSplitter {
        let ps = self.ingress.spec.payload_size();
        PayloadSplitter::new(
            ps,
            PayloadSplitter::payloads_per_chunk(ps, self.ingress.limits.chunk_bytes),
        )
    }

    /// A receive buffer from this connection's pool (allocated only while the pool
    /// is still growing to its bound of `queue_size + 2` buffers).
    pub fn buffer(&self) -> Vec<u8> {
        lock(&self.queue.pool).pop().unwrap_or_default()
    }

    /// Queues whole payloads, waiting for room; once this returns `Ok`, the
    /// payloads are acknowledged: they will reach a batch.
    pub async fn push(&mut self, chunk: Chunk) -> Result<usize> {
        let n = chunk.count();
        if n == 0 {
            lock(&self.queue.pool).push(chunk.into_buffer());
            return Ok(0);
        }
        self.push_item(Item::Chunk(chunk), n).await
    }

    /// Queues whole payloads held in shared bytes (zero-copy for transports that
    /// receive `Bytes`); the length must be a whole number of payloads.
    pub async fn push_bytes(&mut self, bytes: Bytes) -> Result<usize> {
        let ps = self.ingress.spec.payload_size();
        if bytes.is_empty() || bytes.len() % ps != 0 {
            return Err(Error::PayloadSize {
                expected: ps,
                got: bytes.len(),
            });
        }
        let n = bytes.len() / ps;
        self.push_item(Item::Bytes(bytes), n).await
    }

    /// Gives a receive buffer back to the pool (up to its bound).
    fn recycle(&self, buf: Vec<u8>) {
        let mut pool = lock(&self.queue.pool);
        if pool.len() < self.ingress.limits.queue_size + 2 {
            pool.push(buf);
        }
    }

    /// Copies what the ring has room for straight into the store when nothing of
    /// this connection is queued (so order is kept) and the copy is small; returns
    /// what is left to queue.
    fn write_inline(&self, item: Item) -> Result<Option<Item>> {
        // Very large copies go to a drainer thread instead of holding this worker.
        if item.bytes().len() > INLINE_MAX_BYTES || lock(&self.queue.state).scheduled {
            return Ok(Some(item)); // queued items, or a drainer busy with them, go first
        }
        #[cfg(feature = "latency-metrics")]
        let t = std::time::Instant::now();
        let written = self.ingress.store.try_write(item.bytes())?;
        #[cfg(feature = "latency-metrics")]
        if written > 0 {
            lock(&self.ingress.latency).record(t.elapsed());
        }
        let len = item.bytes().len();
        if written == len {
            if let Item::Chunk(c) = item {
                self.recycle(c.into_buffer());
            }
            return Ok(None);
        }
        Ok(Some(match item {
            _ if written == 0 => item,
            Item::Bytes(b) => Item::Bytes(b.slice(written..)),
            Item::Chunk(c) => {
                let ps = self.ingress.spec.payload_size();
                let mut buf = c.into_buffer();
                buf.copy_within(written..len, 0);
                Item::Chunk(Chunk::new(buf, len - written, ps))
            }
        }))
    }

    async fn push_item(&mut self, item: Item, n: usize) -> Result<usize> {
        if self.ingress.closing.load(Acquire) {
            return Err(Error::Shutdown);
        }
        let bytes = item.bytes().len() as u64;
        // Fast path: the ring has room, so no queue and no hop to a drainer thread.
        let Some(item) = self.write_inline(item)? else {
            let c = &self.queue.counters;
            c.samples.fetch_add(n as u64, Relaxed);
            c.bytes.fetch_add(bytes, Relaxed);
            return Ok(n);
        };
        // Queue the rest. Fast path: room in the queue, no shutdown waiter to
        // register and drop.
        let permit = match self.queue.space.try_acquire() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return Err(Error::Shutdown),
                p = self.queue.space.acquire() => p.map_err(|_| Error::Shutdown)?,
            },
        };
        if self.ingress.closing.load(Acquire) {
            return Err(Error::Shutdown);
        }
        permit.forget();
        let schedule = {
            let mut st = lock(&self.queue.state);
            st.items.push_back((item, stamp()));
            !std::mem::replace(&mut st.scheduled, true)
        };
        if schedule {
            lock(&self.ingress.ready).list.push_back(self.queue.clone());
            self.ingress.ready_cv.notify_one();
        }
        let c = &self.queue.counters;
        c.samples.fetch_add(n as u64, Relaxed);
        c.bytes.fetch_add(bytes, Relaxed);
        Ok(n)
    }

    /// Receives payloads straight into the store, skipping the receive buffer and
    /// its copy: reserves up to `max` slots of the batch being filled, if its ring
    /// slot is free now and nothing of this connection is queued (which must go
    /// first), and has `fill` write the payloads into them (see
    /// [`Reservation::regions`]). Returns how many payloads were committed (they
    /// are acknowledged: they are in the store), or `None` when nothing was
    /// reserved and the caller should [`push`](Self::push) instead.
    ///
    /// `fill` must complete without waiting: the reservation holds up its batch
    /// for every connection. Call it only with bytes already at hand (for a
    /// socket: already in its receive queue). If `fill` fails anyway, the slots
    /// cannot be filled by anyone else, so the store ends before their batch (see
    /// [`Reservation`]) and the error is returned, and reported by the server's
    /// shutdown.
    pub fn try_recv_direct<F>(&mut self, max: usize, fill: F) -> Result<Option<usize>>
    where
        F: FnOnce(&mut Reservation<'_>) -> std::io::Result<()>,
    {
        if self.ingress.closing.load(Acquire) {
            return Err(Error::Shutdown);
        }
        if max == 0 || lock(&self.queue.state).scheduled {
            return Ok(None);
        }
        #[cfg(feature = "latency-metrics")]
        let t = std::time::Instant::now();
        let Some(mut res) = self.ingress.store.try_reserve(max)? else {
            return Ok(None);
        };
        let n = res.len();
        if let Err(e) = fill(&mut res) {
            let msg = format!(
                "{}: receiving {n} payload(s) straight into reserved store slots failed: {e}; \
                 the store ends before their batch",
                self.peer
            );
            drop(res);
            let mut err = lock(&self.ingress.drain_error);
            if err.is_none() {
                tracing::error!("ingress: {msg}");
                *err = Some(msg.clone());
            }
            return Err(Error::Other(msg));
        }
        res.commit();
        #[cfg(feature = "latency-metrics")]
        lock(&self.ingress.latency).record(t.elapsed());
        let c = &self.queue.counters;
        c.samples.fetch_add(n as u64, Relaxed);
        c.bytes
            .fetch_add((n * self.ingress.spec.payload_size()) as u64, Relaxed);
        Ok(Some(n))
    }

    /// True while payloads of this connection wait in its queue (they reach the
    /// store before anything pushed or received later).
    pub fn has_queued(&self) -> bool {
        lock(&self.queue.state).scheduled
    }

    /// Waits until the store's ring has room for [`try_recv_direct`](Self::try_recv_direct)
    /// (see [`Store::room`]); `Err(Shutdown)` once the server shuts down.
    pub async fn store_room(&mut self) -> Result<()> {
        tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|s| *s) => Err(Error::Shutdown),
            r = self.ingress.store.room() => r,
        }
    }

    /// Resolves when the server starts shutting down.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.shutdown.clone())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.ingress.active.fetch_sub(1, AcqRel);
        self.queue.counters.connections_active.fetch_sub(1, Relaxed);
        lock(&self.ingress.queues).remove(&self.queue.id);
        let mut ready = lock(&self.ingress.ready);
        ready.live = ready.live.saturating_sub(1);
        drop(ready);
        self.ingress.ready_cv.notify_all();
    }
}

fn drain(inner: &IngressInner) {
    loop {
        let queue = {
            let mut ready = lock(&inner.ready);
            loop {
                if ready.abandoned {
                    break None;
                }
                if let Some(q) = ready.list.pop_front() {
                    break Some(q);
                }
                if ready.closing && ready.live == 0 {
                    break None;
                }
                ready = inner
                    .ready_cv
                    .wait(ready)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(queue) = queue else { break };
        let item = lock(&queue.state).items.pop_front();
        if let Some((item, _queued_at)) = item {
            if let Err(e) = inner.store.write_blocking(item.bytes()) {
                // An abandoned server's aborted store refuses by design.
                let abandoned = lock(&inner.ready).abandoned;
                let mut err = lock(&inner.drain_error);
                if err.is_none() && !abandoned {
                    tracing::error!("ingress: store refused a write: {e}");
                    *err = Some(e.to_string());
                }
            }
            #[cfg(feature = "latency-metrics")]
            lock(&inner.latency).record(_queued_at.elapsed());
            if let Item::Chunk(c) = item {
                let mut pool = lock(&queue.pool);
                if pool.len() < inner.limits.queue_size + 2 {
                    pool.push(c.into_buffer());
                }
            }
            queue.space.add_permits(1);
        }
        let again = {
            let mut st = lock(&queue.state);
            if st.items.is_empty() {
                st.scheduled = false;
                false
            } else {
                true
            }
        };
        if again {
            lock(&inner.ready).list.push_back(queue);
            inner.ready_cv.notify_one();
        }
    }
    let mut ready = lock(&inner.ready);
    ready.drainers -= 1;
    drop(ready);
    inner.ready_cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(batch: usize) -> (Store, Ingress) {
        let store = Store::new(Spec::bytes(4).unwrap(), batch, 3).unwrap();
        let ing = Ingress::start(store.clone(), Limits::default(), 2).unwrap();
        (store, ing)
    }

    #[tokio::test]
    async fn pushes_reach_the_store_in_connection_order() {
        let (store, ing) = ingress(8);
        let mut a = ing.open("test", "a").unwrap();
        let mut b = ing.open("test", "b").unwrap();
        for i in 0..4u16 {
            for (c, tag) in [(&mut a, 0u16), (&mut b, 1)] {
                let mut sp = c.splitter();
                let mut p = tag.to_le_bytes().to_vec();
                p.extend_from_slice(&i.to_le_bytes());
                sp.feed(&p);
                assert_eq!(c.push(sp.take(c.buffer())).await.unwrap(), 1);
            }
        }
        let batch = store.next_batch().await.unwrap();
        let mut seen = [Vec::new(), Vec::new()];
        for p in batch.leaf(0).bytes().chunks(4) {
            seen[p[0] as usize].push(u16::from_le_bytes([p[2], p[3]]));
        }
        assert_eq!(seen, [vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
    }

    #[tokio::test]
    async fn connection_limit_and_shutdown_refuse() {
        let store = Store::new(Spec::bytes(4).unwrap(), 8, 3).unwrap();
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let ing = Ingress::start(store, limits, 1).unwrap();
        let c = ing.open("t", "first").unwrap();
        let e = ing.open("t", "second").unwrap_err();
        assert!(
            e.to_string().contains("connection limit reached (1 open)"),
            "{e}"
        );
        drop(c);
        let mut c = ing.open("t", "third").unwrap();
        ing.begin_shutdown();
        assert!(matches!(ing.open("t", "x"), Err(Error::Shutdown)));
        assert!(matches!(
            c.push_bytes(Bytes::from_static(&[1, 2, 3, 4])).await,
            Err(Error::Shutdown)
        ));
        assert_eq!(ing.counters("t").snapshot().connections_refused, 2);
    }

    #[tokio::test]
    async fn pushes_beyond_a_full_ring_queue_and_keep_their_order() {
        // Ring of 2 x 2 slots: the first pushes are copied inline, the rest wait in
        // the connection's queue for the drainer, and nothing overtakes anything.
        let store = Store::new(Spec::bytes(4).unwrap(), 2, 2).unwrap();
        let ing = Ingress::start(store.clone(), Limits::default(), 1).unwrap();
        let mut c = ing.open("t", "p").unwrap();
        for i in 0..8u32 {
            let mut sp = c.splitter();
            sp.feed(&i.to_le_bytes());
            assert_eq!(c.push(sp.take(c.buffer())).await.unwrap(), 1);
        }
        // Four payloads in one chunk: queued behind the others.
        let mut sp = c.splitter();
        for i in 8..12u32 {
            sp.feed(&i.to_le_bytes());
        }
        let consumer = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            while got.len() < 12 {
                let b = store.next_batch_blocking().unwrap();
                for p in b.leaf(0).bytes().chunks(4) {
                    got.push(u32::from_le_bytes(p.try_into().unwrap()));
                }
            }
            got
        });
        assert_eq!(c.push(sp.take(c.buffer())).await.unwrap(), 4);
        assert_eq!(consumer.await.unwrap(), (0..12).collect::<Vec<_>>());
        assert_eq!(ing.counters("t").snapshot().samples, 12);
    }

    #[tokio::test]
    async fn push_bytes_checks_size() {
        let (_store, ing) = ingress(8);
        let mut c = ing.open("t", "p").unwrap();
        let e = c.push_bytes(Bytes::from_static(&[0; 6])).await.unwrap_err();
        assert!(matches!(
            e,
            Error::PayloadSize {
                expected: 4,
                got: 6
            }
        ));
    }
}

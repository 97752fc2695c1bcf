//! The server: a store, an ingress, and any number of transports bound by URL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ingress::{Ingress, Limits};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::spec::Spec;
use crate::store::{Batch, Store};
use crate::transport::Transport;
use crate::{Error, Result};

/// Builds a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    spec: Spec,
    batch_size: usize,
    num_buffers: usize,
    drainers: usize,
    limits: Limits,
    registry: Option<Registry>,
    shutdown_grace: Duration,
}

impl ServerBuilder {
    /// Samples per batch (default 32).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Batches in the ring, at least 2 (default 3).
    pub fn num_buffers(mut self, n: usize) -> Self {
        self.num_buffers = n;
        self
    }

    /// Chunks each connection may queue (default 8).
    pub fn queue_size(mut self, n: usize) -> Self {
        self.limits.queue_size = n;
        self
    }

    /// Drainer threads moving queued payloads into the store (default 1).
    pub fn drainers(mut self, n: usize) -> Self {
        self.drainers = n;
        self
    }

    /// All the limits at once.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a drained TCP or Unix connection of small payloads polls its
    /// socket before it parks (default 50 µs; zero turns it off); see
    /// [`Limits::busy_poll`].
    pub fn busy_poll(mut self, budget: std::time::Duration) -> Self {
        self.limits.busy_poll = budget;
        self
    }

    /// The most open connections over all transports (default 1024).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.limits.max_connections = n;
        self
    }

    /// The registry used by [`Server::listen`] (default: core's, with `mem`).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// How long shutdown waits for transports to close their connections (default 10 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Allocates the store and starts the drainers.
    pub fn build(self) -> Result<Server> {
        let store = Store::new(self.spec, self.batch_size, self.num_buffers)?;
        let ingress = Ingress::start(store.clone(), self.limits, self.drainers)?;
        Ok(Server {
            inner: Arc::new(ServerInner {
                store,
                ingress,
                registry: self.registry.unwrap_or_else(Registry::with_core),
                transports: Mutex::new(Vec::new()),
                shutdown_grace: self.shutdown_grace,
                shut: tokio::sync::Mutex::new(false),
            }),
        })
    }
}

struct ServerInner {
    store: Store,
    ingress: Ingress,
    registry: Registry,
    transports: Mutex<Vec<Arc<dyn Transport>>>,
    shutdown_grace: Duration,
    shut: tokio::sync::Mutex<bool>,
}

impl ServerInner {
    /// Stops at once (see [`Server::abort`]).
    fn abort(&self) {
        self.ingress.begin_shutdown();
        // Before the store's abort: drainers then see the store's refusals as
        // expected, not as errors to report.
        self.ingress.abandon();
        self.store.abort();
    }
}

impl Drop for ServerInner {
    fn drop(&mut self) {
        // Nobody can consume any more: let waiting writers and drainers go
        // (the drainers' threads end; they would otherwise wait for a
        // shutdown that never comes, holding the ring).
        self.abort();
    }
}

/// An echo server: receives samples over its transports and hands out batches.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("spec", &self.inner.store.spec().to_string())
            .field("batch_size", &self.inner.store.batch_size())
            .finish()
    }
}

/// A bound listener: its URL and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// The URL clients connect to.
    pub url: String,
    /// Extra facts (e.g. a certificate path).
    pub details: Vec<(String, String)>,
}

impl Server {
    /// A builder for a server of `spec`.
    pub fn builder(spec: Spec) -> ServerBuilder {
        ServerBuilder {
            spec,
            batch_size: 32,
            num_buffers: 3,
            drainers: 1,
            limits: Limits::default(),
            registry: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// The spec.
    pub fn spec(&self) -> &Spec {
        self.inner.store.spec()
    }

    /// Samples per batch.
    pub fn batch_size(&self) -> usize {
        self.inner.store.batch_size()
    }

    /// The ingress handle, for binding transports by hand.
    pub fn ingress(&self) -> Ingress {
        self.inner.ingress.clone()
    }

    /// The registry [`listen`](Self::listen) uses.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Binds a transport by URL through the registry; returns the URL clients use.
    pub async fn listen(&self, url: &str) -> Result<String> {
        if self.inner.ingress.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        let t = self
            .inner
            .registry
            .bind(url, self.inner.ingress.clone())
            .await?;
        let local = t.local_url().to_string();
        self.attach(t);
        Ok(local)
    }

    /// Adds a transport bound by hand (with [`Server::ingress`]).
    pub fn attach(&self, transport: Box<dyn Transport>) {
        self.inner
            .transports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::from(transport));
    }

    /// The bound listeners.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.transports()
            .iter()
            .map(|t| ListenerInfo {
                url: t.local_url().to_string(),
                details: t.details(),
            })
            .collect()
    }

    fn transports(&self) -> Vec<Arc<dyn Transport>> {
        self.inner
            .transports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the next full batch; after shutdown, the remainder as a partial
    /// batch, then `None`.
    pub async fn next_batch(&self) -> Option<Batch> {
        self.inner.store.next_batch().await
    }

    /// [`next_batch`](Self::next_batch) for non-async learners (do not call it on an
    /// async runtime's thread).
    pub fn next_batch_blocking(&self) -> Option<Batch> {
        self.inner.store.next_batch_blocking()
    }

    /// The next batch if one is ready.
    pub fn try_next_batch(&self) -> Option<Batch> {
        self.inner.store.try_next_batch()
    }

    /// Feeds samples in-process, without a transport: `payloads` is one or more
    /// whole payloads back to back. Waits for ring space.
    pub async fn submit(&self, payloads: &[u8]) -> Result<()> {
        if self.inner.ingress.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        self.inner.store.write(payloads).await
    }

    /// A metrics snapshot.
    pub fn metrics(&self) -> Metrics {
        let c = self.inner.store.counters();
        let (queue_depth_sum, queue_depth_max) = self.inner.ingress.queue_depths();
        let transports: std::collections::BTreeMap<_, _> = self
            .inner
            .ingress
            .all_counters()
            .into_iter()
            .map(|(k, v)| (k, v.snapshot()))
            .collect();
        Metrics {
            store_size: c.size,
            active_connections: self.inner.ingress.active_connections() as u64,
            queue_depth_sum,
            queue_depth_max,
            push_blocked_count: c.push_blocked,
            samples_inserted_total: c.inserted,
            notify_count: c.notify_count,
            batches_total: c.batches,
            bytes_received: transports.values().map(|t| t.bytes).sum(),
            transports,
            ingress_latency: self.inner.ingress.latency(),
        }
    }

    /// True once shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.ingress.is_shutting_down()
    }

    /// Stops at once, without draining, for a consumer that is going away:
    /// transports are told to stop, writers waiting for ring space and the
    /// drainers give up, and the store closes (the consumer gets what the
    /// ring already holds, then `None`). Samples still queued or in flight are
    /// dropped, acknowledged or not: [`shutdown`](Self::shutdown) while
    /// consuming loses nothing. Dropping the last clone of a server does this.
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Shuts down gracefully: stops accepting, closes connections, drains every
    /// queue into the store and closes it. The consumer then receives every
    /// remaining full batch, the remainder as a partial batch, then `None`.
    /// Keep consuming while this runs if the ring may be full. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        let mut shut = self.inner.shut.lock().await;
        if *shut {
            return Ok(());
        }
        self.inner.ingress.begin_shutdown();
        let transports = self.transports();
        let closing = futures::future::join_all(transports.iter().map(|t| t.shutdown()));
        let force = match tokio::time::timeout(self.inner.shutdown_grace, closing).await {
            Ok(results) => {
                for r in results {
                    if let Err(e) = r {
                        tracing::warn!("transport shutdown: {e}");
                    }
                }
                false
            }
            Err(_) => {
                tracing::warn!(
                    "transports did not close within {:?}; draining what was queued",
                    self.inner.shutdown_grace
                );
                true
            }
        };
        let ingress = self.inner.ingress.clone();
        tokio::task::spawn_blocking(move || ingress.finish(force))
            .await
            .map_err(|e| Error::Other(format!("drainer join: {e}")))?;
        self.inner.store.close();
        *shut = true;
        if self.inner.ingress.is_abandoned() {
            return Err(Error::Other(
                "aborted during the shutdown: samples still queued were dropped".into(),
            ));
        }
        match self.inner.ingress.drain_error() {
            Some(e) => Err(Error::Other(format!("ingress: {e}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn submit_then_shutdown_gives_partial_then_none() {
        let server = Server::builder(Spec::bytes(3).unwrap())
            .batch_size(4)
            .build()
            .unwrap();
        let data: Vec<u8> = (0..18).collect();
        server.submit(&data).await.unwrap();
        let b = server.next_batch().await.unwrap();
        assert_eq!(b.leaf(0).bytes(), &data[..12]);
        drop(b);
        server.shutdown().await.unwrap();
        assert!(matches!(
            server.submit(&data[..3]).await,
            Err(Error::Shutdown)
        ));
        let b = server.next_batch().await.unwrap();
        assert!(b.is_partial());
        assert_eq!(b.leaf(0).bytes(), &data[12..]);
        drop(b);
        assert!(server.next_batch().await.is_none());
        let m = server.metrics();
        assert_eq!(m.samples_inserted_total, 6);
        assert_eq!(m.batches_total, 2);
        assert_eq!(m.notify_count, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_lets_a_blocked_writer_go_and_hands_out_the_ring() {
        let server = Server::builder(Spec::bytes(1).unwrap())
            .batch_size(2)
            .num_buffers(2)
            .build()
            .unwrap();
        server.submit(&[1, 2, 3, 4]).await.unwrap();
        // The ring is full: this one waits for a batch to be consumed.
        let blocked = tokio::spawn({
            let server = server.clone();
            async move { server.submit(&[5]).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!blocked.is_finished());
        server.abort();
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), blocked)
            .await
            .expect("the blocked writer was let go")
            .unwrap();
        assert!(
            refused.is_err(),
            "a write into an aborted store: {refused:?}"
        );
        for want in [[1, 2], [3, 4]] {
            let b = server.next_batch().await.unwrap();
            assert_eq!(b.leaf(0).bytes(), &want);
        }
        assert!(server.next_batch().await.is_none());
        assert!(matches!(server.submit(&[6]).await, Err(Error::Shutdown)));
    }
}

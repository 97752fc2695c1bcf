//! Metrics: counters kept by the server, snapshots of them, and a small
//! latency histogram used by clients (and the server's optional latency metrics).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Counters for one transport (a scheme), shared by its connections.
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// Connections accepted so far.
    pub connections_total: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Connections refused (limits, bad hello, bad handshake timing).
    pub connections_refused: AtomicU64,
    /// Samples queued (and acknowledged).
    pub samples: AtomicU64,
    /// Payload bytes queued.
    pub bytes: AtomicU64,
}

impl TransportCounters {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> TransportMetrics {
        TransportMetrics {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            samples: self.samples.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// Totals for one transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TransportMetrics {
    /// Connections accepted so far.
    pub connections_total: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Connections refused.
    pub connections_refused: u64,
    /// Samples received and acknowledged.
    pub samples: u64,
    /// Payload bytes received and acknowledged.
    pub bytes: u64,
}

/// A snapshot of the server's state; the first seven fields are id-echo's `SampleInfo`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Samples in the store not yet handed to the consumer.
    pub store_size: u64,
    /// Open connections over all transports.
    pub active_connections: u64,
    /// Chunks waiting in all connection queues.
    pub queue_depth_sum: u64,
    /// Chunks waiting in the fullest connection queue.
    pub queue_depth_max: u64,
    /// Times a writer had to wait because the ring was full.
    pub push_blocked_count: u64,
    /// Samples written into the store.
    pub samples_inserted_total: u64,
    /// Times the consumer was woken for a full batch.
    pub notify_count: u64,
    /// Batches handed to the consumer.
    pub batches_total: u64,
    /// Payload bytes received over all transports.
    pub bytes_received: u64,
    /// Totals per transport scheme.
    pub transports: BTreeMap<String, TransportMetrics>,
    /// Time from a payload entering its queue to being written into the store
    /// (only with the `latency-metrics` feature; empty otherwise).
    pub ingress_latency: Option<LatencySummary>,
}

/// Percentiles of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Observations.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 90th percentile, microseconds.
    pub p90_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Largest, microseconds.
    pub max_us: f64,
}

const SUB: usize = 16; // buckets per power of two
const POWERS: usize = 40; // up to 2^40 ns ~ 18 minutes

/// A log-linear histogram of durations (about 6 % resolution), fixed size, no allocation per record.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Box<[u64]>,
    count: u64,
    max_ns: u64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("summary", &self.summary())
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; SUB * POWERS].into_boxed_slice(),
            count: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    fn index(ns: u64) -> usize {
        if ns < SUB as u64 {
            return ns as usize;
        }
        let p = 63 - ns.leading_zeros() as usize; // >= 4
        let sub = ((ns >> (p - 4)) as usize) & (SUB - 1);
        ((p - 3) * SUB + sub).min(SUB * POWERS - 1)
    }

    fn lower_bound(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let p = i / SUB + 3;
        let sub = (i % SUB) as u64;
        (1u64 << p) + (sub << (p - 4))
    }

    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram's observations.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0..=1) as a duration; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper = Self::lower_bound(i + 1).saturating_sub(1);
                return Duration::from_nanos(upper.min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    /// Percentiles in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        LatencySummary {
            count: self.count,
            p50_us: us(self.quantile(0.5)),
            p90_us: us(self.quantile(0.9)),
            p99_us: us(self.quantile(0.99)),
            max_us: self.max_ns as f64 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let mut h = LatencyHistogram::default();
        for i in 1..=10_000u64 {
            h.record(Duration::from_micros(i));
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.07, "{p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.07, "{p99}");
        assert_eq!(h.quantile(1.0), Duration::from_micros(10_000));
        assert_eq!(LatencyHistogram::default().quantile(0.5), Duration::ZERO);
    }

    #[test]
    fn bucket_bounds_are_monotonic() {
        let mut last = 0;
        for i in 1..SUB * POWERS {
            let lb = LatencyHistogram::lower_bound(i);
            assert!(lb > last, "{i}");
            assert_eq!(LatencyHistogram::index(lb), i);
            last = lb;
        }
    }
}

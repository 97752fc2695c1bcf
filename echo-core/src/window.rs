//! The in-flight window every client shares: at most `max_inflight` payloads
//! unacknowledged, `wait` until all are acked, closing, and ack latency.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

use crate::metrics::LatencyHistogram;
use crate::transport::ClientStats;
use crate::wire::WireError;
use crate::{Error, Result};

#[derive(Debug)]
struct State {
    sent: u64,
    acked: u64,
    closed: Option<String>,
    /// `(payload index, send time)` of the payloads whose latency is measured.
    send_times: VecDeque<(u64, Instant)>,
    latency: LatencyHistogram,
    /// Tasks waiting for a change; acks only wake anyone when this is non-zero.
    waiters: usize,
}

/// Ack latency is measured on one payload in this many (reading the clock per
/// payload costs more than the rest of the bookkeeping).
pub const LATENCY_SAMPLE_EVERY: u64 = 8;

/// Counts a waiting task for as long as it lives.
struct Waiter<'a>(&'a InflightWindow);

impl<'a> Waiter<'a> {
    fn new(w: &'a InflightWindow) -> Self {
        w.lock().waiters += 1;
        Waiter(w)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.lock().waiters -= 1;
    }
}

/// Flow control for one client connection (or one stream of it).
#[derive(Debug)]
pub struct InflightWindow {
    max: usize,
    state: Mutex<State>,
    changed: Notify,
}

impl InflightWindow {
    /// A window allowing `max_inflight` unacknowledged payloads.
    pub fn new(max_inflight: usize) -> Self {
        InflightWindow {
            max: max_inflight.max(1),
            state: Mutex::new(State {
                sent: 0,
                acked: 0,
                closed: None,
                send_times: VecDeque::with_capacity(max_inflight.max(1)),
                latency: LatencyHistogram::default(),
                waiters: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room for `n` payloads (n <= max) and counts them as sent.
    pub async fn acquire(&self, n: usize) -> Result<()> {
        let n = n.clamp(1, self.max);
        // Fast path: room now, no waiter registration (which locks the Notify).
        if let Some(r) = self.try_take(n) {
            return r;
        }
        let _waiter = Waiter::new(self);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.try_take(n) {
                return r;
            }
            notified.await;
        }
    }

    /// Takes room for `n` if there is some: `None` means wait.
    fn try_take(&self, n: usize) -> Option<Result<()>> {
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Some(Err(Error::closed(reason.clone())));
        }
        if (st.sent - st.acked) as usize + n <= self.max {
            let first = st.sent;
            st.sent += n as u64;
            let k = first.div_ceil(LATENCY_SAMPLE_EVERY) * LATENCY_SAMPLE_EVERY;
            if k < st.sent {
                st.send_times.push_back((k, Instant::now()));
            }
            return Some(Ok(()));
        }
        None
    }

    /// Gives back `n` payloads acquired but never sent (a failed write).
    pub fn unsend(&self, n: usize) {
        let mut st = self.lock();
        let n = (n as u64).min(st.sent - st.acked);
        st.sent -= n;
        while st.send_times.back().is_some_and(|&(k, _)| k >= st.sent) {
            st.send_times.pop_back();
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Counts `n` acks; more acks than payloads sent is a protocol error.
    pub fn ack(&self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        if st.acked + n > st.sent {
            let e = WireError::TooManyAcks {
                got: st.acked + n,
                sent: st.sent,
            };
            st.closed.get_or_insert_with(|| e.to_string());
            drop(st);
            self.changed.notify_waiters();
            return Err(e.into());
        }
        st.acked += n;
        if st.send_times.front().is_some_and(|&(k, _)| k < st.acked) {
            let now = Instant::now();
            while let Some(&(k, t)) = st.send_times.front() {
                if k >= st.acked {
                    break;
                }
                st.send_times.pop_front();
                st.latency.record(now - t);
            }
        }
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.changed.notify_waiters();
        }
        Ok(())
    }

    /// Marks the window closed (keeps the first reason); pending and later
    /// `acquire` calls fail with `ConnectionClosed`.
    pub fn close(&self, reason: impl Into<String>) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason.into());
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Fails with `ConnectionClosed` if closed.
    pub fn check_open(&self) -> Result<()> {
        match &self.lock().closed {
            Some(r) => Err(Error::closed(r.clone())),
            None => Ok(()),
        }
    }

    /// Payloads sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        let st = self.lock();
        (st.sent - st.acked) as usize
    }

    /// Waits until every payload sent is acknowledged; fails with
    /// `ConnectionClosed` if the connection closes first.
    pub async fn wait_all(&self) -> Result<()> {
        let _waiter = Waiter::new(self);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.sent == st.acked {
                    return Ok(());
                }
                if let Some(reason) = &st.closed {
                    return Err(Error::closed(format!(
                        "{reason} ({} payloads unacknowledged)",
                        st.sent - st.acked
                    )));
                }
            }
            notified.await;
        }
    }

    /// Counters and latency percentiles (ack latency of one payload in
    /// [`LATENCY_SAMPLE_EVERY`]).
    pub fn stats(&self) -> ClientStats {
        let st = self.lock();
        ClientStats {
            sent: st.sent,
            acked: st.acked,
            ack_latency: st.latency.summary(),
        }
    }

    /// A copy of the latency histogram (to merge several clients').
    pub fn latency(&self) -> LatencyHistogram {
        self.lock().latency.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn blocks_at_max_and_resumes_on_ack() {
        let w = Arc::new(InflightWindow::new(2));
        w.acquire(1).await.unwrap();
        w.acquire(1).await.unwrap();
        let w2 = w.clone();
        let t = tokio::spawn(async move { w2.acquire(1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_finished());
        w.ack(1).unwrap();
        t.await.unwrap().unwrap();
        assert_eq!(w.inflight(), 2);
        assert!(w.ack(3).is_err(), "more acks than sent");
        assert!(w.acquire(1).await.unwrap_err().is_closed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_between_threads() {
        let w = Arc::new(InflightWindow::new(4));
        let n = 40_000u64;
        let acker = {
            let w = w.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < n {
                    let k = w.inflight() as u64;
                    if k > 0 {
                        w.ack(k).unwrap();
                        done += k;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let run = async {
            for _ in 0..n {
                w.acquire(1).await.unwrap();
            }
            w.wait_all().await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("a wake-up was lost");
        acker.await.unwrap();
        let st = w.stats();
        assert_eq!((st.sent, st.acked), (n, n));
        assert_eq!(st.ack_latency.count, n / LATENCY_SAMPLE_EVERY);
    }

    #[test]
    fn unsend_gives_room_back() {
        let w = InflightWindow::new(2);
        assert!(w.try_take(2).unwrap().is_ok());
        assert!(w.try_take(1).is_none());
        w.unsend(1);
        assert_eq!(w.inflight(), 1);
        assert!(w.try_take(1).unwrap().is_ok());
        w.ack(2).unwrap();
        assert_eq!(w.stats().ack_latency.count, 1, "payload 0 is sampled");
    }

    #[tokio::test]
    async fn wait_all_fails_when_closed_with_inflight() {
        let w = InflightWindow::new(4);
        w.wait_all().await.unwrap();
        w.acquire(1).await.unwrap();
        w.close("peer left");
        let e = w.wait_all().await.unwrap_err();
        assert!(
            e.is_closed() && e.to_string().contains("1 payloads unacknowledged"),
            "{e}"
        );
        assert_eq!(w.stats().sent, 1);
    }
}

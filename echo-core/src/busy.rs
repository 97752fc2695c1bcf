//! Busy polling: a stream that has just been drained is polled for a few
//! microseconds before its task parks.
//!
//! A client that keeps `max_inflight` small payloads in flight is bound by the
//! round trip: each side sleeps in the kernel until the other's bytes arrive,
//! and waking a sleeping thread on another CPU costs tens of microseconds on a
//! virtual machine (an inter-processor interrupt and the halted CPU's exit).
//! Polling the socket for a short while first turns most of those wake-ups into
//! a read that finds the bytes already there. It is the same trade as Linux's
//! `SO_BUSY_POLL` (which does not cover loopback) or a runtime's spinning
//! threads: some CPU while waiting, for less latency.
//!
//! Only streams of small payloads poll (at most [`MAX_PAYLOAD`] bytes). The
//! cost is bounded three ways: a poll lasts at most the budget; after each
//! poll that finds nothing a stream skips polling for the next 1, 2, 4, ... up
//! to [`MAX_SKIP`] waits (so a stream that is quiet between samples costs
//! almost nothing); and streams only poll while the process has at most
//! half as many of them open as it has CPUs (at least one). With more streams
//! than that the CPUs have other work to do while a stream waits, and polling
//! would take time from it (measured: 20-30 % fewer samples/s with 4 and 16
//! clients on 2 CPUs), while wake-ups are rarer anyway. A poll yields to the
//! runtime after its first attempt and then every 5 µs, spinning on the
//! socket in between, so other tasks on its worker wait at most that long.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Default budget of one poll, for servers ([`Limits::busy_poll`](crate::Limits))
/// and clients ([`ClientOptions::busy_poll`](crate::ClientOptions)).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// Streams of larger payloads do not poll. A window of small payloads is bound
/// by the round trip; one of larger ones by bandwidth and CPU, where a poll
/// only reads the bytes in smaller pieces than a wake-up would (measured on 2
/// CPUs with 32 payloads in flight: about 2x the samples/s at 20 B to 4 KiB, none at
/// 16 KiB).
pub const MAX_PAYLOAD: usize = 8 * 1024;

/// After a poll that found nothing, a stream skips polling for at most this many
/// waits.
pub const MAX_SKIP: u32 = 64;

/// Budgets above this are capped: a poll does not look at shutdown signals, so
/// its budget bounds how long it can delay one.
pub const MAX_BUDGET: Duration = Duration::from_secs(1);

static POLLS: AtomicU64 = AtomicU64::new(0);
static FOUND: AtomicU64 = AtomicU64::new(0);
static WAITED: AtomicU64 = AtomicU64::new(0);

/// What the process's streams have polled so far (for diagnostics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Polls started.
    pub polls: u64,
    /// Polls that found bytes.
    pub found: u64,
    /// Polls that found bytes after at least one attempt that found none: the
    /// wake-ups polling saved.
    pub found_after_waiting: u64,
}

/// The process's poll counts so far.
pub fn counts() -> Counts {
    Counts {
        polls: POLLS.load(Ordering::Relaxed),
        found: FOUND.load(Ordering::Relaxed),
        found_after_waiting: WAITED.load(Ordering::Relaxed),
    }
}

/// Open streams that may poll, in this process.
static STREAMS: AtomicUsize = AtomicUsize::new(0);

/// How many open streams still poll.
fn max_streams() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1)
    })
}

/// One stream's busy-polling state.
#[derive(Debug)]
pub(crate) struct BusyPoll {
    /// Zero once polling is off.
    budget: Duration,
    /// The process's count of open streams that may poll (this one included
    /// while `budget` is not zero), and the most that still poll.
    streams: &'static AtomicUsize,
    max: usize,
    /// Waits still to skip before polling again.
    skip: u32,
    /// Waits to skip after the next poll that finds nothing.
    backoff: u32,
}

impl BusyPoll {
    /// Polls for at most `budget` per wait; zero turns polling off.
    pub(crate) fn new(budget: Duration) -> BusyPoll {
        BusyPoll::counted(budget, &STREAMS, max_streams())
    }

    fn counted(budget: Duration, streams: &'static AtomicUsize, max: usize) -> BusyPoll {
        let budget = budget.min(MAX_BUDGET);
        if !budget.is_zero() {
            streams.fetch_add(1, Ordering::Relaxed);
        }
        BusyPoll {
            budget,
            streams,
            max,
            skip: 0,
            backoff: 1,
        }
    }

    /// The budget per wait (zero: polling is off).
    #[cfg(test)]
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// Turns polling off for good, and stops counting this stream.
    fn disable(&mut self) {
        if !self.budget.is_zero() {
            self.budget = Duration::ZERO;
            self.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Starts a poll, unless polling is off, this stream is backing off, or
    /// the process has too many streams open.
    pub(crate) fn start(&mut self) -> Option<Poll<'_>> {
        if self.budget.is_zero() || self.streams.load(Ordering::Relaxed) > self.max {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(Poll {
            until: Instant::now() + self.budget,
            state: self,
            found: false,
        })
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        self.disable();
    }
}

/// A poll under way.
#[derive(Debug)]
pub(crate) struct Poll<'a> {
    state: &'a mut BusyPoll,
    until: Instant,
    found: bool,
}

impl Poll<'_> {
    /// An attempt found bytes (`waited`: after attempts that found none): this
    /// stream keeps polling at every wait.
    pub(crate) fn found(mut self, waited: bool) {
        self.found = true;
        if waited {
            WAITED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the budget allows another attempt.
    pub(crate) fn more(&self) -> bool {
        Instant::now() < self.until
    }
}

impl Drop for Poll<'_> {
    fn drop(&mut self) {
        let s = &mut *self.state;
        POLLS.fetch_add(1, Ordering::Relaxed);
        if self.found {
            FOUND.fetch_add(1, Ordering::Relaxed);
            s.backoff = 1;
        } else {
            s.skip = s.backoff;
            s.backoff = (s.backoff * 2).min(MAX_SKIP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(budget: Duration) -> BusyPoll {
        static OWN: AtomicUsize = AtomicUsize::new(0);
        BusyPoll::counted(budget, &OWN, usize::MAX)
    }

    #[test]
    fn off_never_polls() {
        let mut b = stream(Duration::ZERO);
        assert!(b.start().is_none());
        let mut b = stream(Duration::from_micros(5));
        b.disable();
        assert!(b.start().is_none());
    }

    #[test]
    fn misses_back_off_exponentially_and_a_hit_resets() {
        let mut b = stream(Duration::from_micros(1));
        // Polls that find nothing: each is followed by 1, 2, 4, ... skipped waits.
        let mut polled_at = Vec::new();
        for wait in 0..40 {
            if let Some(p) = b.start() {
                polled_at.push(wait);
                drop(p);
            }
        }
        assert_eq!(polled_at, vec![0, 2, 5, 10, 19, 36]);
        // Back-off is capped.
        for _ in 0..2000 {
            drop(b.start());
        }
        assert_eq!(b.backoff, MAX_SKIP);
        // A poll that finds something resets it: the next waits poll again.
        while b.skip > 0 {
            assert!(b.start().is_none());
        }
        b.start()
            .expect("polls after the skipped waits")
            .found(false);
        for _ in 0..5 {
            b.start()
                .expect("a stream that found bytes keeps polling")
                .found(false);
        }
    }

    #[test]
    fn budgets_are_capped() {
        let b = stream(Duration::MAX);
        assert_eq!(b.budget, MAX_BUDGET);
        let mut b = stream(Duration::MAX);
        assert!(b.start().expect("polling").more());
    }

    #[test]
    fn a_poll_ends_after_its_budget() {
        let mut b = stream(Duration::from_millis(2));
        let p = b.start().expect("polling");
        assert!(p.more());
        std::thread::sleep(Duration::from_millis(3));
        assert!(!p.more());
    }

    #[test]
    fn streams_stop_polling_while_more_than_the_cap_are_open() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let us = Duration::from_micros(1);
        let mut a = BusyPoll::counted(us, &COUNT, 2);
        let mut b = BusyPoll::counted(us, &COUNT, 2);
        let off = BusyPoll::counted(Duration::ZERO, &COUNT, 2);
        assert_eq!(
            COUNT.load(Ordering::Relaxed),
            2,
            "a stream with polling off is not counted"
        );
        a.start()
            .expect("two streams open, two may poll")
            .found(false);
        let mut c = BusyPoll::counted(us, &COUNT, 2);
        assert!(a.start().is_none() && b.start().is_none() && c.start().is_none());
        // Misses are not counted while over the cap: no back-off builds up.
        assert_eq!((a.skip, b.skip, c.skip), (0, 0, 0));
        c.disable();
        b.start().expect("back at the cap").found(false);
        drop(b);
        assert_eq!(COUNT.load(Ordering::Relaxed), 1);
        drop((a, c, off));
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
    }
}

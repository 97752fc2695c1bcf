//! Progress: what the consumer wrote, and the live line (or periodic log line).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echo::Server;

/// Counters kept by the batch consumer.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    batches: AtomicU64,
    samples: AtomicU64,
    bytes: AtomicU64,
    discarded: AtomicU64,
}

/// A snapshot of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProgressSnapshot {
    /// Batches consumed (written with --out).
    pub(crate) batches: u64,
    /// Samples in those batches.
    pub(crate) samples: u64,
    /// Bytes of .npz files written.
    pub(crate) bytes: u64,
    /// Samples received but not written (after --max-batches, or after a write error).
    pub(crate) discarded: u64,
}

impl Progress {
    pub(crate) fn batch_done(&self, samples: usize, file_bytes: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.samples.fetch_add(samples as u64, Relaxed);
        self.bytes.fetch_add(file_bytes, Relaxed);
    }

    pub(crate) fn discard(&self, samples: usize) {
        self.discarded.fetch_add(samples as u64, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            batches: self.batches.load(Relaxed),
            samples: self.samples.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            discarded: self.discarded.load(Relaxed),
        }
    }
}

/// A tracing writer for stderr that, on a terminal, first clears the live
/// progress line so log lines are not glued to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogWriter {
    pub(crate) tty: bool,
}

/// One log event's writer.
#[derive(Debug)]
pub(crate) struct LogLine {
    tty: bool,
    started: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine {
            tty: self.tty,
            started: false,
        }
    }
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut e = io::stderr().lock();
        if self.tty && !self.started {
            e.write_all(b"\r\x1b[K")?;
        }
        self.started = true;
        e.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Clears the live line (on a terminal).
pub(crate) fn clear_line(tty: bool) {
    if tty {
        let _ = io::stderr().write_all(b"\r\x1b[K");
    }
}

/// Reports progress until aborted: every second on a terminal (one line,
/// redrawn), every ten seconds as a log line otherwise (only when something
/// changed).
pub(crate) async fn report(server: Server, progress: Arc<Progress>, tty: bool) {
    let period = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = (Instant::now(), server.metrics());
    loop {
        tick.tick().await;
        let now = Instant::now();
        let m = server.metrics();
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let samples = m
            .samples_inserted_total
            .saturating_sub(last.1.samples_inserted_total);
        let bytes = m.bytes_received.saturating_sub(last.1.bytes_received);
        let p = progress.snapshot();
        let line = format!(
            "{:.0} samples/s, {:.1} MB/s, {} connections, {} samples, {} batches",
            samples as f64 / dt,
            bytes as f64 / dt / 1e6,
            m.active_connections,
            m.samples_inserted_total,
            p.batches
        );
        if tty {
            let mut e = io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{line}");
            let _ = e.flush();
        } else if samples > 0 || m.active_connections != last.1.active_connections {
            tracing::info!("{line}");
        }
        last = (now, m);
    }
}

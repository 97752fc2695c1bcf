//! What the benchmark programs (`bench_tcp`, `bench_grpc`, `bench_quic`) share:
//! their sample layout and batch size, the consuming loop of a server run as a
//! process of its own, and a process's CPU time and page faults.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::spec::{DType, Leaf, Spec};
use crate::{Server, ServerBuilder};

/// The benchmarks' sample layout for payloads of `payload` bytes:
/// `{"obs": float32[payload / 4 - 1], "reward": float32[]}`.
///
/// # Panics
/// If `payload` is not a multiple of 4 of at least 8 (a benchmark argument).
pub fn spec(payload: usize) -> Spec {
    assert!(
        payload % 4 == 0 && payload >= 8,
        "payload sizes must be multiples of 4 and at least 8, got {payload}"
    );
    Spec::new(vec![
        Leaf::new("obs", vec![(payload / 4 - 1) as u32], DType::Float32),
        Leaf::new("reward", vec![], DType::Float32),
    ])
    .expect("a valid spec")
}

/// Samples per batch for payloads of `payload` bytes: about 8 MiB, at least 4
/// and at most 256.
pub fn batch_size(payload: usize) -> usize {
    ((8 << 20) / payload.max(1)).clamp(4, 256)
}

/// A payload size as a table shows it: `20 B`, `16 KiB`, `1 MiB` (whole
/// KiB or MiB only; otherwise in bytes).
pub fn size_name(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// The median of `values` (the mean of the middle two for an even count; NaN
/// for none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Samples a server process consumed (see [`consume_until_stdin_closes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consumed {
    /// Samples in whole batches.
    pub whole: u64,
    /// Samples in the partial batches handed out at shutdown.
    pub partial: u64,
}

/// Consumes `server`'s batches as fast as they come, on a thread of its own,
/// until this process's standard input closes (the benchmark's signal to
/// stop); then shuts the server down and returns what was consumed.
pub async fn consume_until_stdin_closes(server: Server) -> Consumed {
    let consumer = {
        let server = server.clone();
        std::thread::spawn(move || {
            let mut n = Consumed::default();
            while let Some(b) = server.next_batch_blocking() {
                if b.is_partial() {
                    n.partial += b.len() as u64;
                } else {
                    n.whole += b.len() as u64;
                }
            }
            n
        })
    };
    tokio::task::spawn_blocking(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    })
    .await
    .ok();
    server.shutdown().await.ok();
    tokio::task::spawn_blocking(move || consumer.join().unwrap_or_default())
        .await
        .unwrap_or_default()
}

/// Runs a benchmark's server process to its end: with the allocator set as
/// echo-server sets it ([`server_heap`](crate::heap::server_heap)),
/// `builder`'s server on a 2-thread runtime, listening on `url`; prints `announce(bound URL)` and
/// flushes it (the benchmark reads that line); consumes batches until standard
/// input closes; prints `SAMPLES n`, `n` being what `count` makes of what was
/// consumed.
///
/// # Panics
/// If the runtime cannot start, or the server cannot be built or bind (a
/// benchmark has nothing to measure then).
pub fn server_process(
    builder: ServerBuilder,
    url: &str,
    announce: impl FnOnce(&str) -> String,
    count: impl FnOnce(Consumed) -> u64,
) {
    crate::heap::server_heap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    rt.block_on(async {
        let server = builder.build().expect("the benchmark's server");
        let bound = server.listen(url).await.expect("listen");
        println!("{}", announce(&bound));
        std::io::stdout().flush().ok();
        let n = count(consume_until_stdin_closes(server).await);
        println!("SAMPLES {n}");
    });
}

/// A process a benchmark measures against (a server, or a sink): its standard
/// output is read line by line on a thread of its own, and closing its
/// standard input tells it to stop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `cmd` with piped standard input and output (standard error is
    /// inherited).
    ///
    /// # Panics
    /// If the process cannot be started (naming it).
    pub fn start(name: &str, mut cmd: Command) -> Process {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("a piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Process {
            name: name.to_string(),
            child,
            stdin,
            lines,
        }
    }

    /// The rest of the next line that starts with `prefix` (trimmed), waiting
    /// at most `limit`; other lines are skipped.
    ///
    /// # Panics
    /// If no such line comes in time (naming the process and the prefix).
    pub fn expect(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("{}: no {prefix:?} line within {limit:?}", self.name),
            }
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// This process's CPU time and page faults so far.
    pub fn usage(&self) -> Usage {
        usage(&self.id().to_string())
    }

    /// Closes standard input (the stop signal), waits for the process to end
    /// (killing it after 30 s), and returns the `n` of the last `SAMPLES n`
    /// line it printed, if any.
    pub fn stop(mut self) -> Option<u64> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut samples = None;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    if let Some(n) = l.strip_prefix("SAMPLES ") {
                        samples = n.trim().parse().ok();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        samples
    }
}

/// CPU time and page faults of a process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds.
    pub cpu: f64,
    /// Minor page faults: fresh pages the kernel had to map (and zero).
    pub faults: f64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;

    fn sub(self, before: Usage) -> Usage {
        Usage {
            cpu: self.cpu - before.cpu,
            faults: self.faults - before.faults,
        }
    }
}

/// A process's usage (`"self"` or a pid), from `/proc/PID/stat` (Linux; NaN
/// where it cannot be read).
pub fn usage(pid: &str) -> Usage {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Usage {
            cpu: f64::NAN,
            faults: f64::NAN,
        };
    };
    // The fields after the command name (which may contain spaces and
    // parentheses): minflt, utime and stime are fields 10, 14 and 15, i.e. 7,
    // 11 and 12 after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Usage {
        cpu: (num(11) + num(12)) / 100.0,
        faults: num(7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_batches() {
        let s = spec(1 << 20);
        assert_eq!(s.payload_size(), 1 << 20);
        assert_eq!(batch_size(20), 256);
        assert_eq!(batch_size(1 << 20), 8);
        assert_eq!(batch_size(16 << 20), 4);
        assert_eq!(
            [
                size_name(20),
                size_name(16384),
                size_name(1 << 20),
                size_name(1536)
            ],
            ["20 B", "16 KiB", "1 MiB", "1536 B"]
        );
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
    }

    #[test]
    fn a_process_is_read_by_line_and_stopped_by_closing_its_input() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo hello; echo PORT 4242; cat >/dev/null; echo SAMPLES 17",
        ]);
        let mut p = Process::start("sh", cmd);
        assert_eq!(p.expect("PORT ", Duration::from_secs(10)), "4242");
        assert!(p.usage().cpu >= 0.0);
        assert_eq!(p.stop(), Some(17));
    }

    #[test]
    fn this_process_uses_cpu_and_pages() {
        let before = usage("self");
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box((x, &v));
        let used = usage("self") - before;
        assert!(used.faults >= 1000.0, "{used:?}");
        assert!(used.cpu >= 0.0 && used.cpu.is_finite(), "{used:?}");
        assert!(usage("no-such-pid").cpu.is_nan());
    }
}

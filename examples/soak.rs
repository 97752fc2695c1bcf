//! A soak run: many clients send to one server per transport for a set time,
//! with clients dropped at random and replaced, then the server shuts down under
//! full load. Not part of CI (it runs for minutes); its last results are in
//! RELIABILITY.md.
//!
//! ```text
//! cargo run --release --features full --example soak -- --duration 60s --clients 16
//! cargo run --release --features full --example soak -- \
//!     --duration 3m --clients 32 --transports tcp,unix,grpc,quic,mem --size 1024 \
//!     --fault-every 2s --report-every 10s
//! ```
//!
//! For each transport in turn it starts a server and `--clients` clients that send
//! as fast as their window (`--inflight`) allows. Every payload carries its
//! client id and sequence number, and its other bytes derive from both, so the
//! consumer checks each sample byte for byte and tracks, per client, that nothing
//! arrives twice. Every `--fault-every`, one client chosen at random drops its
//! connection without waiting for its acks (as a killed worker would), and a new
//! client with a fresh id takes its place. After `--duration` the server shuts
//! down while every client is still sending.
//!
//! Checked at the end, per client id: every acknowledged sample arrived, exactly
//! once and byte-exact; nothing arrived that was not sent; every client still
//! sending at the shutdown got `ConnectionClosed` within 30 s. Reported: samples/s, MB/s, CPU
//! time per sample (user + sys of the whole process, clients included), the
//! process's resident set over time, faults, errors and losses. The process
//! exits non-zero if anything was lost, duplicated, corrupted, or hung.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use echo::{Batch, ClientOptions, Server, Spec};

/// Soak every compiled-in transport with many clients and random client faults.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// How long each transport runs (e.g. 90s, 5m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent clients per transport.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Transports to soak, in order.
    #[arg(long, value_delimiter = ',', default_value = "tcp,unix,grpc,quic,mem")]
    transports: Vec<String>,
    /// Bytes per sample (at least 16).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Most unacknowledged samples per client.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// QUIC streams per client (more than 1 keeps order per stream only).
    #[arg(long, default_value_t = 1)]
    quic_streams: usize,
    /// How often a random client drops its connection and is replaced (0s: never).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    fault_every: Duration,
    /// How often to sample the resident set and print a progress line.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    report_every: Duration,
    /// Seed for choosing which client fails.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 90s, 5m or 1h, got {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

// ---------------------------------------------------------------------------
// Payloads: client id, sequence number, then words derived from both.

fn seed_of(client: u32, seq: u32) -> u64 {
    // splitmix64 of (client, seq)
    let mut z = (u64::from(client) << 32 | u64::from(seq)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn fill(out: &mut [u8], client: u32, seq: u32) {
    out[0..4].copy_from_slice(&client.to_le_bytes());
    out[4..8].copy_from_slice(&seq.to_le_bytes());
    let seed = seed_of(client, seq);
    for (i, chunk) in out[8..].chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seed, i).to_le_bytes()[..chunk.len()]);
    }
}

/// `(client, seq)` if the payload is byte-exact, else `None`.
fn check(p: &[u8]) -> Option<(u32, u32)> {
    let client = u32::from_le_bytes(p[0..4].try_into().ok()?);
    let seq = u32::from_le_bytes(p[4..8].try_into().ok()?);
    let seed = seed_of(client, seq);
    let exact = p[8..]
        .chunks(8)
        .enumerate()
        .all(|(i, c)| c == &word(seed, i).to_le_bytes()[..c.len()]);
    exact.then_some((client, seq))
}

// ---------------------------------------------------------------------------
// The consumer's per-client tracking (memory bounded by the reordering window).

#[derive(Debug, Default)]
struct Track {
    /// Every seq below this arrived.
    next: u32,
    /// Seqs at or above `next` that arrived (out of order, multi-stream only).
    ahead: BTreeSet<u32>,
    /// Samples that arrived.
    count: u64,
    /// The highest seq that arrived, plus one.
    end: u32,
}

#[derive(Debug, Default)]
struct Consumed {
    tracks: HashMap<u32, Track>,
    samples: u64,
    batches: u64,
    duplicates: u64,
    corrupt: u64,
    /// Samples that arrived ahead of an earlier one of their client.
    reordered: u64,
}

impl Track {
    /// How many of seqs `0..n` arrived.
    fn arrived_below(&self, n: u32) -> u64 {
        if self.next >= n {
            return u64::from(n);
        }
        u64::from(self.next) + self.ahead.range(self.next..n).count() as u64
    }
}

impl Consumed {
    fn take(&mut self, batch: &Batch, size: usize) {
        self.batches += 1;
        for p in batch.leaf(0).bytes().chunks_exact(size) {
            self.samples += 1;
            let Some((client, seq)) = check(p) else {
                self.corrupt += 1;
                continue;
            };
            let t = self.tracks.entry(client).or_default();
            if seq == t.next {
                t.next += 1;
                while t.ahead.first() == Some(&t.next) {
                    t.ahead.pop_first();
                    t.next += 1;
                }
            } else if seq < t.next || !t.ahead.insert(seq) {
                self.duplicates += 1;
                continue;
            } else {
                self.reordered += 1;
            }
            t.count += 1;
            t.end = t.end.max(seq + 1);
        }
    }
}

// ---------------------------------------------------------------------------
// Clients.

/// How a client's life ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// Dropped on purpose, without waiting for acks.
    Dropped,
    /// `ConnectionClosed` after the server began shutting down.
    ClosedByShutdown,
    /// Anything else (an error).
    Failed(String),
}

#[derive(Debug, Clone)]
struct Life {
    id: u32,
    sent: u64,
    acked: u64,
    end: End,
}

struct Shared {
    url: String,
    spec: Spec,
    opts: ClientOptions,
    next_id: AtomicU32,
    /// Client slot -> "drop your connection now".
    fault: Vec<AtomicBool>,
    shutting_down: AtomicBool,
    lives: Mutex<Vec<Life>>,
    sent_total: AtomicU64,
}

/// Runs client slot `slot`: one client after another (a new id after each
/// fault) until the server shuts down.
async fn client_slot(shared: Arc<Shared>, slot: usize) {
    let size = shared.spec.payload_size();
    let mut buf = vec![0u8; size];
    while !shared.shutting_down.load(Ordering::Relaxed) {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut client = match echo::registry()
            .connect(&shared.url, &shared.spec, &shared.opts)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let end = if shared.shutting_down.load(Ordering::Relaxed) {
                    End::ClosedByShutdown
                } else {
                    End::Failed(format!("connect: {e}"))
                };
                let failed = matches!(end, End::Failed(_));
                shared.lives.lock().unwrap().push(Life {
                    id,
                    sent: 0,
                    acked: 0,
                    end,
                });
                if failed {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let mut seq = 0u32;
        let end = loop {
            if shared.fault[slot].swap(false, Ordering::Relaxed) {
                break End::Dropped;
            }
            fill(&mut buf, id, seq);
            match client.send(&buf).await {
                Ok(()) => {
                    seq += 1;
                    shared.sent_total.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.is_closed() && shared.shutting_down.load(Ordering::Relaxed) => {
                    break End::ClosedByShutdown
                }
                Err(e) => break End::Failed(e.to_string()),
            }
        };
        let acked = client.stats().acked;
        if end != End::Dropped {
            let _ = client.close().await;
        }
        drop(client); // for `Dropped`: abruptly, acks outstanding
        shared.lives.lock().unwrap().push(Life {
            id,
            sent: u64::from(seq),
            acked,
            end,
        });
    }
}

// ---------------------------------------------------------------------------
// Process figures from /proc.

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(ticks as f64 / hz)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// One transport.

#[derive(Debug, Default)]
struct Outcome {
    transport: String,
    secs: f64,
    samples: u64,
    cpu_us_per_sample: f64,
    rss_start: f64,
    rss_end: f64,
    rss_max: f64,
    rss_series: Vec<f64>,
    lives: usize,
    faults: u64,
    dropped: u64,
    errors: Vec<String>,
    lost: u64,
    duplicates: u64,
    corrupt: u64,
    beyond_sent: u64,
    reordered: u64,
    shutdown_closed: usize,
    hung: usize,
    shutdown_secs: f64,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.errors.is_empty()
            && self.lost == 0
            && self.duplicates == 0
            && self.corrupt == 0
            && self.beyond_sent == 0
            && self.reordered == 0
            && self.hung == 0
    }
}

fn bind_url(scheme: &str, dir: &std::path::Path) -> Option<String> {
    Some(match scheme {
        "mem" => format!("mem://soak-{}", std::process::id()),
        "tcp" => "tcp://127.0.0.1:0".into(),
        "unix" => format!("unix://{}", dir.join("soak.sock").display()),
        "grpc" => "grpc://127.0.0.1:0".into(),
        "quic" => "quic://127.0.0.1:0".into(),
        _ => return None,
    })
}

async fn soak(scheme: &str, args: &Args, dir: &std::path::Path) -> Result<Outcome, String> {
    let bind = bind_url(scheme, dir)
        .ok_or_else(|| format!("no soak setup for {scheme}://; try tcp, unix, grpc, quic, mem"))?;
    let spec = Spec::bytes(args.size as u32).map_err(|e| e.to_string())?;
    let server = Server::builder(spec.clone())
        .batch_size(args.batch)
        .registry(echo::registry())
        .build()
        .map_err(|e| e.to_string())?;
    let mut url = server.listen(&bind).await.map_err(|e| e.to_string())?;
    if scheme == "quic" && args.quic_streams != 1 {
        url.push_str(&format!("&streams={}", args.quic_streams));
    }
    let mut out = Outcome {
        transport: scheme.to_string(),
        rss_start: rss_mib(),
        ..Outcome::default()
    };
    eprintln!(
        "== {scheme}: {} clients, {} B samples, {} per batch, window {}, for {:?}; load {}",
        args.clients,
        args.size,
        args.batch,
        args.inflight,
        args.duration,
        loadavg()
    );

    // The consumer, on a thread of its own.
    let consumer = {
        let server = server.clone();
        let size = args.size;
        std::thread::spawn(move || {
            let mut c = Consumed::default();
            while let Some(batch) = server.next_batch_blocking() {
                c.take(&batch, size);
            }
            c
        })
    };
    let shared = Arc::new(Shared {
        url,
        spec,
        opts: ClientOptions {
            max_inflight: args.inflight,
            ..ClientOptions::default()
        },
        next_id: AtomicU32::new(0),
        fault: (0..args.clients).map(|_| AtomicBool::new(false)).collect(),
        shutting_down: AtomicBool::new(false),
        lives: Mutex::new(Vec::new()),
        sent_total: AtomicU64::new(0),
    });
    let slots: Vec<_> = (0..args.clients)
        .map(|slot| tokio::spawn(client_slot(shared.clone(), slot)))
        .collect();

    // Run: faults and figures.
    let start = Instant::now();
    let cpu0 = cpu_time();
    let mut rng = args.seed | 1;
    let mut next_fault = start + args.fault_every;
    let mut next_report = start + args.report_every;
    let (mut last_t, mut last_n) = (start, 0u64);
    out.rss_series.push(out.rss_start);
    while start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        if !args.fault_every.is_zero() && now >= next_fault {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            shared.fault[(rng % args.clients as u64) as usize].store(true, Ordering::Relaxed);
            out.faults += 1;
            next_fault += args.fault_every;
        }
        let rss = rss_mib();
        out.rss_max = out.rss_max.max(rss);
        if now >= next_report {
            let n = server.metrics().samples_inserted_total;
            let rate = (n - last_n) as f64 / (now - last_t).as_secs_f64();
            let failed = shared
                .lives
                .lock()
                .unwrap()
                .iter()
                .filter(|l| matches!(l.end, End::Failed(_)))
                .count();
            eprintln!(
                "{scheme} {:>6.0}s: {rate:>9.0} samples/s, RSS {rss:>7.1} MiB, {} connections, \
                 {} faults, {failed} errors, load {}",
                start.elapsed().as_secs_f64(),
                server.metrics().active_connections,
                out.faults,
                loadavg()
            );
            out.rss_series.push(rss);
            (last_t, last_n) = (now, n);
            next_report += args.report_every;
        }
    }

    // Shutdown under full load.
    shared.shutting_down.store(true, Ordering::Relaxed);
    let t = Instant::now();
    server.shutdown().await.map_err(|e| e.to_string())?;
    out.shutdown_secs = t.elapsed().as_secs_f64();
    for s in slots {
        match tokio::time::timeout(Duration::from_secs(30), s).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => out.errors.push(format!("client task: {e}")),
            Err(_) => out.hung += 1,
        }
    }
    let consumed = tokio::task::spawn_blocking(move || consumer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the consumer panicked".to_string())?;
    out.secs = start.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0);
    out.rss_end = rss_mib();
    out.rss_max = out.rss_max.max(out.rss_end);
    out.rss_series.push(out.rss_end);
    // Multi-stream QUIC clients keep order per stream only.
    let ordered = scheme != "quic" || args.quic_streams == 1;
    out.samples = consumed.samples;
    out.cpu_us_per_sample = cpu.as_secs_f64() * 1e6 / consumed.samples.max(1) as f64;
    out.duplicates = consumed.duplicates;
    out.corrupt = consumed.corrupt;
    if ordered {
        out.reordered = consumed.reordered;
    }

    // Per client id: acked <= arrived <= sent (+1 for a send cut short).
    let lives = shared.lives.lock().unwrap().clone();
    out.lives = lives.len();
    for life in &lives {
        let none = Track::default();
        let t = consumed.tracks.get(&life.id).unwrap_or(&none);
        // The acknowledged ones are seqs 0..acked (acks are cumulative, and a
        // client sends its seqs in order).
        let acked = u32::try_from(life.acked).unwrap_or(u32::MAX);
        out.lost += life.acked - t.arrived_below(acked);
        // A dropped client stopped between sends; any other may have had one send
        // cut short, whose payload may still have arrived.
        let may = life.sent + u64::from(life.end != End::Dropped);
        out.beyond_sent += u64::from(t.end).saturating_sub(may);
        match &life.end {
            End::Failed(e) => {
                if out.errors.len() < 5 {
                    out.errors.push(format!("client {}: {e}", life.id));
                }
            }
            End::ClosedByShutdown => out.shutdown_closed += 1,
            End::Dropped => out.dropped += 1,
        }
    }
    let known: std::collections::HashSet<u32> = lives.iter().map(|l| l.id).collect();
    if let Some(stray) = consumed.tracks.keys().find(|id| !known.contains(id)) {
        out.errors
            .push(format!("samples of client {stray}, which never ran"));
    }
    let sent = shared.sent_total.load(Ordering::Relaxed);
    eprintln!(
        "{scheme}: {} samples delivered of {sent} sent in {:.0} s ({} batches); shutdown took {:.2} s; \
         {} client lives; load {}",
        consumed.samples,
        out.secs,
        consumed.batches,
        out.shutdown_secs,
        out.lives,
        loadavg()
    );
    Ok(out)
}

fn main() {
    let args = Args::parse();
    assert!(args.size >= 16, "--size must be at least 16 bytes");
    assert!(args.clients >= 1, "--clients must be at least 1");
    let dir = tempfile::tempdir().expect("a temp dir");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let available = echo::registry().schemes();
    let mut outcomes = Vec::new();
    for scheme in &args.transports {
        if !available.iter().any(|s| s == scheme) {
            eprintln!("{scheme}: not compiled in (available: {available:?})");
            std::process::exit(2);
        }
        match rt.block_on(soak(scheme, &args, dir.path())) {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("{scheme}: {e}");
                std::process::exit(2);
            }
        }
    }
    println!(
        "\n| transport | s | samples/s | MB/s | CPU µs/sample | RSS start / max / end MiB | clients dropped | client lives | errors | lost | dup | corrupt | beyond sent | out of order | shutdown: closed / hung | shutdown s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        let rate = o.samples as f64 / o.secs;
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.2} | {:.1} / {:.1} / {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.2} |",
            o.transport,
            o.secs,
            rate,
            rate * args.size as f64 / 1e6,
            o.cpu_us_per_sample,
            o.rss_start,
            o.rss_max,
            o.rss_end,
            o.dropped,
            o.lives,
            o.errors.len(),
            o.lost,
            o.duplicates,
            o.corrupt,
            o.beyond_sent,
            o.reordered,
            o.shutdown_closed,
            o.hung,
            o.shutdown_secs,
        );
    }
    println!(
        "\nRSS (MiB) every {:?}, from the start to after the shutdown:",
        args.report_every
    );
    for o in &outcomes {
        let series: Vec<String> = o.rss_series.iter().map(|r| format!("{r:.0}")).collect();
        println!("- {}: {}", o.transport, series.join(" "));
    }
    let mut failed = false;
    for o in &outcomes {
        for e in &o.errors {
            println!("{}: {e}", o.transport);
        }
        failed |= !o.ok();
    }
    if failed {
        println!(
            "\nFAILED: something was lost, duplicated, corrupted, out of order, hung or failed (above)"
        );
        std::process::exit(1);
    }
    println!("\nOK: every acknowledged sample arrived exactly once, byte-exact");
}

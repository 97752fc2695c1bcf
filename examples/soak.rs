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
//! as fast as their window (`--inflight`) allows. The clients run in a child
//! process (this program again), so that the server's resident set and CPU time
//! are measured apart from theirs; `mem://`, which works within one process
//! only, and `--clients-in-process` keep them in the server's process.
//!
//! Every payload carries its client id and sequence number, and its other bytes
//! derive from both, so the consumer checks each sample byte for byte and
//! tracks, per client, that nothing arrives twice. Every `--fault-every`, one
//! client chosen at random drops its connection without waiting for its acks (as
//! a killed worker would), and a new client with a fresh id takes its place.
//! After `--duration` the server shuts down while every client is still sending.
//!
//! Checked at the end, per client id: every acknowledged sample arrived, exactly
//! once and byte-exact, in order (except with several QUIC streams); nothing
//! arrived that was not sent; every client still sending at the shutdown got
//! `ConnectionClosed` within 30 s. Reported: samples/s, MB/s, CPU time per
//! sample (user + sys) of the server's process and of the clients', both
//! processes' resident sets over time, faults, errors and losses. The program
//! exits non-zero if anything was lost, duplicated, corrupted, out of order, or
//! hung.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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
    /// How often to print a progress line and record the resident sets.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    report_every: Duration,
    /// Seed for choosing which client fails.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the clients in the server's process (mem:// always does).
    #[arg(long)]
    clients_in_process: bool,
    /// Internal: run as the client process for this URL.
    #[arg(long, hide = true)]
    client_process_for: Option<String>,
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

impl Shared {
    fn new(url: String, args: &Args) -> Arc<Shared> {
        Arc::new(Shared {
            url,
            spec: Spec::bytes(args.size as u32).expect("a valid --size"),
            opts: ClientOptions {
                max_inflight: args.inflight,
                ..ClientOptions::default()
            },
            next_id: AtomicU32::new(0),
            fault: (0..args.clients).map(|_| AtomicBool::new(false)).collect(),
            shutting_down: AtomicBool::new(false),
            lives: Mutex::new(Vec::new()),
            sent_total: AtomicU64::new(0),
        })
    }
}

/// Runs every client slot, dropping a random client every `fault_every`, until
/// `shared.shutting_down` is set; then waits up to 30 s for the slots to see the
/// shutdown. Returns how many did not (hung).
async fn run_clients(shared: Arc<Shared>, fault_every: Duration, seed: u64) -> usize {
    let n = shared.fault.len();
    let slots: Vec<_> = (0..n)
        .map(|slot| tokio::spawn(client_slot(shared.clone(), slot)))
        .collect();
    let mut rng = seed | 1;
    let mut next_fault = Instant::now() + fault_every;
    while !shared.shutting_down.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !fault_every.is_zero() && Instant::now() >= next_fault {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            shared.fault[(rng % n as u64) as usize].store(true, Ordering::Relaxed);
            next_fault += fault_every;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut hung = 0;
    for s in slots {
        match tokio::time::timeout_at(deadline, s).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.lives.lock().unwrap().push(Life {
                id: u32::MAX,
                sent: 0,
                acked: 0,
                end: End::Failed(format!("client task: {e}")),
            }),
            Err(_) => hung += 1,
        }
    }
    hung
}

// ---------------------------------------------------------------------------
// The client process: told to begin and to stop on stdin, reports on stdout.

fn client_process(args: &Args, url: &str) {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let shared = Shared::new(url.to_string(), args);
    {
        let shared = shared.clone();
        std::thread::spawn(move || {
            // "shutdown" (or the parent going away) stops the clients.
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            shared.shutting_down.store(true, Ordering::Relaxed);
            println!("shutting down");
            std::io::stdout().flush().unwrap();
        });
    }
    let hung = rt.block_on(run_clients(shared.clone(), args.fault_every, args.seed));
    let mut out = std::io::stdout().lock();
    for l in shared.lives.lock().unwrap().iter() {
        let end = match &l.end {
            End::Dropped => "dropped".to_string(),
            End::ClosedByShutdown => "shutdown".to_string(),
            End::Failed(e) => format!("failed {}", e.replace('\n', " ")),
        };
        writeln!(out, "life {} {} {} {end}", l.id, l.sent, l.acked).unwrap();
    }
    writeln!(out, "hung {hung}").unwrap();
    writeln!(out, "cpu {}", cpu_time(None).as_secs_f64()).unwrap();
    writeln!(out, "sent {}", shared.sent_total.load(Ordering::Relaxed)).unwrap();
    out.flush().unwrap();
}

fn parse_life(line: &str) -> Option<Life> {
    let mut f = line.strip_prefix("life ")?.splitn(4, ' ');
    let id = f.next()?.parse().ok()?;
    let sent = f.next()?.parse().ok()?;
    let acked = f.next()?.parse().ok()?;
    let end = match f.next()? {
        "dropped" => End::Dropped,
        "shutdown" => End::ClosedByShutdown,
        other => End::Failed(other.strip_prefix("failed ").unwrap_or(other).to_string()),
    };
    Some(Life {
        id,
        sent,
        acked,
        end,
    })
}

/// The clients of one run, in this process or in a child process.
enum Clients {
    Here {
        shared: Arc<Shared>,
        task: tokio::task::JoinHandle<usize>,
    },
    Child {
        child: std::process::Child,
        lines: mpsc::Receiver<String>,
    },
}

/// What the clients reported at the end.
#[derive(Debug, Default)]
struct ClientReport {
    lives: Vec<Life>,
    hung: usize,
    cpu: Option<Duration>,
    sent: u64,
}

impl Clients {
    fn start(url: &str, args: &Args, in_process: bool) -> Clients {
        if in_process {
            let shared = Shared::new(url.to_string(), args);
            let task = tokio::spawn(run_clients(shared.clone(), args.fault_every, args.seed));
            return Clients::Here { shared, task };
        }
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .args(["--client-process-for", url])
            .args(["--clients", &args.clients.to_string()])
            .args(["--size", &args.size.to_string()])
            .args(["--inflight", &args.inflight.to_string()])
            .args([
                "--fault-every",
                &format!("{}ms", args.fault_every.as_millis()),
            ])
            .args(["--seed", &args.seed.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the client process starts");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Clients::Child { child, lines }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Clients::Here { .. } => None,
            Clients::Child { child, .. } => Some(child.id()),
        }
    }

    /// Tells the clients the server is about to shut down, and waits until they
    /// know (so that `ConnectionClosed` from then on is expected).
    async fn announce_shutdown(&mut self) -> Result<(), String> {
        match self {
            Clients::Here { shared, .. } => {
                shared.shutting_down.store(true, Ordering::Relaxed);
                Ok(())
            }
            Clients::Child { child, lines } => {
                let mut stdin = child.stdin.take().ok_or("the client process's stdin")?;
                writeln!(stdin, "shutdown").map_err(|e| format!("client process: {e}"))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(l) if l == "shutting down" => return Ok(()),
                        Ok(_) => {}
                        Err(_) => return Err("the client process did not answer".into()),
                    }
                }
            }
        }
    }

    /// Waits for the clients to finish (60 s at most) and collects their report.
    async fn finish(self) -> Result<ClientReport, String> {
        match self {
            Clients::Here { shared, task } => {
                let hung = task.await.map_err(|e| e.to_string())?;
                Ok(ClientReport {
                    lives: shared.lives.lock().unwrap().clone(),
                    hung,
                    cpu: None,
                    sent: shared.sent_total.load(Ordering::Relaxed),
                })
            }
            Clients::Child { mut child, lines } => tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut report = ClientReport::default();
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match lines.recv_timeout(left) {
                        Ok(l) => {
                            if let Some(life) = parse_life(&l) {
                                report.lives.push(life);
                            } else if let Some(n) = l.strip_prefix("hung ") {
                                report.hung = n.parse().unwrap_or(usize::MAX);
                            } else if let Some(s) = l.strip_prefix("cpu ") {
                                report.cpu = s.parse().ok().map(Duration::from_secs_f64);
                            } else if let Some(n) = l.strip_prefix("sent ") {
                                report.sent = n.parse().unwrap_or(0);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = child.kill();
                            let _ = child.wait();
                            return Err("the client process hung".to_string());
                        }
                    }
                }
                let status = child.wait().map_err(|e| e.to_string())?;
                if !status.success() || report.cpu.is_none() {
                    return Err(format!("the client process failed ({status})"));
                }
                Ok(report)
            })
            .await
            .map_err(|e| e.to_string())?,
        }
    }
}

// ---------------------------------------------------------------------------
// Process figures from /proc.

fn proc_file(pid: Option<u32>, name: &str) -> String {
    let path = match pid {
        Some(p) => format!("/proc/{p}/{name}"),
        None => format!("/proc/self/{name}"),
    };
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The resident set of a process (this one for `None`), in MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    let kib: f64 = proc_file(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// User + system CPU time of a process (this one for `None`).
fn cpu_time(pid: Option<u32>) -> Duration {
    let stat = proc_file(pid, "stat");
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
    clients_apart: bool,
    secs: f64,
    samples: u64,
    server_cpu_us: f64,
    client_cpu_us: Option<f64>,
    rss_start: f64,
    rss_end: f64,
    rss_max: f64,
    rss_series: Vec<f64>,
    client_rss_max: f64,
    client_rss_series: Vec<f64>,
    lives: usize,
    dropped: u64,
    errors: Vec<String>,
    error_count: usize,
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
        self.error_count == 0
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
    let apart = scheme != "mem" && !args.clients_in_process;
    let mut out = Outcome {
        transport: scheme.to_string(),
        clients_apart: apart,
        rss_start: rss_mib(None),
        ..Outcome::default()
    };
    eprintln!(
        "== {scheme}: {} clients ({}), {} B samples, {} per batch, window {}, for {:?}; load {}",
        args.clients,
        if apart {
            "in a child process"
        } else {
            "in this process"
        },
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
    let mut clients = Clients::start(&url, args, !apart);
    let pid = clients.pid();

    // Run, sampling figures.
    let start = Instant::now();
    let cpu0 = cpu_time(None);
    let mut next_report = start + args.report_every;
    let (mut last_t, mut last_n) = (start, 0u64);
    out.rss_series.push(out.rss_start);
    while start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        let rss = rss_mib(None);
        out.rss_max = out.rss_max.max(rss);
        let client_rss = pid.map_or(0.0, |p| rss_mib(Some(p)));
        out.client_rss_max = out.client_rss_max.max(client_rss);
        if now >= next_report {
            let m = server.metrics();
            let n = m.samples_inserted_total;
            let rate = (n - last_n) as f64 / (now - last_t).as_secs_f64();
            eprintln!(
                "{scheme} {:>5.0}s: {rate:>8.0} samples/s, RSS {rss:>6.1} MiB{}, {} connections, \
                 load {}",
                start.elapsed().as_secs_f64(),
                if apart {
                    format!(" (clients {client_rss:.1} MiB)")
                } else {
                    String::new()
                },
                m.active_connections,
                loadavg()
            );
            out.rss_series.push(rss);
            out.client_rss_series.push(client_rss);
            (last_t, last_n) = (now, n);
            next_report += args.report_every;
        }
    }

    // Shutdown under full load.
    clients.announce_shutdown().await?;
    let t = Instant::now();
    server.shutdown().await.map_err(|e| e.to_string())?;
    out.shutdown_secs = t.elapsed().as_secs_f64();
    let report = clients.finish().await?;
    let consumed = tokio::task::spawn_blocking(move || consumer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the consumer panicked".to_string())?;
    out.secs = start.elapsed().as_secs_f64();
    let cpu = cpu_time(None).saturating_sub(cpu0);
    out.rss_end = rss_mib(None);
    out.rss_max = out.rss_max.max(out.rss_end);
    out.rss_series.push(out.rss_end);
    let samples = consumed.samples.max(1) as f64;
    out.server_cpu_us = cpu.as_secs_f64() * 1e6 / samples;
    out.client_cpu_us = report.cpu.map(|c| c.as_secs_f64() * 1e6 / samples);
    out.hung = report.hung;
    // Multi-stream QUIC clients keep order per stream only.
    let ordered = scheme != "quic" || args.quic_streams == 1;
    out.samples = consumed.samples;
    out.duplicates = consumed.duplicates;
    out.corrupt = consumed.corrupt;
    if ordered {
        out.reordered = consumed.reordered;
    }

    // Per client id: acked <= arrived <= sent (+1 for a send cut short).
    out.lives = report.lives.len();
    for life in &report.lives {
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
                out.error_count += 1;
                if out.errors.len() < 5 {
                    out.errors.push(format!("client {}: {e}", life.id));
                }
            }
            End::ClosedByShutdown => out.shutdown_closed += 1,
            End::Dropped => out.dropped += 1,
        }
    }
    let known: std::collections::HashSet<u32> = report.lives.iter().map(|l| l.id).collect();
    if let Some(stray) = consumed.tracks.keys().find(|id| !known.contains(id)) {
        out.error_count += 1;
        out.errors
            .push(format!("samples of client {stray}, which never ran"));
    }
    eprintln!(
        "{scheme}: {} samples delivered of {} sent in {:.0} s ({} batches); shutdown took \
         {:.2} s; {} client lives; load {}",
        consumed.samples,
        report.sent,
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
    if let Some(url) = &args.client_process_for {
        client_process(&args, url);
        return;
    }
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
        "\n| transport | s | samples/s | MB/s | CPU µs/sample server / clients | server RSS start / max / end MiB | clients' RSS max MiB | clients dropped | client lives | errors | lost | dup | corrupt | beyond sent | out of order | shutdown: closed / hung | shutdown s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        let rate = o.samples as f64 / o.secs;
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {} | {:.1} / {:.1} / {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.2} |",
            o.transport,
            o.secs,
            rate,
            rate * args.size as f64 / 1e6,
            match o.client_cpu_us {
                Some(c) => format!("{:.2} / {c:.2}", o.server_cpu_us),
                None => format!("{:.2} (both)", o.server_cpu_us),
            },
            o.rss_start,
            o.rss_max,
            o.rss_end,
            if o.clients_apart {
                format!("{:.1}", o.client_rss_max)
            } else {
                "(in process)".to_string()
            },
            o.dropped,
            o.lives,
            o.error_count,
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
        "\nResident sets (MiB) every {:?}, from the start to after the shutdown:",
        args.report_every
    );
    for o in &outcomes {
        let series = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("- {} server: {}", o.transport, series(&o.rss_series));
        if o.clients_apart {
            println!(
                "- {} clients: {}",
                o.transport,
                series(&o.client_rss_series)
            );
        }
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

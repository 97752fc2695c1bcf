//! Side-by-side TCP benchmark: our server vs id-echo 0.2.1's, under the same Rust
//! load generator (our `TcpClient`), against a raw loopback stream as the ceiling;
//! then id-echo's Python `TcpClient` against both servers.
//!
//! ```text
//! bash scripts/setup-python.sh            # id-echo 0.2.1 in .venv
//! cargo run --release -p echo-tcp --example bench_tcp            # full run (a few minutes)
//! cargo run --release -p echo-tcp --example bench_tcp -- --quick # a smoke run
//! ```
//!
//! Every server runs in its own process (this binary with `--role sink`, or
//! `python/id_echo_bench.py serve`), consuming batches as fast as it can; the load
//! generator is this process: N clients on a 2-thread Tokio runtime, each sending
//! the same pre-built payload with `max_inflight` unacknowledged, for a fixed time,
//! then waiting for every ack. A rate is acknowledged samples / elapsed time.
//!
//! The ceiling opens N plain TCP connections to a sink that reads and discards, and
//! writes 1 MiB buffers for the same time; the sink confirms it read everything.
//!
//! Sample layout for a payload of P bytes: `{"obs": float32[P/4 - 1], "reward":
//! float32[]}` (id-echo's README example at P = 20).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use echo_core::testkit::bench::{self, usage};
use echo_core::{ClientOptions, Server};
use echo_tcp::TcpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug, Clone)]
#[command(about = "echo-tcp vs id-echo vs raw loopback TCP")]
struct Args {
    /// Short runs (0.3 s per cell) to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Seconds per measurement (default 1.5, or 0.3 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Interleaved repetitions of every measurement; tables show medians
    /// (default 3, or 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Payload sizes in bytes (multiples of 4, at least 8).
    #[arg(long, value_delimiter = ',', default_value = "20,16384,1048576")]
    sizes: Vec<usize>,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Unacknowledged payloads per client.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// What to measure: raw, raw-lowat (the raw sink with our server's
    /// socket tuning for large payloads), floor (a plain blocking ping-pong of
    /// `max_inflight` payloads and as many one-byte acks: the best one client
    /// can do when every payload waits for its ack), ours, id-echo, py
    /// (id-echo's Python TcpClient).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,raw-lowat,floor,ours,id-echo,py"
    )]
    targets: Vec<String>,
    /// Drainer threads of our server.
    #[arg(long, default_value_t = 1)]
    drainers: usize,
    /// Internal: run as a server process (`sink` = ours, `raw-sink`, `floor-sink`).
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: for `--role raw-sink`, tune each socket as our server does for
    /// 1 MiB payloads.
    #[arg(long, hide = true)]
    lowat: bool,
    /// Internal: payload size for `--role`.
    #[arg(long, hide = true, default_value_t = 20)]
    payload: usize,
}

// ---------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------

/// Our server: prints `PORT p`, consumes batches until stdin closes, prints
/// `SAMPLES n` (samples in whole batches).
fn run_sink(args: &Args) {
    let builder = Server::builder(bench::spec(args.payload))
        .batch_size(bench::batch_size(args.payload))
        .drainers(args.drainers)
        .registry(echo_tcp::registry());
    let port = |u: &str| format!("PORT {}", u.rsplit(':').next().unwrap_or("0"));
    bench::server_process(builder, "tcp://127.0.0.1:0", port, |n| n.whole);
}

/// Sets `SO_RCVLOWAT`, as our server does for payloads of `ps` bytes: first to
/// two payloads (Linux grows the receive buffer to fit), then to one, so a read
/// wakes only when a whole payload is queued.
fn tune_like_ours(s: &std::net::TcpStream, ps: usize) {
    use std::os::fd::AsRawFd;
    for bytes in [2 * ps, ps] {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: SO_RCVLOWAT takes a c_int; the pointer and length describe `v`.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert!(r == 0, "SO_RCVLOWAT: {}", std::io::Error::last_os_error());
    }
}

/// A plain sink process: prints `PORT p`, serves each connection with `serve`
/// on a thread of its own, and exits when stdin closes.
fn run_thread_sink(serve: impl Fn(std::net::TcpStream) + Copy + Send + 'static) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("PORT {}", l.local_addr().expect("addr").port());
    std::io::stdout().flush().ok();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// Raw ceiling sink: reads and discards each connection to EOF, then writes one
/// byte. With `lowat`, each socket is tuned like our server's for 1 MiB payloads.
fn run_raw_sink(lowat: bool) {
    run_thread_sink(move |mut s| {
        if lowat {
            tune_like_ours(&s, 1 << 20);
        }
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                let _ = s.write_all(&[1]);
                return;
            }
        }
    });
}

/// Ping-pong sink: per connection, reads `max_inflight` payloads, writes as
/// many one-byte acks, and again, until EOF. No batching, no store: the round
/// trip of two processes waking each other, which bounds one client's rate.
fn run_floor_sink(payload: usize, max_inflight: usize) {
    run_thread_sink(move |mut s| {
        s.set_nodelay(true).ok();
        let mut buf = vec![0u8; payload * max_inflight];
        let acks = vec![1u8; max_inflight];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&acks).is_err() {
                return;
            }
        }
    });
}

/// This example re-executed as the server process `role`.
fn role_cmd(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.args(["--role", role]);
    cmd
}

fn start_floor(payload: usize, max_inflight: usize) -> Proc {
    let mut cmd = role_cmd("floor-sink");
    cmd.args([
        "--payload",
        &payload.to_string(),
        "--max-inflight",
        &max_inflight.to_string(),
    ]);
    Proc::start("ping-pong sink", cmd)
}

/// N blocking threads, each writing `max_inflight` payloads in one write and
/// waiting for their acks, for `secs` after a warm-up.
fn load_floor(port: u16, payload: usize, clients: usize, secs: f64, max_inflight: usize) -> Rate {
    let warm = Duration::from_secs_f64((secs / 5.0).min(0.3));
    let run = Duration::from_secs_f64(secs);
    let start = Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_nodelay(true).ok();
                let buf = vec![0x5au8; payload * max_inflight];
                let mut acks = vec![0u8; max_inflight];
                let mut round = |s: &mut std::net::TcpStream| {
                    s.write_all(&buf).expect("floor write");
                    s.read_exact(&mut acks).expect("floor acks");
                };
                let t = Instant::now();
                while t.elapsed() < warm {
                    round(&mut s);
                }
                start.wait();
                let t0 = Instant::now();
                let mut n = 0u64;
                while t0.elapsed() < run {
                    round(&mut s);
                    n += max_inflight as u64;
                }
                (n, Instant::now())
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let ends = threads.into_iter().map(|t| t.join().expect("floor client"));
    Rate::since(t0, ends, payload)
}

/// A process measured against (a server or a sink) and the port it listens on.
struct Proc {
    process: bench::Process,
    port: u16,
}

impl Proc {
    fn start(name: &str, cmd: Command) -> Proc {
        let mut process = bench::Process::start(name, cmd);
        let port = process
            .expect("PORT ", Duration::from_secs(60))
            .parse()
            .expect("a port number");
        Proc { process, port }
    }

    /// Closes stdin (the stop signal) and waits for the process.
    fn stop(self) -> Option<u64> {
        self.process.stop()
    }
}

/// Measures `f`'s rate along with the CPU the server process and this process used.
fn measured(server: &Proc, f: impl FnOnce() -> Rate) -> Measured {
    let (s0, c0) = (server.process.usage(), usage("self"));
    let rate = f();
    Measured {
        rate,
        server_cpu: (server.process.usage() - s0).cpu,
        client_cpu: (usage("self") - c0).cpu,
    }
}

/// A rate and the CPU spent on it.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rate: Rate,
    server_cpu: f64,
    client_cpu: f64,
}

impl Measured {
    /// CPU microseconds per sample, server and load generator.
    fn cpu_us(&self) -> (f64, f64) {
        let n = self.rate.samples.max(1) as f64;
        (self.server_cpu / n * 1e6, self.client_cpu / n * 1e6)
    }
}

fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ECHO_PYTHON") {
        return p.into();
    }
    let py = echo_core::testkit::workspace_root().join(".venv/bin/python");
    if !py.exists() {
        eprintln!(
            "id-echo runs need the project's venv at {}: run `bash scripts/setup-python.sh`, \
             set ECHO_PYTHON, or pass --targets raw,ours",
            py.display()
        );
        std::process::exit(2);
    }
    py
}

fn bench_script() -> std::path::PathBuf {
    echo_core::testkit::workspace_root().join("python/id_echo_bench.py")
}

fn start_ours(payload: usize, drainers: usize) -> Proc {
    let mut cmd = role_cmd("sink");
    cmd.args([
        "--payload",
        &payload.to_string(),
        "--drainers",
        &drainers.to_string(),
    ]);
    Proc::start("our server", cmd)
}

fn start_id_echo(payload: usize) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg(bench_script()).args([
        "serve",
        "--payload",
        &payload.to_string(),
        "--batch-size",
        &bench::batch_size(payload).to_string(),
    ]);
    Proc::start("id-echo server", cmd)
}

fn start_raw(lowat: bool) -> Proc {
    let mut cmd = role_cmd("raw-sink");
    if lowat {
        cmd.arg("--lowat");
    }
    Proc::start("raw sink", cmd)
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// A measured rate.
#[derive(Debug, Clone, Copy)]
struct Rate {
    samples: u64,
    secs: f64,
    payload: usize,
}

impl Rate {
    /// The rate of clients that started at `t0` and each reported how many
    /// samples it had acknowledged and when it was done (the last one ends it).
    fn since(t0: Instant, ends: impl IntoIterator<Item = (u64, Instant)>, payload: usize) -> Rate {
        let (mut samples, mut last) = (0, t0);
        for (n, end) in ends {
            samples += n;
            last = last.max(end);
        }
        Rate {
            samples,
            secs: (last - t0).as_secs_f64(),
            payload,
        }
    }

    fn per_sec(&self) -> f64 {
        self.samples as f64 / self.secs
    }

    fn mib_per_sec(&self) -> f64 {
        self.per_sec() * self.payload as f64 / (1u64 << 20) as f64
    }
}

/// Waits for every ack, for at most a minute: a server that stops acknowledging
/// ends the benchmark with a message instead of hanging it. (id-echo 0.2.1's
/// server was once seen to stop reading 16 connections mid-run, with payloads
/// in its receive queues, and not since.)
async fn wait_acked(c: &mut TcpClient) {
    let limit = Duration::from_secs(60);
    match tokio::time::timeout(limit, c.wait()).await {
        Ok(r) => r.expect("wait"),
        Err(_) => {
            let st = echo_core::Client::stats(c);
            panic!(
                "the server stopped acknowledging: {} of {} payloads acked after waiting {limit:?}",
                st.acked, st.sent
            )
        }
    }
}

/// N of our `TcpClient`s against `port`, each sending for `secs` after a warm-up.
async fn load(port: u16, payload: usize, clients: usize, secs: f64, max_inflight: usize) -> Rate {
    let spec = bench::spec(payload);
    let url = format!("tcp://127.0.0.1:{port}");
    let opts = ClientOptions {
        max_inflight,
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let data: Arc<Vec<u8>> = Arc::new((0..payload).map(|i| (i * 7 + 3) as u8).collect());
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(
            TcpClient::connect(&url, &spec, &opts)
                .await
                .expect("connect"),
        );
    }
    // Sends between clock checks: about 64 KiB worth.
    let step = ((64 << 10) / payload).clamp(1, 1024);
    let warm = Duration::from_secs_f64((secs / 5.0).min(0.3));
    let run = Duration::from_secs_f64(secs);
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for mut c in conns {
        let data = data.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            while t.elapsed() < warm {
                for _ in 0..step {
                    c.send(&data).await.expect("send");
                }
            }
            wait_acked(&mut c).await;
            start.wait().await;
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < run {
                for _ in 0..step {
                    c.send(&data).await.expect("send");
                }
                n += step as u64;
            }
            wait_acked(&mut c).await;
            let end = Instant::now();
            c.close().await.expect("close");
            (n, end)
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    let mut ends = Vec::new();
    for t in tasks {
        ends.push(t.await.expect("client task"));
    }
    Rate::since(t0, ends, payload)
}

/// N plain connections writing 1 MiB buffers for `secs`; ends when the sink has read all.
async fn load_raw(port: u16, payload: usize, clients: usize, secs: f64) -> Rate {
    let buf = Arc::new(vec![0x5au8; 1 << 20]);
    let mut conns = Vec::new();
    for _ in 0..clients {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect raw");
        s.set_nodelay(true).ok();
        conns.push(s);
    }
    let run = Duration::from_secs_f64(secs);
    let warm = Duration::from_secs_f64((secs / 5.0).min(0.3));
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for mut s in conns {
        let buf = buf.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            while t.elapsed() < warm {
                s.write_all(&buf).await.expect("raw write");
            }
            start.wait().await;
            let t0 = Instant::now();
            let mut bytes = 0u64;
            while t0.elapsed() < run {
                s.write_all(&buf).await.expect("raw write");
                bytes += buf.len() as u64;
            }
            s.shutdown().await.expect("raw shutdown");
            let mut done = [0u8; 1];
            s.read_exact(&mut done)
                .await
                .expect("raw sink confirmation");
            (bytes, Instant::now())
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    let (mut bytes, mut last) = (0u64, t0);
    for t in tasks {
        let (b, end) = t.await.expect("raw task");
        bytes += b;
        last = last.max(end);
    }
    let secs = (last - t0).as_secs_f64();
    Rate {
        samples: (bytes as f64 / payload as f64) as u64,
        secs,
        payload,
    }
}

/// id-echo's Python TcpClient against `port` (killed if it hangs).
fn python_client(port: u16, payload: usize, secs: f64, max_inflight: usize) -> Rate {
    let mut child = Command::new(python())
        .arg(bench_script())
        .args([
            "client",
            "--port",
            &port.to_string(),
            "--payload",
            &payload.to_string(),
            "--seconds",
            &secs.to_string(),
            "--warmup",
            &(secs / 5.0).min(0.3).to_string(),
            "--max-inflight",
            &max_inflight.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python client");
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 60.0);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python client against port {port} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("python client printed no RESULT: {text}"));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    Rate {
        samples: field("samples=") as u64,
        secs: field("secs="),
        payload,
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn fmt_rate(r: Option<Rate>) -> (String, String) {
    match r {
        None => ("-".into(), "-".into()),
        Some(r) => (
            format!("{:.0}", r.per_sec()),
            format!("{:.1}", r.mib_per_sec()),
        ),
    }
}

fn ratio(a: Option<Rate>, b: Option<Rate>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.per_sec() > 0.0 => format!("{:.2}", a.per_sec() / b.per_sec()),
        _ => "-".into(),
    }
}

/// Server / load-generator CPU microseconds per sample.
fn fmt_cpu(m: Option<Measured>) -> String {
    match m {
        None => "-".into(),
        Some(m) => {
            let (s, c) = m.cpu_us();
            if s < 10.0 && c < 10.0 {
                format!("{s:.2} / {c:.2}")
            } else {
                format!("{s:.0} / {c:.0}")
            }
        }
    }
}

/// The run with the median rate.
fn median(v: &[Measured]) -> Option<Measured> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.rate.per_sec().total_cmp(&b.rate.per_sec()));
    v.get(v.len() / 2).copied()
}

/// `median (min–max)` of the rates, in samples/s.
fn fmt_spread(v: &[Measured]) -> String {
    let Some(m) = median(v) else {
        return "-".into();
    };
    if v.len() < 2 {
        return format!("{:.0}", m.rate.per_sec());
    }
    let lo = v.iter().map(|x| x.rate.per_sec()).fold(f64::MAX, f64::min);
    let hi = v.iter().map(|x| x.rate.per_sec()).fold(0.0, f64::max);
    format!("{:.0} ({lo:.0}–{hi:.0})", m.rate.per_sec())
}

#[derive(Default)]
struct Cell {
    raw: Vec<Measured>,
    raw_lowat: Vec<Measured>,
    floor: Vec<Measured>,
    ours: Vec<Measured>,
    id_echo: Vec<Measured>,
}

fn main() {
    let args = Args::parse();
    match args.role.as_deref() {
        Some("sink") => return run_sink(&args),
        Some("raw-sink") => return run_raw_sink(args.lowat),
        Some("floor-sink") => return run_floor_sink(args.payload, args.max_inflight),
        Some(other) => panic!("unknown --role {other}"),
        None => {}
    }
    let secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 1.5 });
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let py_reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 }).max(1);
    let py_secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 2.0 });
    let want = |t: &str| args.targets.iter().any(|x| x == t);
    for t in &args.targets {
        assert!(
            ["raw", "raw-lowat", "floor", "ours", "id-echo", "py"].contains(&t.as_str()),
            "unknown target {t}; expected raw, raw-lowat, floor, ours, id-echo, py"
        );
    }
    for &p in &args.sizes {
        bench::spec(p);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let mi = args.max_inflight;
    let mut cells: Vec<((usize, usize), Cell)> = Vec::new();
    let mut py_cells: Vec<(usize, Vec<Measured>, Vec<Measured>)> = Vec::new();
    for &payload in &args.sizes {
        let raw = want("raw").then(|| start_raw(false));
        let raw_lowat = want("raw-lowat").then(|| start_raw(true));
        let floor = want("floor").then(|| start_floor(payload, mi));
        let ours = (want("ours") || want("py")).then(|| start_ours(payload, args.drainers));
        let ide = (want("id-echo") || want("py")).then(|| start_id_echo(payload));
        let first = cells.len();
        for &clients in &args.clients {
            cells.push(((payload, clients), Cell::default()));
        }
        let mut py = (payload, Vec::new(), Vec::new());
        // Repetitions interleave the targets, so that load from elsewhere on the
        // machine spreads over all of them; the tables report medians.
        for rep in 0..reps {
            for (k, &clients) in args.clients.iter().enumerate() {
                let cell = &mut cells[first + k].1;
                if let Some(p) = raw.as_ref() {
                    cell.raw.push(measured(p, || {
                        rt.block_on(load_raw(p.port, payload, clients, secs))
                    }));
                }
                if let Some(p) = raw_lowat.as_ref() {
                    cell.raw_lowat.push(measured(p, || {
                        rt.block_on(load_raw(p.port, payload, clients, secs))
                    }));
                }
                if let Some(p) = floor.as_ref() {
                    cell.floor.push(measured(p, || {
                        load_floor(p.port, payload, clients, secs, mi)
                    }));
                }
                if let (true, Some(p)) = (want("ours"), ours.as_ref()) {
                    cell.ours.push(measured(p, || {
                        rt.block_on(load(p.port, payload, clients, secs, mi))
                    }));
                }
                if let (true, Some(p)) = (want("id-echo"), ide.as_ref()) {
                    cell.id_echo.push(measured(p, || {
                        rt.block_on(load(p.port, payload, clients, secs, mi))
                    }));
                }
                if raw.is_none()
                    && raw_lowat.is_none()
                    && floor.is_none()
                    && !want("ours")
                    && !want("id-echo")
                {
                    continue;
                }
                let last = |v: &Vec<Measured>| v.last().copied();
                let (rs, rm) = fmt_rate(last(&cell.raw).map(|m| m.rate));
                let (_, lm) = fmt_rate(last(&cell.raw_lowat).map(|m| m.rate));
                let (fs, _) = fmt_rate(last(&cell.floor).map(|m| m.rate));
                let (os, om) = fmt_rate(last(&cell.ours).map(|m| m.rate));
                let (is, im) = fmt_rate(last(&cell.id_echo).map(|m| m.rate));
                eprintln!(
                    "[{:>5.1}s] {:>7} x{:<2} #{rep}: raw {rs:>10}/s {rm:>7} MiB/s (lowat {lm:>7}) | floor {fs:>9}/s | ours {os:>9}/s {om:>7} MiB/s cpu {} | id-echo {is:>9}/s {im:>7} MiB/s cpu {}",
                    started.elapsed().as_secs_f64(),
                    bench::size_name(payload),
                    clients,
                    fmt_cpu(last(&cell.ours)),
                    fmt_cpu(last(&cell.id_echo)),
                );
            }
        }
        // id-echo's Python client: more (and longer) runs, as it is the noisiest;
        // the order alternates so that neither server always goes first.
        if want("py") {
            for rep in 0..py_reps {
                for first in [rep % 2 == 0, rep % 2 != 0] {
                    match (first, ide.as_ref(), ours.as_ref()) {
                        (true, Some(p), _) => {
                            py.1.push(measured(p, || python_client(p.port, payload, py_secs, mi)))
                        }
                        (false, _, Some(p)) => {
                            py.2.push(measured(p, || python_client(p.port, payload, py_secs, mi)))
                        }
                        _ => {}
                    }
                }
                eprintln!(
                    "[{:>5.1}s] {:>7} #{rep} Python TcpClient: id-echo {}/s, ours {}/s",
                    started.elapsed().as_secs_f64(),
                    bench::size_name(payload),
                    fmt_rate(py.1.last().map(|m| m.rate)).0,
                    fmt_rate(py.2.last().map(|m| m.rate)).0
                );
            }
            py_cells.push(py);
        }
        for p in [raw, raw_lowat, floor, ours, ide].into_iter().flatten() {
            p.stop();
        }
    }

    println!(
        "Rust load generator: echo-tcp TcpClient, max_inflight {mi}, {secs} s per run, \
         median of {reps} interleaved run(s) (min–max in brackets). CPU: server / \
         load-generator CPU microseconds per sample.\n"
    );
    println!(
        "Raw: plain sockets, the sink reading into one 1 MiB buffer; raw lowat: the same \
         with our server's SO_RCVLOWAT tuning for 1 MiB payloads. ours / raw is against \
         the faster of the two. Floor: a blocking ping-pong of max_inflight payloads and \
         their acks per round trip, per client (no batching, no store).\n"
    );
    println!("| payload | clients | raw loopback MiB/s | raw CPU | raw lowat MiB/s | raw lowat CPU | floor samples/s | ours samples/s | ours MiB/s | ours CPU | id-echo samples/s | id-echo MiB/s | id-echo CPU | ours / id-echo | ours / raw | ours / floor |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for ((payload, clients), c) in &cells {
        let (raw, raw_lowat, floor, ours, ide) = (
            median(&c.raw),
            median(&c.raw_lowat),
            median(&c.floor),
            median(&c.ours),
            median(&c.id_echo),
        );
        let ceiling = [raw, raw_lowat]
            .into_iter()
            .flatten()
            .map(|m| m.rate)
            .max_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
        println!(
            "| {} | {clients} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            bench::size_name(*payload),
            fmt_rate(raw.map(|m| m.rate)).1,
            fmt_cpu(raw),
            fmt_rate(raw_lowat.map(|m| m.rate)).1,
            fmt_cpu(raw_lowat),
            fmt_spread(&c.floor),
            fmt_spread(&c.ours),
            fmt_rate(ours.map(|m| m.rate)).1,
            fmt_cpu(ours),
            fmt_spread(&c.id_echo),
            fmt_rate(ide.map(|m| m.rate)).1,
            fmt_cpu(ide),
            ratio(ours.map(|m| m.rate), ide.map(|m| m.rate)),
            ratio(ours.map(|m| m.rate), ceiling),
            ratio(ours.map(|m| m.rate), floor.map(|m| m.rate))
        );
    }
    if !py_cells.is_empty() {
        println!(
            "\nid-echo's Python TcpClient, 1 client, max_inflight {mi}, {py_secs} s per run, \
             median of {py_reps} interleaved run(s); server CPU microseconds per sample:\n"
        );
        println!("| payload | → id-echo samples/s | id-echo server CPU | → ours samples/s | our server CPU | ours / id-echo |");
        println!("|---|---|---|---|---|---|");
        for (p, ide, ours) in &py_cells {
            let cpu = |m: Option<Measured>| {
                m.map(|m| format!("{:.1}", m.cpu_us().0))
                    .unwrap_or_else(|| "-".into())
            };
            let (mi_, mo) = (median(ide), median(ours));
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                bench::size_name(*p),
                fmt_spread(ide),
                cpu(mi_),
                fmt_spread(ours),
                cpu(mo),
                ratio(mo.map(|m| m.rate), mi_.map(|m| m.rate))
            );
        }
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
}

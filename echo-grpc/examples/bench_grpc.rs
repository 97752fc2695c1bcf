//! gRPC vs our TCP transport, in one run, under the same load generator.
//!
//! ```text
//! cargo run --release -p echo-grpc --example bench_grpc                 # default cells
//! cargo run --release -p echo-grpc --example bench_grpc -- --quick      # smoke run
//! cargo run --release -p echo-grpc --example bench_grpc -- \
//!     --targets tcp,grpc,grpc-h2-defaults,grpc-no-packing --sizes 20,16384 --clients 1
//! ```
//!
//! Each target's server runs in its own process (this binary with `--role sink`),
//! consuming batches as fast as it can; the load generator is this process: N
//! clients (through the registry, so `TcpClient` or `GrpcClient`) on a 2-thread
//! Tokio runtime, each sending the same pre-built payload with `max_inflight`
//! unacknowledged for a fixed time after a warm-up, then waiting for every ack.
//! A rate is acknowledged samples / elapsed time; the sink confirms the count.
//!
//! Targets:
//! * `tcp`: echo-tcp, wire v1 (the baseline);
//! * `grpc`, `grpcs`: echo-grpc with its defaults (grpcs: TLS 1.3 + a bearer token);
//! * `grpc-h2-defaults`: HTTP/2's own settings on the server (64 KiB - 1 windows,
//!   16 KiB frames);
//! * `grpc-hyper-defaults`: hyper's server defaults (1 MiB windows, 16 KiB frames);
//! * `grpc-no-packing`: the client sends one payload per message;
//! * `grpc?OPTIONS`: a grpc server with these URL options, e.g.
//!   `grpc?window=16777216&frame=1048576` (quote it in a shell).
//!
//! Sample layout for a payload of P bytes: `{"obs": float32[P/4 - 1], "reward":
//! float32[]}`, batches of `clamp(8 MiB / P, 4, 256)` samples (as echo-tcp's bench).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use echo_core::testkit::bench;
use echo_core::{Client, ClientOptions, Registry, Server, Url};
use echo_grpc::GrpcClient;

#[derive(Parser, Debug, Clone)]
#[command(about = "echo-grpc vs echo-tcp throughput")]
struct Args {
    /// Short runs (0.3 s per cell).
    #[arg(long)]
    quick: bool,
    /// Seconds per measurement (default 2, or 0.3 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Payload sizes in bytes (multiples of 4, at least 8).
    #[arg(long, value_delimiter = ',', default_value = "20,16384,1048576")]
    sizes: Vec<usize>,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Unacknowledged payloads per client.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// Rounds of all targets per row; the table shows medians (default 3, or 1
    /// with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Targets (see the file's docs).
    #[arg(long, value_delimiter = ',', default_value = "tcp,grpc,grpcs")]
    targets: Vec<String>,
    /// Internal: run as a server process bound to `--url`.
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the URL a sink binds.
    #[arg(long, hide = true)]
    url: Option<String>,
    /// Internal: payload size for `--role`.
    #[arg(long, hide = true, default_value_t = 20)]
    payload: usize,
}

fn registry() -> Registry {
    let mut r = Registry::with_core();
    echo_tcp::register(&mut r).expect("tcp");
    echo_grpc::register(&mut r).expect("grpc");
    r
}

/// A server process: prints `PORT p`, consumes until stdin closes, prints `SAMPLES n`.
fn run_sink(url: &str, payload: usize) {
    let builder = Server::builder(bench::spec(payload))
        .batch_size(bench::batch_size(payload))
        .registry(registry());
    let port = |u: &str| format!("PORT {}", u.rsplit(':').next().unwrap_or("0"));
    bench::server_process(builder, url, port, |n| n.whole + n.partial);
}

/// A server process (this binary with `--role sink`).
struct Sink(bench::Process);

impl Sink {
    fn start(url: &str, payload: usize) -> (Sink, u16) {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args([
            "--role",
            "sink",
            "--url",
            url,
            "--payload",
            &payload.to_string(),
        ]);
        let mut sink = bench::Process::start("sink", cmd);
        let port = sink
            .expect("PORT ", Duration::from_secs(60))
            .parse()
            .expect("port");
        (Sink(sink), port)
    }

    /// Closes stdin and returns the samples the sink consumed.
    fn stop(self) -> u64 {
        self.0.stop().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    samples: u64,
    secs: f64,
    /// gRPC messages sent (warm-up included) and payloads sent, for packing.
    messages: Option<(u64, u64)>,
}

/// A client of any scheme; gRPC ones also report how many messages they sent.
enum AnyClient {
    Dyn(Box<dyn Client>),
    Grpc(GrpcClient),
}

impl AnyClient {
    fn get(&mut self) -> &mut dyn Client {
        match self {
            AnyClient::Dyn(c) => c.as_mut(),
            AnyClient::Grpc(c) => c,
        }
    }

    fn messages(&self) -> Option<(u64, u64)> {
        match self {
            AnyClient::Dyn(_) => None,
            AnyClient::Grpc(c) => Some((c.messages_sent(), c.stats().sent)),
        }
    }
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.samples as f64 / self.secs
    }
}

async fn load(url: &str, payload: usize, clients: usize, secs: f64, max_inflight: usize) -> Rate {
    let spec = bench::spec(payload);
    let opts = ClientOptions {
        max_inflight,
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let reg = registry();
    let data: Arc<Vec<u8>> = Arc::new((0..payload).map(|i| (i * 7 + 3) as u8).collect());
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(if url.starts_with("grpc") {
            let u = Url::parse(url).expect("url");
            AnyClient::Grpc(
                GrpcClient::connect(&u, &spec, &opts)
                    .await
                    .expect("connect"),
            )
        } else {
            AnyClient::Dyn(reg.connect(url, &spec, &opts).await.expect("connect"))
        });
    }
    let step = ((64 << 10) / payload).clamp(1, 1024);
    let warm = Duration::from_secs_f64((secs / 5.0).min(0.3));
    let run = Duration::from_secs_f64(secs);
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for mut any in conns {
        let data = data.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let c = any.get();
            let t = Instant::now();
            while t.elapsed() < warm {
                for _ in 0..step {
                    c.send(&data).await.expect("send");
                }
            }
            c.wait().await.expect("wait");
            start.wait().await;
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < run {
                for _ in 0..step {
                    c.send(&data).await.expect("send");
                }
                n += step as u64;
            }
            c.wait().await.expect("wait");
            let end = Instant::now();
            c.close().await.expect("close");
            (n, end, any.messages())
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    let (mut total, mut last, mut messages) = (0, t0, None);
    for t in tasks {
        let (n, end, m) = t.await.expect("client task");
        total += n;
        last = last.max(end);
        if let Some((m, p)) = m {
            let (tm, tp) = messages.unwrap_or((0, 0));
            messages = Some((tm + m, tp + p));
        }
    }
    Rate {
        samples: total,
        secs: (last - t0).as_secs_f64(),
        messages,
    }
}

/// (server bind URL, client query) of a target.
fn target_urls(target: &str, certs: &Certs) -> (String, String) {
    let h2_defaults = "window=65535&conn_window=65535&frame=16384";
    let hyper_defaults = "window=1048576&conn_window=1048576&frame=16384";
    match target {
        "tcp" => ("tcp://127.0.0.1:0".into(), String::new()),
        "grpc" => ("grpc://127.0.0.1:0".into(), String::new()),
        "grpcs" => (
            format!(
                "grpcs://127.0.0.1:0?cert={}&key={}&token=bench",
                certs.cert, certs.key
            ),
            format!("ca={}&domain=localhost&token=bench", certs.cert),
        ),
        "grpc-h2-defaults" => (format!("grpc://127.0.0.1:0?{h2_defaults}"), String::new()),
        "grpc-hyper-defaults" => (
            format!("grpc://127.0.0.1:0?{hyper_defaults}"),
            String::new(),
        ),
        "grpc-no-packing" => ("grpc://127.0.0.1:0".into(), "max_payloads=1".into()),
        t if t.starts_with("grpc?") => (format!("grpc://127.0.0.1:0{}", &t[4..]), String::new()),
        other => panic!(
            "unknown target {other}; expected tcp, grpc, grpcs, grpc-h2-defaults, \
             grpc-hyper-defaults, grpc-no-packing or grpc?OPTIONS"
        ),
    }
}

struct Certs {
    _dir: tempfile::TempDir,
    cert: String,
    key: String,
}

fn certs() -> Certs {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    Certs {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        _dir: dir,
    }
}

fn measure(
    rt: &tokio::runtime::Runtime,
    target: &str,
    certs: &Certs,
    payload: usize,
    clients: usize,
    secs: f64,
    max_inflight: usize,
) -> Rate {
    let (bind, query) = target_urls(target, certs);
    let (sink, port) = Sink::start(&bind, payload);
    let scheme = bind.split("://").next().unwrap_or("tcp");
    let mut url = format!("{scheme}://127.0.0.1:{port}");
    if !query.is_empty() {
        url = format!("{url}?{query}");
    }
    let rate = rt.block_on(load(&url, payload, clients, secs, max_inflight));
    let consumed = sink.stop();
    assert!(
        consumed >= rate.samples,
        "{target}: the sink consumed {consumed} samples, fewer than the {} counted",
        rate.samples
    );
    rate
}

fn main() {
    let args = Args::parse();
    if args.role.as_deref() == Some("sink") {
        return run_sink(args.url.as_deref().expect("--url"), args.payload);
    }
    let secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 2.0 });
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let certs = certs();
    for t in &args.targets {
        target_urls(t, &certs);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# {secs} s per cell, {repeat} round(s) of all targets per row (medians; range = min..max), \
         max_inflight {}, 2-thread load generator, server in its own process",
        args.max_inflight
    );
    println!(
        "| payload | clients | target | samples/s | MB/s | range samples/s | vs tcp (paired median) | payloads/message |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &payload in &args.sizes {
        bench::spec(payload);
        for &clients in &args.clients {
            // rates[target][round]
            let mut rates: Vec<Vec<Rate>> = vec![Vec::new(); args.targets.len()];
            for _ in 0..repeat {
                for (i, target) in args.targets.iter().enumerate() {
                    rates[i].push(measure(
                        &rt,
                        target,
                        &certs,
                        payload,
                        clients,
                        secs,
                        args.max_inflight,
                    ));
                }
            }
            let tcp = args.targets.iter().position(|t| t == "tcp");
            for (i, target) in args.targets.iter().enumerate() {
                let r = &rates[i];
                let per_sec: Vec<f64> = r.iter().map(|x| x.per_sec()).collect();
                let lo = per_sec.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = per_sec.iter().cloned().fold(0.0, f64::max);
                let med = bench::median(per_sec.iter().copied());
                let vs = match tcp {
                    Some(t) => {
                        let ratios = r
                            .iter()
                            .zip(&rates[t])
                            .map(|(a, b)| a.per_sec() / b.per_sec());
                        format!("{:.0} %", 100.0 * bench::median(ratios))
                    }
                    None => "-".into(),
                };
                let (m, p) = r
                    .iter()
                    .filter_map(|x| x.messages)
                    .fold((0, 0), |(a, b), (m, p)| (a + m, b + p));
                let packing = if m > 0 {
                    format!("{:.1}", p as f64 / m as f64)
                } else {
                    "-".into()
                };
                println!(
                    "| {} | {clients} | {target} | {med:.0} | {:.1} | {lo:.0}..{hi:.0} | {vs} | {packing} |",
                    bench::size_name(payload),
                    med * payload as f64 / 1e6,
                );
            }
        }
    }
}

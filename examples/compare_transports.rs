//! Compares every compiled-in transport on loopback with the same spec and load.
//!
//! ```text
//! cargo run --release --features full --example compare_transports
//! cargo run --release --features full --example compare_transports -- \
//!     --sizes 20,16384,1048576 --clients 4 --samples 2000 --inflight 32 --streams 4 --json out.json
//! ```
//!
//! For each transport and sample size it starts a server, connects `--clients`
//! clients that each send `--samples` samples with at most `--inflight`
//! unacknowledged, and consumes the batches, checking that every sample arrived
//! exactly once and byte-exact. It prints a table (samples/s, MB/s, p50 and p99
//! ack latency, batches) and writes an SVG chart and, with `--json`, the results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use echo::testkit::{kit_sample, kit_spec};
use echo::{ClientOptions, LatencyHistogram, Registry, Server, Spec};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Compare echo's transports on loopback.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Sample sizes in bytes (each at least 17).
    #[arg(long, value_delimiter = ',', default_values_t = [20usize, 16384, 1048576])]
    sizes: Vec<usize>,
    /// Concurrent clients per run.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Samples per client [default: 64 MiB / size, between 200 and 50000].
    #[arg(long)]
    samples: Option<usize>,
    /// Most unacknowledged samples per client.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// QUIC streams per client.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Only these schemes [default: every compiled-in one].
    #[arg(long, value_delimiter = ',')]
    transports: Option<Vec<String>>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "compare-out/throughput.svg")]
    svg: PathBuf,
}

/// One row of the table (and one object of the JSON output).
#[derive(Debug, Clone, Serialize)]
struct Row {
    transport: String,
    sample_bytes: usize,
    clients: usize,
    samples: u64,
    samples_per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    batches: u64,
    byte_exact: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Where a scheme's server binds and how its clients reach it.
struct Endpoints {
    tmp: tempfile::TempDir,
    counter: usize,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Endpoints {
    fn new() -> Self {
        Endpoints {
            tmp: tempfile::tempdir().expect("a temp dir"),
            counter: 0,
            tls: None,
        }
    }

    /// A self-signed certificate for `localhost`, written once (for grpcs).
    fn tls(&mut self) -> (PathBuf, PathBuf) {
        if let Some(t) = &self.tls {
            return t.clone();
        }
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("a self-signed certificate");
        let c = self.tmp.path().join("grpcs-cert.pem");
        let k = self.tmp.path().join("grpcs-key.pem");
        std::fs::write(&c, cert.cert.pem()).expect("write cert");
        std::fs::write(&k, cert.signing_key.serialize_pem()).expect("write key");
        self.tls = Some((c.clone(), k.clone()));
        (c, k)
    }

    fn bind_url(&mut self, scheme: &str) -> Option<String> {
        self.counter += 1;
        let n = self.counter;
        let dir = self.tmp.path().to_path_buf();
        Some(match scheme {
            "mem" => format!("mem://compare-{}-{n}", std::process::id()),
            "tcp" => "tcp://127.0.0.1:0".into(),
            "unix" => format!("unix://{}", dir.join(format!("echo-{n}.sock")).display()),
            "grpc" => "grpc://127.0.0.1:0".into(),
            "grpcs" => {
                let (c, k) = self.tls();
                format!(
                    "grpcs://127.0.0.1:0?cert={}&key={}",
                    c.display(),
                    k.display()
                )
            }
            "quic" => format!(
                "quic://127.0.0.1:0?cert_out={}",
                dir.join(format!("quic-{n}.pem")).display()
            ),
            _ => return None,
        })
    }

    fn client_url(&mut self, scheme: &str, server: &Server, args: &Args) -> String {
        let listener = &server.listeners()[0];
        let mut url = echo::Url::parse(&listener.url).expect("the server reports a valid URL");
        url.set_query(None);
        match scheme {
            "grpcs" => {
                let (c, _) = self.tls();
                url.query_pairs_mut()
                    .append_pair("ca", &c.display().to_string())
                    .append_pair("domain", "localhost");
            }
            "quic" => {
                let cert = listener
                    .details
                    .iter()
                    .find(|(k, _)| k == "cert")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                url.query_pairs_mut()
                    .append_pair("ca", &cert)
                    .append_pair("server_name", "localhost")
                    .append_pair("streams", &args.streams.to_string());
            }
            _ => {}
        }
        url.to_string()
    }
}

fn default_samples(size: usize) -> usize {
    (64 * 1024 * 1024 / size).clamp(200, 50_000)
}

fn batch_size_for(size: usize) -> usize {
    (4 * 1024 * 1024 / size).clamp(4, 1024)
}

/// Eight pre-built samples per client (meta patched per send), so generating load
/// costs almost nothing next to moving it.
fn variants(spec: &Spec, client: u32) -> Vec<Vec<u8>> {
    (0..8)
        .map(|v| {
            let mut buf = Vec::new();
            kit_sample(spec, client, v, &mut buf);
            buf
        })
        .collect()
}

struct Verdict {
    received: u64,
    batches: u64,
    exact: bool,
    problem: Option<String>,
}

/// Consumes batches until `total` samples arrived (or the server closed), checking
/// each sample against what its client sent and that none arrives twice.
async fn consume(
    server: Server,
    spec: Spec,
    expected: Arc<Vec<Vec<Vec<u8>>>>,
    per_client: usize,
    bar: ProgressBar,
) -> Verdict {
    let total = (expected.len() * per_client) as u64;
    let mut seen = vec![vec![false; per_client]; expected.len()];
    let mut v = Verdict {
        received: 0,
        batches: 0,
        exact: true,
        problem: None,
    };
    let check_off = spec.leaf_offset(1);
    while v.received < total {
        let Some(batch) = server.next_batch().await else {
            break;
        };
        v.batches += 1;
        let meta = batch.leaf(0).as_slice::<u32>().expect("meta is uint32");
        let check = batch.leaf(1).bytes();
        let data = batch.leaf(2).bytes();
        let dlen = spec.leaf_bytes(2);
        for k in 0..batch.len() {
            let (c, s) = (meta[2 * k] as usize, meta[2 * k + 1] as usize);
            let ok = c < expected.len()
                && s < per_client
                && !std::mem::replace(&mut seen[c][s], true)
                && {
                    let want = &expected[c][s % 8];
                    check[k * 8..k * 8 + 8] == want[check_off..check_off + 8]
                        && data[k * dlen..(k + 1) * dlen] == want[16..]
                };
            if !ok && v.exact {
                v.exact = false;
                v.problem = Some(format!(
                    "sample (client {c}, seq {s}) corrupt or duplicated"
                ));
            }
        }
        v.received += batch.len() as u64;
        bar.inc(batch.len() as u64);
    }
    v
}

async fn run_one(
    registry: &Registry,
    eps: &mut Endpoints,
    scheme: &str,
    size: usize,
    args: &Args,
    bar: ProgressBar,
) -> Result<Row, String> {
    let spec = kit_spec(size);
    let per_client = args.samples.unwrap_or_else(|| default_samples(size));
    let bind = eps
        .bind_url(scheme)
        .ok_or_else(|| format!("no loopback endpoint known for scheme {scheme}"))?;
    let server = Server::builder(spec.clone())
        .batch_size(batch_size_for(size))
        .num_buffers(4)
        .registry(registry.clone())
        .build()
        .map_err(|e| e.to_string())?;
    server.listen(&bind).await.map_err(|e| e.to_string())?;
    let url = eps.client_url(scheme, &server, args);
    let options = ClientOptions {
        max_inflight: args.inflight,
        ..ClientOptions::default()
    };
    let expected: Arc<Vec<Vec<Vec<u8>>>> = Arc::new(
        (0..args.clients as u32)
            .map(|c| variants(&spec, c))
            .collect(),
    );
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(
            registry
                .connect(&url, &spec, &options)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let consumer = tokio::spawn(consume(
        server.clone(),
        spec.clone(),
        expected.clone(),
        per_client,
        bar,
    ));
    let start = Instant::now();
    let mut senders = Vec::new();
    for (id, mut client) in clients.into_iter().enumerate() {
        let mut bufs = expected[id].clone();
        senders.push(tokio::spawn(async move {
            for seq in 0..per_client {
                let buf = &mut bufs[seq % 8];
                buf[4..8].copy_from_slice(&(seq as u32).to_le_bytes());
                client.send(buf).await?;
            }
            client.wait().await?;
            let hist = client.latency_histogram();
            client.close().await?;
            Ok::<_, echo::Error>(hist)
        }));
    }
    let mut latency = LatencyHistogram::default();
    let mut failure = None;
    for s in senders {
        match s.await {
            Ok(Ok(h)) => latency.merge(&h),
            Ok(Err(e)) => failure = failure.or(Some(e.to_string())),
            Err(e) => failure = failure.or(Some(e.to_string())),
        }
    }
    // Every sample is acknowledged: a graceful shutdown hands the consumer the
    // last, partial batch too.
    server.shutdown().await.map_err(|e| e.to_string())?;
    let verdict = tokio::time::timeout(Duration::from_secs(120), consumer)
        .await
        .map_err(|_| "timed out waiting for batches".to_string())?
        .map_err(|e| e.to_string())?;
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(f) = failure {
        return Err(f);
    }
    let total = (args.clients * per_client) as u64;
    if verdict.received != total {
        return Err(format!("{} of {total} samples arrived", verdict.received));
    }
    let s = latency.summary();
    Ok(Row {
        transport: scheme.to_string(),
        sample_bytes: size,
        clients: args.clients,
        samples: total,
        samples_per_s: total as f64 / elapsed,
        mb_per_s: (total as f64 * size as f64) / elapsed / 1e6,
        p50_us: s.p50_us,
        p99_us: s.p99_us,
        batches: verdict.batches,
        byte_exact: verdict.exact,
        error: verdict.problem,
    })
}

fn human_size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<8} {:>9} {:>7} {:>9} {:>12} {:>10} {:>9} {:>9} {:>8} {:>10}",
        "transport",
        "size",
        "clients",
        "samples",
        "samples/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "batches",
        "byte-exact"
    );
    for r in rows {
        match &r.error {
            Some(e) if r.samples == 0 => println!(
                "{:<8} {:>9} {:>7}  error: {e}",
                r.transport,
                human_size(r.sample_bytes),
                r.clients
            ),
            _ => println!(
                "{:<8} {:>9} {:>7} {:>9} {:>12.0} {:>10.1} {:>9.1} {:>9.1} {:>8} {:>10}",
                r.transport,
                human_size(r.sample_bytes),
                r.clients,
                r.samples,
                r.samples_per_s,
                r.mb_per_s,
                r.p50_us,
                r.p99_us,
                r.batches,
                if r.byte_exact { "yes" } else { "NO" }
            ),
        }
    }
}

/// One small bar chart of MB/s per sample size, side by side.
fn svg(rows: &[Row]) -> String {
    let mut by_size: BTreeMap<usize, Vec<&Row>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.samples > 0) {
        by_size.entry(r.sample_bytes).or_default().push(r);
    }
    let (pw, ph, top, bottom, left) = (300.0, 260.0, 40.0, 50.0, 50.0);
    let width = left + pw * by_size.len().max(1) as f64 + 20.0;
    let height = top + ph + bottom;
    let colors = [
        "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d",
    ];
    let mut names: Vec<&str> = rows.iter().map(|r| r.transport.as_str()).collect();
    names.dedup();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">echo transports on loopback: throughput (MB/s) by sample size</text>\n"
    );
    for (p, (size, group)) in by_size.iter().enumerate() {
        let x0 = left + p as f64 * pw;
        let max = group
            .iter()
            .map(|r| r.mb_per_s)
            .fold(0.0, f64::max)
            .max(1e-9);
        let bw = (pw - 40.0) / group.len() as f64;
        out += &format!(
            "<line x1=\"{x0}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
            top + ph,
            x0 + pw - 20.0,
            top + ph
        );
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n",
            x0 + (pw - 20.0) / 2.0,
            top + ph + 35.0,
            human_size(*size)
        );
        for (i, r) in group.iter().enumerate() {
            let h = (r.mb_per_s / max) * (ph - 20.0);
            let x = x0 + 10.0 + i as f64 * bw;
            let color =
                colors[names.iter().position(|n| *n == r.transport).unwrap_or(0) % colors.len()];
            out += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>\n",
                top + ph - h,
                bw * 0.8
            );
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>\n",
                x + bw * 0.4,
                top + ph - h - 3.0,
                r.mb_per_s
            );
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                x + bw * 0.4,
                top + ph + 14.0,
                r.transport
            );
        }
    }
    out += "</svg>\n";
    out
}

fn write_file(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, contents)
}

fn main() -> std::process::ExitCode {
    // The servers run in this process: set its allocator as echo-server does,
    // before the runtime's threads start.
    echo::heap::server_heap();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the Tokio runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    rt.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(bad) = args
        .sizes
        .iter()
        .find(|s| **s < 17 || **s > u32::MAX as usize)
    {
        eprintln!(
            "--sizes: {bad} is out of range; expected 17 to {} bytes",
            u32::MAX
        );
        return std::process::ExitCode::from(2);
    }
    if args.clients == 0 || args.inflight == 0 || args.streams == 0 || args.samples == Some(0) {
        eprintln!("--clients, --samples, --inflight and --streams must be at least 1");
        return std::process::ExitCode::from(2);
    }
    let registry = echo::registry();
    let schemes: Vec<String> = match &args.transports {
        Some(list) => list.clone(),
        None => registry.schemes(),
    };
    println!(
        "echo compare_transports: {} on loopback, {} clients, max_inflight {}, sizes {:?}",
        schemes.join(", "),
        args.clients,
        args.inflight,
        args.sizes
    );
    let mut eps = Endpoints::new();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        for scheme in &schemes {
            let per_client = args.samples.unwrap_or_else(|| default_samples(size));
            let bar = ProgressBar::new((per_client * args.clients) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>14} [{bar:30}] {pos}/{len} samples {per_sec}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{scheme} {}", human_size(size)));
            let row = match run_one(&registry, &mut eps, scheme, size, &args, bar.clone()).await {
                Ok(row) => row,
                Err(e) => Row {
                    transport: scheme.clone(),
                    sample_bytes: size,
                    clients: args.clients,
                    samples: 0,
                    samples_per_s: 0.0,
                    mb_per_s: 0.0,
                    p50_us: 0.0,
                    p99_us: 0.0,
                    batches: 0,
                    byte_exact: false,
                    error: Some(e),
                },
            };
            bar.finish_and_clear();
            match &row.error {
                Some(e) => eprintln!("{scheme} {}: FAILED: {e}", human_size(size)),
                None => eprintln!(
                    "{scheme} {}: {:.0} samples/s, {:.1} MB/s",
                    human_size(size),
                    row.samples_per_s,
                    row.mb_per_s
                ),
            }
            rows.push(row);
        }
    }
    print_table(&rows);
    if let Err(e) = write_file(&args.svg, &svg(&rows)) {
        eprintln!("could not write {}: {e}", args.svg.display());
    } else {
        println!("\nchart: {}", args.svg.display());
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&rows).expect("rows serialize");
        match write_file(path, &json) {
            Ok(()) => println!("json: {}", path.display()),
            Err(e) => eprintln!("could not write {}: {e}", path.display()),
        }
    }
    let ok = rows.iter().all(|r| r.error.is_none() && r.byte_exact);
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("some runs failed or were not byte-exact");
        std::process::ExitCode::FAILURE
    }
}

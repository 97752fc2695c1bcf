//! A learner: serves one or more URLs, consumes fixed-size batches of rollout
//! steps and prints metrics per batch. Its actors can be anything that speaks a
//! transport it serves; `python/actor.py` uses id-echo's own Python `TcpClient`.
//!
//! Side by side, in two terminals (the defaults match: 4 actors x 6400 steps =
//! 100 batches of 256):
//!
//! ```text
//! cargo run --release --example learner -- --batches 100
//! .venv/bin/python python/actor.py --actors 4 --steps 6400
//! ```
//!
//! Options: `--listen URL` (repeatable; default `tcp://127.0.0.1:5555`; any scheme
//! this build has, e.g. `unix:///tmp/learner.sock`, or `quic://` with
//! `--features quic`), `--spec FILE` (default `examples/rl_spec.json`, the spec
//! the actor script uses), `--batch-size N`, `--batches N` (stop after N batches;
//! samples already acknowledged are still consumed), `--print-every N`.
//! Ctrl-C shuts down gracefully.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use echo::{Batch, DType, Error, Metrics, Result, Server, Spec};

/// The spec `python/actor.py` sends by default: one Atari-style rollout step.
const DEFAULT_SPEC: &str = include_str!("rl_spec.json");

/// Serve URLs, consume batches, print per-batch metrics.
#[derive(Debug, Parser)]
#[command(name = "learner")]
struct Args {
    /// URL to serve (repeatable).
    #[arg(long = "listen", default_value = "tcp://127.0.0.1:5555")]
    listen: Vec<String>,
    /// Spec file (JSON, nested object or list of leaves); default: examples/rl_spec.json.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Stop after this many batches (default: run until Ctrl-C).
    #[arg(long)]
    batches: Option<u64>,
    /// Print one line every N batches.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    print_every: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let spec = match &args.spec {
        None => Spec::from_json(DEFAULT_SPEC)?,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("reading --spec {}: {e}", path.display())))?;
            Spec::from_json(&text)?
        }
    };
    let server = Server::builder(spec.clone())
        .batch_size(args.batch_size)
        .registry(echo::registry())
        .build()?;
    println!("spec: {spec}");
    for url in &args.listen {
        let bound = server.listen(url).await?;
        println!("listening on {bound}");
    }
    println!(
        "schemes in this build: {}",
        server.registry().schemes().join(", ")
    );

    let started = Instant::now();
    // Rates are over the interval since the previous line (none for the first).
    let mut last: Option<(Instant, Metrics)> = None;
    let mut shutdown = None;
    let (mut batches, mut samples) = (0u64, 0u64);
    loop {
        let batch = tokio::select! {
            batch = server.next_batch() => batch,
            _ = tokio::signal::ctrl_c(), if shutdown.is_none() => {
                println!("Ctrl-C: shutting down, consuming what was acknowledged");
                shutdown = Some(tokio::spawn({ let s = server.clone(); async move { s.shutdown().await } }));
                continue;
            }
        };
        let Some(batch) = batch else { break };
        batches += 1;
        samples += batch.len() as u64;
        let stats = learn(&batch)?;
        if batches % args.print_every == 0 || batch.is_partial() {
            let (now, m) = (Instant::now(), server.metrics());
            let rates = match &last {
                Some((then, prev)) => {
                    let secs = now.duration_since(*then).as_secs_f64().max(1e-9);
                    format!(
                        "{:>9.0} samples/s  {:>8.1} MB/s",
                        (m.samples_inserted_total - prev.samples_inserted_total) as f64 / secs,
                        (m.bytes_received - prev.bytes_received) as f64 / secs / 1e6
                    )
                }
                None => format!("{:>9} samples/s  {:>8} MB/s", "-", "-"),
            };
            println!(
                "batch {:>5}  {:>4} samples  {rates}  connections {}  queue depth {}  store {}{stats}",
                batch.seq(),
                batch.len(),
                m.active_connections,
                m.queue_depth_sum,
                m.store_size,
            );
            last = Some((now, m));
        }
        drop(batch); // hands the slots back to the ring
        if args.batches.is_some_and(|n| batches >= n) && shutdown.is_none() {
            // Stop accepting; keep consuming while shutdown drains the queues.
            shutdown = Some(tokio::spawn({
                let s = server.clone();
                async move { s.shutdown().await }
            }));
        }
    }
    if let Some(s) = shutdown {
        s.await
            .map_err(|e| Error::Other(format!("shutdown task: {e}")))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let m = server.metrics();
    println!(
        "done: {batches} batches, {samples} samples, {:.1} MB in {secs:.1} s; per transport: {}",
        m.bytes_received as f64 / 1e6,
        m.transports
            .iter()
            .map(|(k, t)| format!(
                "{k} {} samples over {} connections",
                t.samples, t.connections_total
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Stands in for a training step: reads a few leaves in place (zero-copy views
/// into the ring) and returns a summary for the log line.
fn learn(batch: &Batch) -> Result<String> {
    let mut out = String::new();
    if let Some(reward) = batch.leaf_by_name("reward") {
        if reward.dtype() == DType::Float32 {
            let r: &[f32] = reward.as_slice()?;
            let mean = r.iter().map(|&x| f64::from(x)).sum::<f64>() / r.len().max(1) as f64;
            out += &format!("  mean reward {mean:.3}");
        }
    }
    if let Some(done) = batch.leaf_by_name("done") {
        if done.dtype() == DType::Bool {
            let episodes = done.bytes().iter().filter(|&&d| d != 0).count();
            out += &format!("  episodes ended {episodes}");
        }
    }
    Ok(out)
}

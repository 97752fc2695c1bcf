//! echo-server's command line, start-up, batch consumer and graceful shutdown.

mod control;
mod npz;
mod progress;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use echo::{Server, Spec};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use control::{ControlAddr, ControlState, SocketFile, StreamListener};
pub(crate) use progress::Progress;

const ABOUT: &str =
    "Receive samples over echo's transports, assemble batches, write them as .npz files.";

const LONG_ABOUT: &str = "\
Receive samples over echo's transports, assemble them into batches and write
each batch as an .npz file (or just count them).

At start, once every listener is bound, stdout gets one line per listener:
    listening URL [KEY=VALUE...]     (the bound address; e.g. cert=PATH for QUIC)
then, if asked for:
    control PORT_OR_PATH             (--control; what echo-ctl takes)
    control-dgram PATH               (--control-dgram)
Logs go to stderr (RUST_LOG sets the filter, default info); on a terminal a
live progress line shows samples/s, MB/s and connections.

--out DIR writes DIR/batch-000000.npz, batch-000001.npz, ...: numpy.load gives
one array per leaf, named by the leaf, shaped (batch, *shape), of the leaf's
dtype. SIGINT or SIGTERM drains gracefully: every acknowledged sample is
written, the last short batch as batch-NNNNNN-partial.npz. A second signal
exits at once (status 130). --max-batches N exits 0 after N batches; samples
received beyond them are not written (their count is logged).

Control plane (fastdaemon protocol; query it with echo-ctl): commands help,
stats [--json], spec [--json], listeners [--json], health. It is read-only. A
TCP control port (on 127.0.0.1) is reachable by every local user; a Unix
socket is owner-only (0600).

Exit status: 0 done (signal, --max-batches), 1 error (bad spec, bind failure,
write failure), 2 usage error, 130 forced by a second signal.";

/// echo-server's command line.
#[derive(Debug, Parser)]
#[command(name = "echo-server", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// The sample spec: a JSON file, either a list of {name, shape, dtype} leaves or
    /// a nested object whose leaves are {shape, dtype}.
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,

    /// Samples per batch.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,

    /// Batches in the ring buffer (at least 2).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..))]
    num_buffers: u32,

    /// A URL to listen on (repeatable), any registered scheme, e.g. tcp://127.0.0.1:0,
    /// unix:///tmp/echo.sock; port 0 picks a free port.
    #[arg(long = "listen", value_name = "URL", required = true)]
    listen: Vec<String>,

    /// Control plane address: a number is a TCP port on 127.0.0.1 (0: any free
    /// port), anything else a Unix socket path (created 0600, removed on exit).
    #[arg(long, value_name = "ADDR")]
    control: Option<String>,

    /// Also serve the control plane on a Unix datagram socket at PATH (for
    /// `echo-ctl --dgram PATH`; created 0600, removed on exit).
    #[arg(long, value_name = "PATH")]
    control_dgram: Option<PathBuf>,

    /// Write every batch to DIR as batch-NNNNNN.npz (created if missing; must not
    /// already hold batch files).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Microseconds a drained TCP or Unix connection of small samples (up to
    /// 8 KiB) polls its socket before it sleeps: less latency per round trip
    /// for some CPU while waiting. 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    busy_poll_us: u64,

    /// Leave the C allocator's thresholds at glibc's defaults. Without this,
    /// echo-server lets up to 32 MiB blocks come from the heap and keeps up to
    /// 16 MiB of freed memory for reuse instead of handing it back to the kernel
    /// at once (fewer page faults at high rates; see echo_core::heap).
    #[arg(long)]
    default_heap: bool,

    /// Exit 0 after N batches.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_batches: Option<u64>,
}

/// Runs echo-server; returns its exit status.
pub(crate) fn main() -> ExitCode {
    let args = Args::parse();
    let heap = !args.default_heap && echo_core::heap::server_heap();
    let tty = std::io::stderr().is_terminal();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::LogWriter { tty })
        .with_ansi(tty)
        .with_target(false)
        .init();
    if !args.default_heap && !heap {
        tracing::debug!("the C allocator's thresholds are its defaults (not glibc, or refused)");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo-server: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(run(args, tty)) {
        Ok(code) => code,
        Err(e) => {
            progress::clear_line(tty);
            eprintln!("echo-server: error: {e}");
            ExitCode::from(1)
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// What the consumer thread tells the main task.
#[derive(Debug)]
enum Event {
    MaxReached,
    Failed(String),
}

/// Why the server stops.
#[derive(Debug)]
enum Stop {
    Signal(&'static str),
    MaxReached,
    Failed(String),
}

/// The control plane's sockets and threads, torn down at exit.
#[derive(Debug, Default)]
struct ControlPlane {
    task: Option<tokio::task::JoinHandle<()>>,
    dgram: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    files: Vec<SocketFile>,
}

impl ControlPlane {
    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some((stop, thread)) = self.dgram.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        // Dropping the files removes the sockets (if they are still ours).
        self.files.clear();
    }
}

fn check_out_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("--out {}: {e}", dir.display()))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("--out {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("batch-") && name.ends_with(".npz") {
            return Err(format!(
                "--out {}: already holds batch files ({name}, ...); choose an empty directory or remove them",
                dir.display()
            ));
        }
    }
    Ok(())
}

async fn run(args: Args, tty: bool) -> Result<ExitCode, String> {
    // Handlers first, so a signal right after the `listening` lines drains.
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;

    let text = std::fs::read_to_string(&args.spec)
        .map_err(|e| format!("--spec {}: {e}", args.spec.display()))?;
    let spec =
        Spec::from_json(&text).map_err(|e| format!("--spec {}: {e}", args.spec.display()))?;
    if let Some(dir) = &args.out {
        check_out_dir(dir)?;
    }
    let server = Server::builder(spec)
        .batch_size(args.batch_size as usize)
        .num_buffers(args.num_buffers as usize)
        .busy_poll(Duration::from_micros(args.busy_poll_us))
        .registry(echo::registry())
        .build()
        .map_err(|e| e.to_string())?;

    // The control sockets first: a live server on the same path stops us before
    // anything else is bound.
    let mut plane = ControlPlane::default();
    let control = match &args.control {
        Some(a) => Some(StreamListener::bind(&ControlAddr::parse(a)?)?),
        None => None,
    };
    let dgram = match &args.control_dgram {
        Some(p) => Some(control::bind_dgram(p)?),
        None => None,
    };
    for url in &args.listen {
        server
            .listen(url)
            .await
            .map_err(|e| format!("--listen {url}: {e}"))?;
    }
    {
        let mut out = std::io::stdout().lock();
        let mut lines = String::new();
        for l in server.listeners() {
            lines.push_str(&format!("listening {}", l.url));
            for (k, v) in &l.details {
                lines.push_str(&format!(" {k}={v}"));
            }
            lines.push('\n');
        }
        if let Some((_, shown)) = &control {
            lines.push_str(&format!("control {shown}\n"));
        }
        if let Some(p) = &args.control_dgram {
            lines.push_str(&format!("control-dgram {}\n", p.display()));
        }
        out.write_all(lines.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| format!("writing to stdout: {e}"))?;
    }
    tracing::info!(
        "serving {} (batch size {}, {} buffers){}",
        server.spec(),
        args.batch_size,
        args.num_buffers,
        match &args.out {
            Some(d) => format!(", writing batches to {}", d.display()),
            None => String::new(),
        }
    );

    let progress = Arc::new(Progress::default());
    let state = Arc::new(ControlState {
        server: server.clone(),
        started: Instant::now(),
        num_buffers: args.num_buffers as usize,
        out: args.out.clone(),
        max_batches: args.max_batches,
        progress: progress.clone(),
    });
    if let Some((listener, _)) = control {
        let (task, file) = control::spawn_stream_server(listener, state.clone());
        plane.task = Some(task);
        plane.files.extend(file);
    }
    if let Some((sock, file)) = dgram {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = control::spawn_dgram_server(sock, state.clone(), stop.clone())
            .map_err(|e| format!("control datagram thread: {e}"))?;
        plane.dgram = Some((stop, thread));
        plane.files.push(file);
    }

    let (events, mut event_rx) = mpsc::unbounded_channel();
    let consumer = {
        let server = server.clone();
        let out = args.out.clone();
        let progress = progress.clone();
        let max = args.max_batches;
        std::thread::Builder::new()
            .name("echo-consumer".into())
            .spawn(move || consume(&server, out.as_deref(), max, &progress, &events))
            .map_err(|e| format!("consumer thread: {e}"))?
    };
    let reporter = tokio::spawn(progress::report(server.clone(), progress.clone(), tty));

    let stop = tokio::select! {
        _ = sigint.recv() => Stop::Signal("SIGINT"),
        _ = sigterm.recv() => Stop::Signal("SIGTERM"),
        ev = event_rx.recv() => match ev {
            Some(Event::MaxReached) => Stop::MaxReached,
            Some(Event::Failed(e)) => Stop::Failed(e),
            None => Stop::Failed("the batch consumer stopped unexpectedly".into()),
        },
    };
    match &stop {
        Stop::Signal(s) => tracing::info!("{s}: draining (a second signal exits at once)"),
        Stop::MaxReached => tracing::info!(
            "wrote {} batches (--max-batches); shutting down",
            args.max_batches.unwrap_or(0)
        ),
        Stop::Failed(e) => tracing::error!("{e}; shutting down"),
    }

    // Drain: stop accepting, move every queued sample into the store, hand the
    // consumer the rest. A second signal cuts it short.
    let drained = async {
        if let Err(e) = server.shutdown().await {
            tracing::error!("shutdown: {e}");
        }
        tokio::task::spawn_blocking(move || consumer.join())
            .await
            .map_err(|e| format!("consumer join: {e}"))?
            .map_err(|_| "the batch consumer panicked".to_string())?
    };
    let result = tokio::select! {
        r = drained => r,
        _ = sigint.recv() => Err("second signal: exiting without draining".to_string()),
        _ = sigterm.recv() => Err("second signal: exiting without draining".to_string()),
    };
    let forced = matches!(&result, Err(e) if e.starts_with("second signal"));
    reporter.abort();
    progress::clear_line(tty);
    plane.stop();

    let p = progress.snapshot();
    tracing::info!(
        "done: {} batches, {} samples{}{}",
        p.batches,
        p.samples,
        if args.out.is_some() {
            format!(", {} bytes written", p.bytes)
        } else {
            String::new()
        },
        if p.discarded > 0 {
            format!(", {} received samples not written", p.discarded)
        } else {
            String::new()
        }
    );
    if p.discarded > 0 {
        tracing::warn!("{} received samples were not written", p.discarded);
    }
    if forced {
        tracing::warn!("second signal: exiting without draining");
        return Ok(ExitCode::from(130));
    }
    result?;
    match stop {
        Stop::Failed(e) => Err(e),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// The consumer: takes every batch, writes it (with --out), counts it. After
/// --max-batches or a write error, the rest is taken and discarded so that
/// shutdown never waits on a full ring.
fn consume(
    server: &Server,
    out: Option<&Path>,
    max: Option<u64>,
    progress: &Progress,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let mut failed: Option<String> = None;
    let mut index = 0u64;
    while let Some(batch) = server.next_batch_blocking() {
        if failed.is_some() || max.is_some_and(|m| index >= m) {
            progress.discard(batch.len());
            continue;
        }
        let mut file_bytes = 0;
        if let Some(dir) = out {
            match npz::write_batch(dir, index, &batch) {
                Ok((path, n)) => {
                    file_bytes = n;
                    tracing::debug!("wrote {}", path.display());
                }
                Err(e) => {
                    let msg = format!("writing batch {index} to {}: {e}", dir.display());
                    progress.discard(batch.len());
                    failed = Some(msg.clone());
                    let _ = events.send(Event::Failed(msg));
                    continue;
                }
            }
        }
        if batch.is_partial() {
            tracing::info!(
                "final partial batch {index}: {} of {} samples",
                batch.len(),
                server.batch_size()
            );
        }
        progress.batch_done(batch.len(), file_bytes);
        index += 1;
        drop(batch);
        if max == Some(index) {
            let _ = events.send(Event::MaxReached);
        }
    }
    failed.map_or(Ok(()), Err)
}

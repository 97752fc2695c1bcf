//! The control plane: one fastdaemon request per connection (`[stdin, args]`),
//! one reply (`[stdout, stderr]`), then close. Served on TCP (127.0.0.1), a Unix
//! stream socket or a Unix datagram socket (one record per datagram).

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echo::control::{Reply, Request};
use echo::Server;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Progress;

/// The largest request accepted: requests are a command line and (unused) stdin.
pub(crate) const MAX_REQUEST: usize = 1 << 20;
/// How long a peer has to send its request, and to take the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once; more wait in the listen backlog.
const MAX_CONCURRENT: usize = 64;
/// The largest datagram request read; also the most a datagram reply may hold.
const MAX_DGRAM: usize = 1 << 16;

pub(crate) const HELP: &str = "\
echo-server control commands (send with echo-ctl PORT_OR_PATH COMMAND):
  help               this list
  stats [--json]     the metrics snapshot: samples, bytes, batches, connections
  spec [--json]      the sample spec (--json: the list form --spec accepts)
  listeners [--json] the bound data listeners and their details
  health             `ok` while serving; an error on stderr once shutting down
";

/// What the control plane reports on.
#[derive(Debug)]
pub(crate) struct ControlState {
    pub(crate) server: Server,
    pub(crate) started: Instant,
    pub(crate) num_buffers: usize,
    pub(crate) out: Option<PathBuf>,
    pub(crate) max_batches: Option<u64>,
    pub(crate) progress: Arc<Progress>,
}

/// Where `--control` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ControlAddr {
    /// A TCP port on 127.0.0.1 (0: any free port).
    Tcp(u16),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ControlAddr {
    /// A number is a TCP port; anything else a Unix socket path.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err(
                "--control: empty address; expected a TCP port or a Unix socket path".into(),
            );
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u16>().map(ControlAddr::Tcp).map_err(|_| {
                format!(
                    "--control {s}: port out of range; expected 0..=65535 (or a Unix socket path)"
                )
            });
        }
        Ok(ControlAddr::Unix(PathBuf::from(s)))
    }
}

/// A socket file this process created: removed on drop if it is still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stream,
    Dgram,
}

/// Makes `path` free for a new socket: nothing there, or a stale socket from a dead
/// server (removed). A live socket or any other file is an error.
fn clear_stale(path: &Path, kind: Kind) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("control socket {}: {e}", path.display())),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "control socket {}: the path exists and is not a socket; refusing to replace it",
            path.display()
        ));
    }
    let probe = match kind {
        Kind::Stream => UnixStream::connect(path).map(drop),
        Kind::Dgram => UnixDatagram::unbound().and_then(|s| s.connect(path)),
    };
    match probe {
        Ok(()) => Err(format!(
            "control socket {} is in use by a running server; refusing to replace it",
            path.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("replacing stale control socket {}", path.display());
            std::fs::remove_file(path)
                .map_err(|e| format!("removing stale control socket {}: {e}", path.display()))
        }
        Err(e) => Err(format!(
            "control socket {} exists and cannot be probed ({e}); refusing to replace it",
            path.display()
        )),
    }
}

/// Binds a Unix socket at `path` readable and writable by the owner only.
fn bind_private<T>(
    path: &Path,
    kind: Kind,
    bind: impl FnOnce(&Path) -> io::Result<T>,
) -> Result<(T, SocketFile), String> {
    clear_stale(path, kind)?;
    // SAFETY: umask has no memory-safety preconditions. It is process-wide: this
    // runs at start-up, before any other thread of ours creates files.
    let old = unsafe { libc::umask(0o177) };
    let bound = bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let sock = bound.map_err(|e| format!("binding control socket {}: {e}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .and_then(|m| std::fs::set_permissions(path, Permissions::from_mode(0o600)).map(|_| m))
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    Ok((
        sock,
        SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// A bound stream control listener.
#[derive(Debug)]
pub(crate) enum StreamListener {
    /// TCP on 127.0.0.1.
    Tcp(tokio::net::TcpListener),
    /// A Unix stream socket and its file.
    Unix(tokio::net::UnixListener, SocketFile),
}

impl StreamListener {
    /// Binds `addr`; also returns what echo-ctl takes to reach it (a port or a path).
    /// Must run inside the tokio runtime.
    pub(crate) fn bind(addr: &ControlAddr) -> Result<(Self, String), String> {
        match addr {
            ControlAddr::Tcp(port) => {
                let l = std::net::TcpListener::bind(("127.0.0.1", *port))
                    .and_then(|l| l.set_nonblocking(true).map(|_| l))
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|e| format!("--control {port}: binding 127.0.0.1:{port}: {e}"))?;
                let bound = l
                    .local_addr()
                    .map_err(|e| format!("--control {port}: {e}"))?
                    .port();
                Ok((StreamListener::Tcp(l), bound.to_string()))
            }
            ControlAddr::Unix(path) => {
                let (l, file) = bind_private(path, Kind::Stream, |p| UnixListener::bind(p))?;
                let l = l
                    .set_nonblocking(true)
                    .and_then(|_| tokio::net::UnixListener::from_std(l))
                    .map_err(|e| format!("--control {}: {e}", path.display()))?;
                Ok((
                    StreamListener::Unix(l, file),
                    path.to_string_lossy().into_owned(),
                ))
            }
        }
    }
}

/// Binds the datagram control socket at `path`.
pub(crate) fn bind_dgram(path: &Path) -> Result<(UnixDatagram, SocketFile), String> {
    bind_private(path, Kind::Dgram, |p| UnixDatagram::bind(p))
}

/// Serves stream control connections until the task is aborted. The socket file
/// (if any) is handed back so the caller controls when it is removed.
pub(crate) fn spawn_stream_server(
    listener: StreamListener,
    state: Arc<ControlState>,
) -> (tokio::task::JoinHandle<()>, Option<SocketFile>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    match listener {
        StreamListener::Tcp(l) => {
            let task = tokio::spawn(async move {
                loop {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        return;
                    };
                    match l.accept().await {
                        Ok((s, peer)) => {
                            let state = state.clone();
                            tokio::spawn(async move {
                                handle(s, &state, &peer.to_string()).await;
                                drop(permit);
                            });
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
            (task, None)
        }
        StreamListener::Unix(l, file) => {
            let task = tokio::spawn(async move {
                loop {
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        return;
                    };
                    match l.accept().await {
                        Ok((s, _)) => {
                            let state = state.clone();
                            tokio::spawn(async move {
                                handle(s, &state, "unix peer").await;
                                drop(permit);
                            });
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
            (task, Some(file))
        }
    }
}

async fn accept_failed(e: io::Error) {
    // Typically out of file descriptors: back off instead of spinning.
    tracing::warn!("control: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One request, one reply, close. Bad or slow requests just close the connection.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: &ControlState, peer: &str) {
    let request =
        match tokio::time::timeout(IO_TIMEOUT, Request::read_async(&mut s, MAX_REQUEST)).await {
            Err(_) => {
                tracing::warn!(
                    "control: {peer} sent no complete request within {IO_TIMEOUT:?}; closing"
                );
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!("control: bad request from {peer}: {e}; closing");
                return;
            }
            Ok(Ok(r)) => r,
        };
    tracing::debug!("control: {peer}: {:?}", request.args);
    let reply = dispatch(state, &request.args);
    let sent = tokio::time::timeout(IO_TIMEOUT, async {
        reply.write_async(&mut s).await?;
        s.shutdown().await?;
        Ok::<_, echo::control::ControlError>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("control: reply to {peer}: {e}"),
        Err(_) => tracing::warn!("control: {peer} did not take its reply within {IO_TIMEOUT:?}"),
    }
}

/// Serves the datagram socket on its own thread until `stop` is set.
pub(crate) fn spawn_dgram_server(
    sock: UnixDatagram,
    state: Arc<ControlState>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    // A peer that does not read its replies must not stall the others.
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    std::thread::Builder::new()
        .name("echo-control-dgram".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DGRAM + 1];
            while !stop.load(Ordering::Relaxed) {
                let (n, peer) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        tracing::warn!("control datagram: receive failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let reply = if n > MAX_DGRAM {
                    Reply::err(format!(
                        "echo-server: request datagram larger than {MAX_DGRAM} bytes; refused\n"
                    ))
                } else {
                    match Request::decode(&buf[..n], MAX_DGRAM) {
                        Ok(r) => dispatch(&state, &r.args),
                        Err(e) => {
                            tracing::warn!("control datagram: bad request: {e}");
                            Reply::err(format!("echo-server: bad request datagram: {e}\n"))
                        }
                    }
                };
                let bytes = match reply.encode() {
                    Ok(b) if b.len() <= MAX_DGRAM => b,
                    Ok(b) => match Reply::err(format!(
                        "echo-server: the reply ({} bytes) does not fit one datagram; use the stream socket (--control)\n",
                        b.len()
                    ))
                    .encode()
                    {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                    Err(_) => continue,
                };
                if peer.is_unnamed() {
                    tracing::debug!("control datagram: request from an unbound socket; no reply possible");
                    continue;
                }
                if let Err(e) = sock.send_to_addr(&bytes, &peer) {
                    tracing::debug!("control datagram: reply not delivered: {e}");
                }
            }
        })
}

fn usage_error(cmd: &str, arg: &str, usage: &str) -> Reply {
    Reply::err(format!(
        "echo-server: {cmd}: unexpected argument {arg:?}; usage: {usage}\n"
    ))
}

/// Parses a command's options: `--json` where `json_ok`, nothing else.
fn flags(cmd: &str, rest: &[&str], json_ok: bool) -> Result<bool, Reply> {
    let usage = if json_ok {
        format!("{cmd} [--json]")
    } else {
        cmd.to_string()
    };
    let mut json = false;
    for &a in rest {
        match a {
            "--json" if json_ok => json = true,
            other => return Err(usage_error(cmd, other, &usage)),
        }
    }
    Ok(json)
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

/// Answers one request's argument line.
pub(crate) fn dispatch(state: &ControlState, args: &str) -> Reply {
    let words: Vec<&str> = args.split_whitespace().collect();
    let Some((&cmd, rest)) = words.split_first() else {
        return Reply::ok(HELP);
    };
    let json_ok = matches!(cmd, "stats" | "spec" | "listeners");
    let known = json_ok || matches!(cmd, "help" | "health");
    if !known {
        return Reply::err(format!(
            "echo-server: unknown command {cmd:?}; try `help` for the list of commands\n"
        ));
    }
    let json = match flags(cmd, rest, json_ok) {
        Ok(j) => j,
        Err(reply) => return reply,
    };
    match cmd {
        "help" => Reply::ok(HELP),
        "health" => {
            if state.server.is_shutting_down() {
                Reply {
                    stdout: "draining\n".into(),
                    stderr: "echo-server: shutting down\n".into(),
                }
            } else {
                Reply::ok("ok\n")
            }
        }
        "stats" => stats(state, json),
        "spec" => {
            let spec = state.server.spec();
            if json {
                Reply::ok(pretty(&spec.to_json()))
            } else {
                let mut s = String::new();
                for l in spec.leaves() {
                    s.push_str(&format!("{}\t{}\t{:?}\n", l.name, l.dtype, l.shape));
                }
                s.push_str(&format!(
                    "payload_size\t{} bytes\nbatch_size\t{}\n",
                    spec.payload_size(),
                    state.server.batch_size()
                ));
                Reply::ok(s)
            }
        }
        "listeners" => {
            let ls = state.server.listeners();
            if json {
                let v: Vec<_> = ls
                    .iter()
                    .map(|l| {
                        let details: serde_json::Map<_, _> = l
                            .details
                            .iter()
                            .map(|(k, v)| (k.clone(), json!(v)))
                            .collect();
                        json!({"url": l.url, "details": details})
                    })
                    .collect();
                Reply::ok(pretty(&json!(v)))
            } else {
                let mut s = String::new();
                for l in ls {
                    s.push_str(&l.url);
                    for (k, v) in &l.details {
                        s.push_str(&format!(" {k}={v}"));
                    }
                    s.push('\n');
                }
                Reply::ok(s)
            }
        }
        _ => Reply::err(format!("echo-server: command {cmd:?} is not implemented\n")),
    }
}

fn stats(state: &ControlState, json: bool) -> Reply {
    let m = state.server.metrics();
    let p = state.progress.snapshot();
    let server = json!({
        "uptime_secs": state.started.elapsed().as_secs_f64(),
        "shutting_down": state.server.is_shutting_down(),
        "batch_size": state.server.batch_size(),
        "num_buffers": state.num_buffers,
        "payload_size": state.server.spec().payload_size(),
        "batches_written": p.batches,
        "samples_written": p.samples,
        "bytes_written": p.bytes,
        "samples_discarded": p.discarded,
        "out": state.out.as_ref().map(|d| d.to_string_lossy().into_owned()),
        "max_batches": state.max_batches,
    });
    let mut v = match serde_json::to_value(&m) {
        Ok(v) => v,
        Err(e) => return Reply::err(format!("echo-server: stats: {e}\n")),
    };
    if json {
        v["server"] = server;
        return Reply::ok(pretty(&v));
    }
    let mut s = String::new();
    let mut line = |k: &str, v: &serde_json::Value| {
        let v = match v {
            serde_json::Value::String(t) => t.clone(),
            serde_json::Value::Number(n) if n.is_f64() => {
                format!("{:.3}", n.as_f64().unwrap_or(0.0))
            }
            other => other.to_string(),
        };
        s.push_str(&format!("{k:<24}{v}\n"));
    };
    if let serde_json::Value::Object(map) = &server {
        for (k, v) in map {
            line(k, v);
        }
    }
    if let serde_json::Value::Object(map) = &v {
        for (k, v) in map {
            match k.as_str() {
                "transports" => {}
                "ingress_latency" if v.is_null() => {}
                _ => line(k, v),
            }
        }
    }
    for (scheme, t) in &m.transports {
        s.push_str(&format!(
            "transport {scheme:<14}connections {} active / {} total / {} refused, {} samples, {} bytes\n",
            t.connections_active, t.connections_total, t.connections_refused, t.samples, t.bytes
        ));
    }
    Reply::ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use echo::Spec;

    fn state() -> ControlState {
        let spec = Spec::from_json(r#"{"obs": {"shape": [2], "dtype": "float32"}}"#).unwrap();
        ControlState {
            server: Server::builder(spec).batch_size(4).build().unwrap(),
            started: Instant::now(),
            num_buffers: 3,
            out: None,
            max_batches: None,
            progress: Arc::default(),
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(ControlAddr::parse("0").unwrap(), ControlAddr::Tcp(0));
        assert_eq!(ControlAddr::parse("7000").unwrap(), ControlAddr::Tcp(7000));
        assert!(ControlAddr::parse("70000")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            ControlAddr::parse("ctl.sock").unwrap(),
            ControlAddr::Unix("ctl.sock".into())
        );
        assert!(ControlAddr::parse("").is_err());
    }

    #[tokio::test]
    async fn commands() {
        let s = state();
        assert_eq!(dispatch(&s, "health"), Reply::ok("ok\n"));
        assert_eq!(dispatch(&s, "help"), Reply::ok(HELP));
        assert_eq!(dispatch(&s, ""), Reply::ok(HELP));
        let r = dispatch(&s, "frobnicate now");
        assert!(r.stdout.is_empty());
        assert!(r.stderr.contains("\"frobnicate\""), "{r:?}");
        assert!(r.stderr.contains("help"), "{r:?}");
        let r = dispatch(&s, "stats --yaml");
        assert!(r.stderr.contains("usage: stats [--json]"), "{r:?}");
        let r = dispatch(&s, "health --json");
        assert!(r.stderr.contains("unexpected argument"), "{r:?}");
        let v: serde_json::Value =
            serde_json::from_str(&dispatch(&s, "stats --json").stdout).unwrap();
        assert_eq!(v["samples_inserted_total"], 0);
        assert_eq!(v["server"]["batch_size"], 4);
        assert!(dispatch(&s, "stats").stdout.contains("batches_total"));
        let spec = dispatch(&s, "spec  --json").stdout;
        assert_eq!(Spec::from_json(&spec).unwrap(), *s.server.spec());
        assert!(dispatch(&s, "spec")
            .stdout
            .starts_with("obs\tfloat32\t[2]\n"));
        s.server.shutdown().await.unwrap();
        let r = dispatch(&s, "health");
        assert!(!r.stderr.is_empty());
    }
}

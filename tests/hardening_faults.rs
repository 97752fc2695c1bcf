//! Faults on every transport (`tcp://`, `unix://`, `grpc://`, `grpcs://`,
//! `quic://`, and `quic://` with clients spreading samples over four streams,
//! where arrival order between streams is free):
//!
//! * Client processes killed (SIGKILL) at arbitrary points, often inside a
//!   payload, while in-process clients keep sending to the same server. Every
//!   acknowledged sample of every client arrives exactly once and byte-exact; a
//!   dead client's partial payload never does; the dead clients' connections are
//!   released; then the server shuts down under load, and the clients still
//!   sending get `ConnectionClosed` while the consumer gets everything they saw
//!   acknowledged.
//! * A consumer that stops for seconds under load: the process's resident set
//!   stays within a bound derived from the configuration, nothing is dropped, and
//!   the flow resumes.
//!
//! The killed clients are this test binary re-executed with `ECHO_FAULT_CHILD`
//! set. Half of them write raw protocol bytes, each payload in two halves with a
//! pause between, so that most kills land inside a payload: wire v1 on a TCP or
//! Unix socket or a QUIC stream, or gRPC messages on a hand-driven HTTP/2 stream
//! (over rustls for `grpcs://`).
//! The other half use the transport's own client. Each prints `sent N` and
//! `acked N` as it goes, so the parent knows what was acknowledged before the
//! kill. The stalled-consumer tests run in a child process of their own, so that
//! its resident set is theirs alone.
#![cfg(any(feature = "tcp", feature = "grpc", feature = "quic"))]

mod hardening;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echo::{Limits, Server, Spec};
use echo_core::testkit::{kit_sample, kit_spec};
use hardening::{
    assert_distinct_within, assert_exactly, assert_exactly_unordered, assert_prefix, connect, opts,
    rss_kib, spawn_consumer, spawn_until_closed, spawn_until_stopped, take_batch, within, Got,
};

/// Child mode: `MODE ID URL`, MODE being `raw` or `client`.
const CHILD_ENV: &str = "ECHO_FAULT_CHILD";
/// Set to a test's name to run that test's body in this (child) process.
const OWN_PROCESS_ENV: &str = "ECHO_FAULT_OWN_PROCESS";
/// Payload size of the killed-clients tests.
const SIZE: usize = 1024;
/// Most payloads a raw child sends ahead of its acks.
const RAW_INFLIGHT: u64 = 32;

// ---------------------------------------------------------------------------
// The tests, per transport.

#[cfg(feature = "tcp")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_tcp() {
    killed_clients(
        "killed_client_processes_lose_nothing_acknowledged_tcp",
        "tcp://127.0.0.1:0",
    );
}

#[cfg(feature = "tcp")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_unix() {
    let dir = tempfile::tempdir().unwrap();
    killed_clients(
        "killed_client_processes_lose_nothing_acknowledged_unix",
        &format!("unix://{}/faults.sock", dir.path().display()),
    );
}

#[cfg(feature = "grpc")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_grpc() {
    killed_clients(
        "killed_client_processes_lose_nothing_acknowledged_grpc",
        "grpc://127.0.0.1:0",
    );
}

/// gRPC over TLS: the raw children drive HTTP/2 on a rustls connection of
/// their own, the other clients trust the server's certificate by `ca`.
#[cfg(feature = "grpc")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_grpcs() {
    let (_dir, bind, client_query) = grpcs_urls();
    killed_clients_with(
        "killed_client_processes_lose_nothing_acknowledged_grpcs",
        &bind,
        &client_query,
        1,
    );
}

/// A `grpcs://` listener URL with a fresh self-signed certificate for
/// `localhost` (in the returned directory), and the query that makes clients
/// trust it.
#[cfg(feature = "grpc")]
fn grpcs_urls() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = hardening::self_signed(dir.path(), "localhost");
    let bind = format!(
        "grpcs://127.0.0.1:0?cert={}&key={}",
        cert.display(),
        key.display()
    );
    let client_query = format!("ca={}&domain=localhost", cert.display());
    (dir, bind, client_query)
}

/// A killed QUIC peer sends nothing more, not even a close: the server notices
/// through its idle timeout (3 s here).
#[cfg(feature = "quic")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_quic() {
    killed_clients(
        "killed_client_processes_lose_nothing_acknowledged_quic",
        "quic://127.0.0.1:0?idle_timeout=3",
    );
}

/// QUIC clients spreading samples over four streams of one connection (the raw
/// children write on one stream): a kill ends every stream of the connection,
/// and whatever each stream had acknowledged arrives.
#[cfg(feature = "quic")]
#[test]
fn killed_client_processes_lose_nothing_acknowledged_quic_four_streams() {
    killed_clients_with(
        "killed_client_processes_lose_nothing_acknowledged_quic_four_streams",
        "quic://127.0.0.1:0?idle_timeout=3",
        "streams=4",
        4,
    );
}

#[cfg(feature = "tcp")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_tcp() {
    stalled_consumer(
        "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_tcp",
        "tcp://127.0.0.1:0",
    );
}

#[cfg(feature = "grpc")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_grpc() {
    stalled_consumer(
        "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_grpc",
        "grpc://127.0.0.1:0",
    );
}

#[cfg(feature = "quic")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic() {
    stalled_consumer(
        "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic",
        "quic://127.0.0.1:0",
    );
}

#[cfg(feature = "grpc")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_grpcs() {
    let (_dir, bind, client_query) = grpcs_urls();
    stalled_consumer_with(
        "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_grpcs",
        &bind,
        &client_query,
        1,
    );
}

#[cfg(feature = "quic")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic_four_streams() {
    stalled_consumer_with(
        "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic_four_streams",
        "quic://127.0.0.1:0",
        "streams=4",
        4,
    );
}

/// The QUIC case again with the allocator set as echo-server sets it
/// (`echo::heap::server_heap`: freed memory stays in the process for reuse),
/// under the same bound.
#[cfg(feature = "quic")]
#[test]
fn a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic_server_heap() {
    let name = "a_stalled_consumer_keeps_memory_bounded_and_loses_nothing_quic_server_heap";
    in_own_process(name, 90, || {
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert!(
            echo::heap::server_heap() || !glibc,
            "glibc refused the settings"
        );
        runtime().block_on(within(
            60,
            "the stalled-consumer test",
            run_stalled("quic://127.0.0.1:0", "", 1),
        ))
    });
}

/// A process that keeps replacing QUIC clients while others keep sending stays
/// bounded in memory. Each client has an endpoint of its own; quinn sized its
/// receive buffer at 13 MiB (6500-byte packets x 64 offload segments x 32), and
/// once glibc had freed one such block it served the next from the heap, zeroed
/// and so resident, growing the process by about a megabyte per client that
/// came and went. Client endpoints now receive one datagram of at most 1472
/// bytes per slot (46 KiB). `loopback_mtu=0` gives the packet size of a real
/// network (on loopback the default, 64 KiB packets, makes the block larger
/// than glibc's limit for that, which hid the growth).
#[cfg(feature = "quic")]
#[test]
fn replacing_quic_clients_keeps_the_clients_memory_bounded() {
    let name = "replacing_quic_clients_keeps_the_clients_memory_bounded";
    in_own_process(name, 90, || {
        runtime().block_on(within(60, "the churn test", run_churn()))
    });
}

#[cfg(feature = "quic")]
async fn run_churn() {
    let spec = kit_spec(SIZE);
    let server = server_for(&spec);
    let listened = server.listen("quic://127.0.0.1:0").await.unwrap();
    let sep = if listened.contains('?') { '&' } else { '?' };
    let url = format!("{listened}{sep}loopback_mtu=0");
    let consumer = spawn_consumer(&server);
    // 8 slots, each running one client after another: a client sends 40
    // samples, waits for their acks and goes; the slot connects the next one.
    let (slots, per_client) = (8u32, 40u32);
    let generations = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..slots)
        .map(|slot| {
            let (url, spec, generations, stop) =
                (url.clone(), spec.clone(), generations.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0u32;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // Client ids: slot * 10_000 + generation.
                    let id = slot * 10_000 + done;
                    let mut c = connect(&url, &spec).await;
                    for seq in 0..per_client {
                        kit_sample(&spec, id, seq, &mut buf);
                        c.send(&buf).await.unwrap();
                    }
                    c.wait().await.unwrap();
                    c.close().await.unwrap();
                    drop(c);
                    done += 1;
                    generations.fetch_add(1, Ordering::Relaxed);
                }
                done
            })
        })
        .collect();
    // The first generation of every slot is up: the baseline.
    while generations.load(Ordering::Relaxed) < u64::from(slots) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let baseline = rss_kib();
    let mut peak = baseline;
    let target = 200;
    while generations.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_slot = Vec::new();
    for t in tasks {
        per_slot.push(within(20, "a client slot", t).await.unwrap());
    }
    within(20, "shutdown", server.shutdown()).await.unwrap();
    let got = within(10, "the consumer", consumer).await.unwrap();
    let replaced = generations.load(Ordering::Relaxed);
    eprintln!(
        "{replaced} QUIC clients came and went; RSS {baseline} KiB once all 8 slots had \
         one, peak {peak} KiB"
    );
    for (slot, &n) in per_slot.iter().enumerate() {
        for g in 0..n {
            assert_exactly(&got, slot as u32 * 10_000 + g, per_client);
        }
    }
    // Before the fix, about 1 MiB per replaced client: 150+ MiB here.
    let bound = 32 * 1024;
    assert!(
        peak.saturating_sub(baseline) < bound,
        "RSS grew from {baseline} KiB to {peak} KiB while {replaced} QUIC clients were \
         replaced (bound: {bound} KiB of growth)"
    );
}

// ---------------------------------------------------------------------------
// Shared machinery.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Re-executes this test binary to run only `test_name`, with `env` set.
fn reexec(test_name: &str, env: (&str, &str)) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdin(Stdio::null());
    cmd
}

/// Runs `body` in a child process of its own (this binary, running only
/// `test_name`) and fails if it fails or takes over `secs` seconds. Its output is
/// printed as this test's.
fn in_own_process(test_name: &str, secs: u64, body: impl FnOnce()) {
    if std::env::var(OWN_PROCESS_ENV).as_deref() == Ok(test_name) {
        body();
        return;
    }
    let mut child = reexec(test_name, (OWN_PROCESS_ENV, test_name))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "--- {test_name} in its own process:\n{}{}",
        out.join().unwrap(),
        err.join().unwrap()
    );
    let status = status.unwrap_or_else(|| panic!("{test_name} took over {secs} s"));
    assert!(status.success(), "{test_name} failed in its own process");
}

// ---------------------------------------------------------------------------
// Killed client processes: the child side.

/// Prints a progress line (`sent N` or `acked N`) for the parent.
fn report(what: &str, n: u64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{what} {n}").unwrap();
    out.flush().unwrap();
}

/// Child mode: sends samples of its id to the URL until killed (or for at most
/// 20 s, so that an orphan cannot linger).
fn child_main(arg: &str) -> ! {
    let mut parts = arg.splitn(3, ' ');
    let (mode, id, url) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().parse::<u32>().expect("a client id"),
        parts.next().expect("a URL").to_string(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let spec = kit_spec(SIZE);
        let run = async {
            match mode.as_str() {
                "raw" => raw_child(&url, &spec, id).await,
                "client" => client_child(&url, &spec, id).await,
                other => panic!("unknown child mode {other}"),
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(20), run).await;
    });
    std::process::exit(0)
}

/// The transport's own client, sending as fast as its window lets it.
async fn client_child(url: &str, spec: &Spec, id: u32) {
    let mut c = connect(url, spec).await;
    let (mut buf, mut acked) = (Vec::new(), 0);
    for seq in 0u32.. {
        kit_sample(spec, id, seq, &mut buf);
        if c.send(&buf).await.is_err() {
            return;
        }
        report("sent", u64::from(seq) + 1);
        let now = c.stats().acked;
        if now != acked {
            acked = now;
            report("acked", acked);
        }
    }
}

/// Where a raw child writes its bytes.
enum RawWriter {
    /// Wire v1 on a byte stream (TCP, Unix socket, QUIC stream).
    Stream(Box<dyn tokio::io::AsyncWrite + Unpin + Send>),
    /// gRPC messages on an HTTP/2 stream.
    #[cfg(feature = "grpc")]
    Grpc(h2::SendStream<bytes::Bytes>),
}

impl RawWriter {
    /// The bytes that carry `payload`.
    fn frame(&self, payload: &[u8]) -> Vec<u8> {
        match self {
            RawWriter::Stream(_) => payload.to_vec(),
            #[cfg(feature = "grpc")]
            RawWriter::Grpc(_) => {
                use prost::Message;
                let msg = echo::grpc::proto::PushRequest {
                    payloads: bytes::Bytes::copy_from_slice(payload),
                }
                .encode_to_vec();
                // gRPC's length-prefixed message: not compressed, u32 BE length.
                let mut framed = vec![0u8];
                framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                framed.extend_from_slice(&msg);
                framed
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        match self {
            RawWriter::Stream(w) => w.write_all(bytes).await.is_ok() && w.flush().await.is_ok(),
            #[cfg(feature = "grpc")]
            RawWriter::Grpc(s) => s
                .send_data(bytes::Bytes::copy_from_slice(bytes), false)
                .is_ok(),
        }
    }
}

/// Raw protocol bytes, each payload written in two halves with a pause between.
async fn raw_child(url: &str, spec: &Spec, id: u32) {
    let acked = Arc::new(AtomicU64::new(0));
    let mut writer = raw_connect(url, spec, acked.clone()).await;
    let mut buf = Vec::new();
    for seq in 0u32.. {
        while u64::from(seq) >= acked.load(Ordering::Relaxed) + RAW_INFLIGHT {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        kit_sample(spec, id, seq, &mut buf);
        let bytes = writer.frame(&buf);
        let half = 1 + (seq as usize * 37) % (bytes.len() - 1);
        if !writer.write(&bytes[..half]).await {
            return;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
        if !writer.write(&bytes[half..]).await {
            return;
        }
        report("sent", u64::from(seq) + 1);
    }
}

/// Connects below the client API, completes the handshake, and starts a task
/// that counts acks into `acked` (and reports them); the process exits when the
/// server goes away.
async fn raw_connect(url: &str, spec: &Spec, acked: Arc<AtomicU64>) -> RawWriter {
    let parsed = echo::Url::parse(url).unwrap();
    let (reader, writer, hello): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, _, _) =
        match parsed.scheme() {
            "tcp" => {
                let addr = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap());
                let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).unwrap();
                let (r, w) = s.into_split();
                (Box::new(r), RawWriter::Stream(Box::new(w)), false)
            }
            "unix" => {
                let s = tokio::net::UnixStream::connect(parsed.path())
                    .await
                    .expect("connect");
                let (r, w) = s.into_split();
                (Box::new(r), RawWriter::Stream(Box::new(w)), false)
            }
            #[cfg(feature = "quic")]
            "quic" => {
                let (endpoint, conn) = echo::quic::raw_connection(url, Duration::from_secs(10))
                    .await
                    .expect("connect");
                // The endpoint lives as long as the process.
                std::mem::forget(endpoint);
                let (send, recv) = conn.open_bi().await.expect("a stream");
                (Box::new(recv), RawWriter::Stream(Box::new(send)), true)
            }
            #[cfg(feature = "grpc")]
            "grpc" | "grpcs" => return grpc_connect(&parsed, acked).await,
            other => panic!("no raw child for {other}://"),
        };
    let mut writer = writer;
    let mut reader = reader;
    use tokio::io::AsyncReadExt;
    if hello {
        assert!(writer.write(&echo::wire::CLIENT_HELLO).await, "the hello");
    }
    let want = echo::wire::handshake_bytes(&spec.wire());
    let mut got = vec![0u8; want.len()];
    reader.read_exact(&mut got).await.expect("the handshake");
    assert_eq!(got, want);
    tokio::spawn(async move {
        let mut buf = [0u8; 256];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 1), "non-ack bytes");
                    let now = acked.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    report("acked", now);
                }
            }
        }
    });
    writer
}

/// A Push call driven by hand on HTTP/2, so that a message can be cut anywhere;
/// for `grpcs://` on a rustls connection trusting the URL's `ca` for its
/// `domain`.
#[cfg(feature = "grpc")]
async fn grpc_connect(url: &echo::Url, acked: Arc<AtomicU64>) -> RawWriter {
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.set_nodelay(true).unwrap();
    if url.scheme() == "grpc" {
        return grpc_push(tcp, &format!("http://{addr}"), acked).await;
    }
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("{url} has no {name}"))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(param("ca")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let domain = ServerName::try_from(param("domain")).unwrap();
    let io = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(domain, tcp)
        .await
        .expect("the TLS handshake");
    grpc_push(io, &format!("https://{addr}"), acked).await
}

/// Opens the Push call on `io` and starts a task that counts the acks.
#[cfg(feature = "grpc")]
async fn grpc_push<T>(io: T, origin: &str, acked: Arc<AtomicU64>) -> RawWriter
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use prost::Message;
    let (client, conn) = h2::client::handshake(io).await.expect("HTTP/2");
    tokio::spawn(async move {
        let _ = conn.await;
        std::process::exit(0);
    });
    let mut client = client.ready().await.expect("HTTP/2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("{origin}/echo.v1.Echo/Push"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, send) = client.send_request(request, false).expect("a Push call");
    tokio::spawn(async move {
        let response = response.await.expect("the Push response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut buf = bytes::BytesMut::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            while buf.len() >= 5 {
                let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                let msg = buf.split_to(5 + len);
                let reply = echo::grpc::proto::PushReply::decode(&msg[5..]).expect("a PushReply");
                acked.store(reply.acked, Ordering::Relaxed);
                report("acked", reply.acked);
            }
        }
        std::process::exit(0);
    });
    RawWriter::Grpc(send)
}

// ---------------------------------------------------------------------------
// Killed client processes: the parent side.

/// What a child reported on stdout.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    sent: u64,
    acked: u64,
}

/// Reads a child's stdout on a thread, forwarding its progress.
fn watch(child: &mut Child, k: usize, tx: std::sync::mpsc::Sender<(usize, Progress)>) {
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut p = Progress::default();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("sent ") {
                p.sent = n.parse().unwrap();
            } else if let Some(n) = line.strip_prefix("acked ") {
                p.acked = n.parse().unwrap();
            } else {
                continue; // the test harness's own lines
            }
            if tx.send((k, p)).is_err() {
                break;
            }
        }
    });
}

fn killed_clients(test_name: &str, bind: &str) {
    killed_clients_with(test_name, bind, "", 1);
}

/// Killed clients with `client_query` added to the URL every client connects to,
/// each of the transport's own clients holding `streams` ingress connections.
fn killed_clients_with(test_name: &str, bind: &str, client_query: &str, streams: u64) {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        child_main(&arg);
    }
    runtime().block_on(within(
        60,
        "the fault test",
        run_killed(test_name, bind, client_query, streams),
    ));
}

/// `url` with `query` added to its query string.
fn with_query(url: &str, query: &str) -> String {
    match (query.is_empty(), url.contains('?')) {
        (true, _) => url.to_string(),
        (false, true) => format!("{url}&{query}"),
        (false, false) => format!("{url}?{query}"),
    }
}

/// The server the churn and killed-client tests serve: batches of 16, every
/// compiled-in transport.
fn server_for(spec: &Spec) -> Server {
    Server::builder(spec.clone())
        .batch_size(16)
        .registry(echo::registry())
        .build()
        .unwrap()
}

async fn run_killed(test_name: &str, bind: &str, client_query: &str, streams: u64) {
    let spec = kit_spec(SIZE);
    let server = server_for(&spec);
    let url = with_query(&server.listen(bind).await.unwrap(), client_query);
    let consumer = spawn_consumer(&server);
    // In-process clients 0 and 1 send until every child is dead (at least 200
    // each) and stop cleanly; 2 and 3 keep sending through the shutdown.
    let stop = Arc::new(AtomicBool::new(false));
    let steady = spawn_until_stopped(&url, &spec, 0..2, 200, &stop);
    let busy = spawn_until_closed(&url, &spec, 2..4);
    // Client processes 100.., each killed once it has this many samples
    // acknowledged; two at a time, so some die while others are starting. Even
    // ones write raw bytes, odd ones use the transport's client.
    let kill_after = [3u64, 40, 97, 150, 260, 11];
    let ids: Vec<u32> = (0..kill_after.len() as u32).map(|k| 100 + k).collect();
    let mode = |k: usize| if k % 2 == 0 { "raw" } else { "client" };
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let mut last = vec![Progress::default(); ids.len()];
    for pair in (0..ids.len()).collect::<Vec<_>>().chunks(2) {
        let children: Vec<(usize, Child)> = pair
            .iter()
            .map(|&k| {
                let arg = format!("{} {} {url}", mode(k), ids[k]);
                let mut c = reexec(test_name, (CHILD_ENV, &arg))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap();
                watch(&mut c, k, tx.clone());
                (k, c)
            })
            .collect();
        let (rx, mut progress) = (rx.clone(), last.clone());
        last = tokio::task::spawn_blocking(move || {
            let rx = rx.lock().unwrap();
            let mut children = children;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !children.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let (k, p) = rx
                    .recv_timeout(left)
                    .expect("client processes stopped reporting progress");
                progress[k] = p;
                if let Some(i) = children
                    .iter()
                    .position(|(c, _)| *c == k && p.acked >= kill_after[k])
                {
                    let (_, mut child) = children.swap_remove(i);
                    child.kill().unwrap(); // SIGKILL, wherever it is
                    child.wait().unwrap();
                }
            }
            progress
        })
        .await
        .unwrap();
    }
    drop(tx);
    // Progress lines written before the kill may still be in the pipes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok((k, p)) = rx.lock().unwrap().try_recv() {
        last[k].sent = last[k].sent.max(p.sent);
        last[k].acked = last[k].acked.max(p.acked);
    }
    // The dead clients' connections are released: only the four in-process
    // clients' remain.
    let started = Instant::now();
    while server.metrics().active_connections != 4 * streams {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the dead clients' connections were not released: {:?}",
            server.metrics().transports
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "dead clients' connections released {:?} after the last kill",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut sent_by = Vec::new();
    for g in steady {
        sent_by.push(within(20, "a steady client", g).await.unwrap());
    }
    // Shutdown under load: clients 2 and 3 are still sending.
    within(30, "shutdown", server.shutdown()).await.unwrap();
    let mut busy_by = Vec::new();
    for (i, b) in busy.into_iter().enumerate() {
        let (err, sent, acked) = within(20, "a client seeing the shutdown", b).await.unwrap();
        assert!(
            err.is_closed(),
            "client {}: got {err}, expected ConnectionClosed",
            i + 2
        );
        busy_by.push((sent, acked));
    }
    let got: Got = within(10, "the consumer", consumer).await.unwrap();

    // Clients on one stream deliver a gap-free prefix in order; on several, the
    // same guarantees without an order between streams, and with gaps where a
    // stream lost what it had not had acknowledged.
    let one_stream = streams == 1;
    for (id, &n) in sent_by.iter().enumerate() {
        eprintln!("in-process client {id}: {n} sent and acknowledged");
        if one_stream {
            assert_exactly(&got, id as u32, n);
        } else {
            assert_exactly_unordered(&got, id as u32, n);
        }
    }
    let delivered = |id: u32, acked: u64, begun: u64, ordered: bool| {
        if ordered {
            assert_prefix(&got, id, acked, begun)
        } else {
            assert_distinct_within(&got, id, acked, begun)
        }
    };
    for (i, &(sent, acked)) in busy_by.iter().enumerate() {
        let id = i as u32 + 2;
        // The send that failed may have reached the server.
        let n = delivered(id, acked, sent + 1, one_stream);
        eprintln!(
            "in-process client {id} (through the shutdown): {acked} acked, {sent} sent, {n} delivered"
        );
    }
    for (k, &id) in ids.iter().enumerate() {
        let Progress { sent, acked } = last[k];
        assert!(
            acked >= kill_after[k],
            "client {id} was killed before its acks"
        );
        // Everything acknowledged arrived; at most the payload being written when
        // the kill came beyond what the child reported sent. (Raw children
        // write on one stream.)
        let n = delivered(id, acked, sent + 1, one_stream || mode(k) == "raw");
        eprintln!(
            "killed client {id} ({}): {acked} acked, {sent} reported sent, {n} delivered",
            mode(k)
        );
    }
    assert_eq!(
        got.len(),
        4 + ids.len(),
        "unexpected client ids: {:?}",
        got.keys()
    );
}

// ---------------------------------------------------------------------------
// A stalled consumer.

fn stalled_consumer(test_name: &str, bind: &str) {
    stalled_consumer_with(test_name, bind, "", 1);
}

/// A stalled consumer with `client_query` added to the clients' URL, each
/// client holding `streams` ingress connections.
fn stalled_consumer_with(test_name: &str, bind: &str, client_query: &str, streams: u64) {
    in_own_process(test_name, 90, || {
        runtime().block_on(within(
            60,
            "the stalled-consumer test",
            run_stalled(bind, client_query, streams),
        ))
    });
}

async fn run_stalled(bind: &str, client_query: &str, streams: u64) {
    // The configuration the memory bound is derived from.
    let (size, batch, buffers, conns) = (16 * 1024, 16, 4, 4u32);
    let limits = Limits::default();
    let client_opts = opts();
    let stall = Duration::from_secs(3);

    let baseline = rss_kib();
    let spec = kit_spec(size);
    let server = Server::builder(spec.clone())
        .batch_size(batch)
        .num_buffers(buffers)
        .limits(limits.clone())
        .registry(echo::registry())
        .build()
        .unwrap();
    let url = with_query(&server.listen(bind).await.unwrap(), client_query);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_until_stopped(&url, &spec, 0..conns, 0, &stop);
    let mut got = Got::new();
    // Flowing: 20 batches.
    for _ in 0..20 {
        take_batch(&server.next_batch().await.unwrap(), &mut got);
    }
    // Stalled: nobody consumes; the clients keep trying.
    let at_stall = rss_kib();
    let inserted_before = server.metrics().samples_inserted_total;
    let mut peak = at_stall;
    let t = Instant::now();
    while t.elapsed() < stall {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_kib());
    }
    let m = server.metrics();
    let inserted_during = m.samples_inserted_total - inserted_before;
    // Resumed: the flow picks up, then the clients stop and everything drains.
    let consumed_before = got.values().map(Vec::len).sum::<usize>();
    for _ in 0..20 {
        take_batch(&server.next_batch().await.unwrap(), &mut got);
    }
    // The clients wait for their last acks, which need room in the ring: keep
    // consuming meanwhile.
    stop.store(true, Ordering::Relaxed);
    let drain = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(batch) = server.next_batch().await {
                take_batch(&batch, &mut got);
            }
            got
        }
    });
    let mut sent = Vec::new();
    for c in clients {
        sent.push(within(20, "a client", c).await.unwrap());
    }
    within(20, "shutdown", server.shutdown()).await.unwrap();
    let got = within(10, "the consumer", drain).await.unwrap();

    // The bound. The ring is allocated up front. Each ingress connection (a
    // client's stream) may hold `queue_size` receive buffers of `chunk_bytes` (or
    // one payload, if larger) queued, and each client keeps up to `max_inflight`
    // payloads unacknowledged over all its streams, which may sit in up to three
    // places at once (the client's buffer, the transport's buffers on either
    // side). Slack covers runtimes, TLS, the transports' fixed buffers and the
    // allocator.
    let kib = |b: usize| (b / 1024) as u64;
    let ring = kib(batch * buffers * size);
    let per_conn = streams * kib(limits.queue_size * limits.chunk_bytes.max(size))
        + 3 * kib(client_opts.max_inflight * size);
    let slack = 24 * 1024;
    let stall_bound = u64::from(conns) * per_conn + slack;
    let total_bound = ring + stall_bound;
    eprintln!(
        "{url}: RSS {baseline} KiB before the server, {at_stall} KiB at the stall, peak {peak} KiB \
         over {stall:?} (growth {} KiB during the stall, bound {stall_bound} KiB; {} KiB in all, \
         bound {total_bound} KiB); {inserted_during} samples inserted while stalled; \
         {consumed_before} consumed before, {} in all",
        peak.saturating_sub(at_stall),
        peak.saturating_sub(baseline),
        got.values().map(Vec::len).sum::<usize>()
    );
    // An unbounded server would buffer everything the clients can send in 3 s
    // instead (hundreds of MiB).
    assert!(
        peak.saturating_sub(at_stall) < stall_bound,
        "RSS grew from {at_stall} KiB to {peak} KiB while the consumer was stalled \
         (bound {stall_bound} KiB)"
    );
    assert!(
        peak.saturating_sub(baseline) < total_bound,
        "RSS grew from {baseline} KiB to {peak} KiB in all (bound {total_bound} KiB)"
    );
    let capacity = (batch * buffers) as u64;
    assert!(
        inserted_during <= capacity,
        "{inserted_during} samples went into a ring of {capacity} while nobody consumed"
    );
    for (id, &n) in sent.iter().enumerate() {
        if streams == 1 {
            assert_exactly(&got, id as u32, n);
        } else {
            assert_exactly_unordered(&got, id as u32, n);
        }
    }
}

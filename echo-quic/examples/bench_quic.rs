//! QUIC vs TCP throughput in one run: our `quic://` transport (1 and 4 streams per
//! client) beside our `tcp://` transport, same server, same load generator.
//!
//! ```text
//! cargo run --release -p echo-quic --example bench_quic            # full run (about 3 minutes)
//! cargo run --release -p echo-quic --example bench_quic -- --quick # a smoke run
//! cargo run --release -p echo-quic --example bench_quic -- \
//!     --sizes 1048576 --clients 1 --targets quic1 --quic-query 'cc=bbr'   # try a setting
//! ```
//!
//! Each transport's server runs in its own process (this binary with `--role
//! server`), consuming batches as fast as it can.
//!
//! The `proto` target is not a transport (see the `proto` module): QUIC
//! with quinn's protocol crate (`quinn-proto`) but without quinn's I/O layer,
//! one blocking thread per connection end, moving bytes on one stream; for
//! payloads of 64 KiB or more.
//!
//! The `floor` target is not a transport: a bare encrypted UDP pipe, the least
//! any QUIC stack on UDP sockets must do per byte (copy each piece of the
//! payload into a datagram, seal it with AES-128-GCM as `quic://` does, send it; receive, open,
//! copy into a ring) with none of QUIC's protocol work (no acknowledgement
//! frames, loss recovery, congestion control, stream framing or async
//! runtime; the receiver returns one small credit datagram per 8 packets so the
//! sender never overruns its socket buffer). One blocking sender thread per
//! client, one receiver thread per client in the server process. `floor` sends
//! datagrams of 65,000 bytes (about the most loopback carries), `floor:N` of N
//! bytes (header and tag included; our QUIC's loopback packets are about as
//! large as `floor`'s). Measured only for payloads of at least one datagram: it is a
//! floor for the cost per byte, and has no cost per sample. Nor is it a floor
//! for small datagrams: it makes one system call per datagram, where quinn
//! hands the kernel up to 10 at once (GSO) below 6,550 bytes. The load generator is this
//! process: N clients on a 2-thread Tokio runtime (`--client-threads`), each sending one pre-built
//! payload, handed over as `Bytes` (`Client::send_bytes`; `--borrowed` sends
//! it as a slice), with `max_inflight` unacknowledged (for QUIC: in total over
//! its streams), for a fixed time, then waiting for every ack. The tcp and
//! quic server processes set the allocator as echo-server does
//! (`echo_core::heap`; the floor's receiver allocates nothing per datagram
//! and keeps glibc's defaults). A rate is
//! acknowledged samples / elapsed time. QUIC is always encrypted (TLS 1.3,
//! AES-128-GCM as negotiated, `echo_quic::crypto_provider`); TCP wire v1 is not.
//!
//! Sample layout for a payload of P bytes: `{"obs": float32[P/4 - 1], "reward":
//! float32[]}`.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use echo_core::testkit::bench::{self, usage, Usage};
use echo_core::{ClientOptions, Registry, Server};

#[derive(Parser, Debug, Clone)]
#[command(about = "echo-quic vs echo-tcp on loopback")]
struct Args {
    /// Short runs (0.3 s per cell) to check that everything works.
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
    /// Measurements per cell; each column reports their median (the machine
    /// is shared).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Unacknowledged payloads per client.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// What to measure: tcp, quic1 (one stream per client), quic4 (four),
    /// floor[:PACKET] (the encrypted UDP pipe, see above), proto (quinn-proto
    /// driven by hand, see above); any quicN may carry `:QUERY` for both ends,
    /// e.g. `quic1:cc=bbr`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tcp,floor,proto,quic1,quic4"
    )]
    targets: Vec<String>,
    /// Extra query parameters for the QUIC server URL (e.g. `stream_window=4194304`).
    #[arg(long, default_value = "")]
    quic_query: String,
    /// Extra query parameters for QUIC client URLs (e.g. `cc=bbr`).
    #[arg(long, default_value = "")]
    quic_client_query: String,
    /// Also print page faults per sample (minor faults of the server process and
    /// of this one): fresh pages the kernel had to map and zero.
    #[arg(long)]
    faults: bool,
    /// Send each payload as a borrowed slice (`Client::send`) instead of handing
    /// it over as `Bytes` (`Client::send_bytes`, the default): QUIC then copies
    /// every payload before quinn takes it.
    #[arg(long)]
    borrowed: bool,
    /// Worker threads of the Tokio runtime every client of a measurement
    /// shares (the load generator). With two, on a two-core machine, the
    /// clients' threads and the server's take turns on both cores.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    client_threads: u16,
    /// Internal: run as a server process for this URL.
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the server's payload size.
    #[arg(long, hide = true, default_value_t = 0)]
    payload: usize,
}

fn registry() -> Registry {
    let mut r = Registry::new();
    echo_tcp::register(&mut r).expect("tcp");
    echo_quic::register(&mut r).expect("quic");
    r
}

/// A server process: prints `URL u`, consumes batches until stdin closes,
/// prints `SAMPLES n`.
fn run_server(url: &str, payload: usize) {
    let builder = Server::builder(bench::spec(payload))
        .batch_size(bench::batch_size(payload))
        .registry(registry());
    bench::server_process(
        builder,
        url,
        |u| format!("URL {u}"),
        |n| n.whole + n.partial,
    );
}

/// A server process (this binary with `--role URL`) and the URL it bound.
struct Proc {
    process: bench::Process,
    url: String,
}

impl Proc {
    fn start(url: &str, payload: usize) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.args(["--role", url, "--payload", &payload.to_string()]);
        let mut process = bench::Process::start("server", cmd);
        let url = process.expect("URL ", Duration::from_secs(60));
        Proc { process, url }
    }

    /// Closes the server's stdin and returns how many samples it consumed.
    fn stop(self) -> u64 {
        self.process.stop().unwrap_or(0)
    }

    fn usage(&self) -> Usage {
        self.process.usage()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    samples: u64,
    secs: f64,
    server: Usage,
    client: Usage,
}

async fn run_clients(url: &str, payload: usize, clients: usize, args: &Args, secs: f64) -> Cell {
    let spec = bench::spec(payload);
    let reg = registry();
    let opts = ClientOptions {
        max_inflight: args.max_inflight,
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(reg.connect(url, &spec, &opts).await.expect("connect"));
    }
    let data = Bytes::from(vec![7u8; payload]);
    let borrowed = args.borrowed;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for mut c in conns {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                for _ in 0..64 {
                    if borrowed {
                        c.send(&data).await.expect("send");
                    } else {
                        c.send_bytes(data.clone()).await.expect("send");
                    }
                }
            }
            c.wait().await.expect("wait");
            let acked = c.stats().acked;
            (c, acked)
        }));
    }
    let mut samples = 0;
    let mut done = Vec::new();
    for t in tasks {
        let (c, n) = t.await.expect("client task");
        samples += n;
        done.push(c);
    }
    let secs = start.elapsed().as_secs_f64();
    for mut c in done {
        c.close().await.ok();
    }
    Cell {
        samples,
        secs,
        ..Default::default()
    }
}

fn fmt_rate(samples: f64) -> String {
    if samples >= 1e6 {
        format!("{:.2} M/s", samples / 1e6)
    } else if samples >= 1e3 {
        format!("{:.1} k/s", samples / 1e3)
    } else {
        format!("{samples:.0} /s")
    }
}

/// `(name, server URL, client query)` of a target: `tcp`, or `quicN` (N streams
/// per client) optionally followed by `:QUERY` applied to server and clients.
fn target_urls(target: &str, args: &Args) -> (String, String, String) {
    if target == "tcp" {
        return (target.into(), "tcp://127.0.0.1:0".into(), String::new());
    }
    if target == "proto" {
        return (target.into(), "proto://127.0.0.1:0".into(), String::new());
    }
    if let Some(rest) = target.strip_prefix("floor") {
        let packet = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok(),
            None if rest.is_empty() => Some(floor::DEFAULT_PACKET),
            None => None,
        };
        let packet = packet
            .filter(|p| (floor::HEADER + floor::TAG + 1..=65_507).contains(p))
            .unwrap_or_else(|| {
                panic!("{target:?}: expected floor or floor:PACKET, PACKET in 25..=65507")
            });
        let url = format!("floor://127.0.0.1:0?packet={packet}");
        return (target.into(), url, String::new());
    }
    let (name, extra) = target.split_once(':').unwrap_or((target, ""));
    let streams: usize = name
        .strip_prefix("quic")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unknown target {target:?}; expected tcp or quicN[:QUERY]"));
    let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}&{b}"),
    };
    let server_q = join(&args.quic_query, extra);
    let client_q = join(
        &join(&format!("streams={streams}"), &args.quic_client_query),
        extra,
    );
    (
        target.into(),
        format!("quic://127.0.0.1:0?{server_q}"),
        client_q,
    )
}

/// One measurement: a fresh server process, `clients` clients for `secs`.
#[allow(clippy::too_many_arguments)]
fn measure(
    rt: &tokio::runtime::Runtime,
    server_url: &str,
    client_extra: &str,
    payload: usize,
    clients: usize,
    args: &Args,
    secs: f64,
    target: &str,
) -> Cell {
    if target.starts_with("floor") {
        return floor::measure(server_url, payload, clients, secs);
    }
    if target == "proto" {
        return proto::measure(server_url, payload, clients, secs);
    }
    let server = Proc::start(server_url, payload);
    let sep = if server.url.contains('?') { '&' } else { '?' };
    let url = if client_extra.is_empty() {
        server.url.clone()
    } else {
        format!("{}{sep}{client_extra}", server.url)
    };
    let (s0, c0) = (server.usage(), usage("self"));
    let mut cell = rt.block_on(run_clients(&url, payload, clients, args, secs));
    cell.server = server.usage() - s0;
    cell.client = usage("self") - c0;
    let consumed = server.stop();
    assert!(
        consumed
            >= cell
                .samples
                .saturating_sub(bench::batch_size(payload) as u64),
        "{target}: server consumed {consumed} of {} acknowledged",
        cell.samples
    );
    cell
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if let Some(url) = &args.role {
        if url.starts_with("floor://") {
            floor::receive(url, args.payload);
        } else if url.starts_with("proto://") {
            proto::receive(args.payload);
        } else {
            run_server(url, args.payload);
        }
        return;
    }
    let secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 2.0 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.into())
        .enable_all()
        .build()
        .expect("runtime");
    let (fault_head, fault_rule) = if args.faults {
        (" server faults/sample | client faults/sample |", "---|---|")
    } else {
        ("", "")
    };
    println!(
        "| sample | clients | transport | samples/s | MB/s | vs tcp | server CPU µs/sample | client CPU µs/sample |{fault_head}"
    );
    println!("|---|---|---|---|---|---|---|---|{fault_rule}");
    for &payload in &args.sizes {
        assert!(
            payload >= 8 && payload % 4 == 0,
            "sizes must be multiples of 4, >= 8"
        );
        for &clients in &args.clients {
            // The floor only for payloads of at least one datagram.
            let targets: Vec<(String, String, String)> = args
                .targets
                .iter()
                .map(|t| target_urls(t, &args))
                .filter(|(t, url, _)| match t.as_str() {
                    t if t.starts_with("floor") => payload >= floor::packet_of(url),
                    "proto" => payload >= 64 * 1024,
                    _ => true,
                })
                .collect();
            // Interleaved: every target once per round, so drifting load from
            // other work on the machine hits them alike; each column is the
            // median over the rounds.
            let mut runs: Vec<Vec<Cell>> = vec![Vec::new(); targets.len()];
            for _ in 0..args.repeat.max(1) {
                for (k, (target, server_url, client_extra)) in targets.iter().enumerate() {
                    runs[k].push(measure(
                        &rt,
                        server_url,
                        client_extra,
                        payload,
                        clients,
                        &args,
                        secs,
                        target,
                    ));
                }
            }
            let rate = |c: &Cell| c.samples as f64 / c.secs;
            let per_sample = |c: &Cell, v: f64| v / c.samples.max(1) as f64;
            let tcp_rate = targets
                .iter()
                .position(|t| t.0 == "tcp")
                .map(|k| bench::median(runs[k].iter().map(rate)));
            for ((target, _, _), cells) in targets.iter().zip(&runs) {
                let rate = bench::median(cells.iter().map(rate));
                let vs = tcp_rate
                    .filter(|_| target != "tcp")
                    .map(|t| format!("{:.0} %", rate / t * 100.0))
                    .unwrap_or_default();
                let col = |f: &dyn Fn(&Cell) -> f64| bench::median(cells.iter().map(f));
                let faults = if args.faults {
                    format!(
                        " {:.1} | {:.1} |",
                        col(&|c| per_sample(c, c.server.faults)),
                        col(&|c| per_sample(c, c.client.faults)),
                    )
                } else {
                    String::new()
                };
                println!(
                    "| {} | {clients} | {target} | {} | {:.1} | {vs} | {:.2} | {:.2} |{faults}",
                    bench::size_name(payload),
                    fmt_rate(rate),
                    rate * payload as f64 / 1e6,
                    col(&|c| per_sample(c, c.server.cpu) * 1e6),
                    col(&|c| per_sample(c, c.client.cpu) * 1e6),
                );
                std::io::stdout().flush().ok();
            }
        }
    }
}

/// The `floor` target: an encrypted UDP pipe without QUIC (see the top of this
/// file). Datagram: an 8-byte packet number (the nonce, and the associated
/// data), the sealed piece, the 16-byte tag.
mod floor {
    use std::io::Read;
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use rustls::quic::{Keys, PacketKey, Version};
    use rustls::Side;

    use super::{usage, Cell, Proc};

    pub(crate) const HEADER: usize = 8;
    pub(crate) const TAG: usize = 16;
    /// About the largest datagram loopback carries.
    pub(crate) const DEFAULT_PACKET: usize = 65_000;
    /// Bytes a sender may have out beyond the last credit, at most (less if
    /// the receive buffer is smaller, see [`window`]).
    const WINDOW: usize = 2 << 20;
    /// The receiver credits every this many packets, at most.
    const CREDIT_EVERY: u64 = 8;
    const SOCKET_BUFFER: usize = 4 << 20;

    /// Packets a sender may have out, and how often the receiver credits,
    /// for datagrams of `packet` bytes: a quarter of what a socket's receive
    /// buffer holds here (the kernel caps it at `net.core.rmem_max`), so that
    /// nothing is dropped.
    pub(crate) fn window(packet: usize) -> (u64, u64) {
        let rcvbuf = socket().1;
        let packets = (WINDOW.min(rcvbuf / 4) / packet).max(2) as u64;
        (packets, (packets / 2).clamp(1, CREDIT_EVERY))
    }

    /// The packet key `quic://` seals (`Side::Client`) or opens
    /// (`Side::Server`) with: its provider's first suite (AES-128-GCM, with
    /// the same code for large packets), here QUIC's initial keys for a
    /// fixed connection ID.
    fn key(side: Side) -> Box<dyn PacketKey> {
        let provider = echo_quic::crypto_provider();
        let suite = provider.cipher_suites[0].tls13().expect("a TLS 1.3 suite");
        let quic = suite.quic.expect("a suite for QUIC");
        let keys = Keys::initial(Version::V1, suite, quic, &[0x5a; 8], side);
        match side {
            Side::Client => keys.local.packet,
            Side::Server => keys.remote.packet,
        }
    }

    /// A UDP socket with (asked for) 4 MiB buffers, and the receive buffer
    /// the kernel granted.
    pub(crate) fn socket() -> (UdpSocket, usize) {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let v = SOCKET_BUFFER as libc::c_int;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
                // SAFETY: both options take a c_int; the pointer and length describe `v`.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&v as *const libc::c_int).cast(),
                        len,
                    );
                }
            }
            let mut got: libc::c_int = 0;
            // SAFETY: as above, reading the value back into `got`.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&mut got as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r == 0 && got > 0 {
                return (s, got as usize);
            }
        }
        (s, SOCKET_BUFFER)
    }

    /// The server role: `floor://127.0.0.1:0?packet=P&n=N&credit=C` binds N
    /// sockets, one thread each, credits every C packets, prints `URL floor://ADDR,ADDR,...`, receives until stdin
    /// closes, then prints `SAMPLES n` (whole payloads' worth of bytes).
    pub(crate) fn receive(url: &str, payload: usize) {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<usize>().ok())
        };
        let packet = param("packet").expect("packet=");
        let n = param("n").unwrap_or(1).max(1);
        let credit_every = param("credit").unwrap_or(1).max(1) as u64;
        let sockets: Vec<UdpSocket> = (0..n).map(|_| socket().0).collect();
        let addrs: Vec<String> = sockets
            .iter()
            .map(|s| s.local_addr().expect("address").to_string())
            .collect();
        println!("URL floor://{}", addrs.join(","));
        let stop = AtomicBool::new(false);
        let bytes = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for s in &sockets {
                let (stop, bytes, n) = (&stop, &bytes, n);
                scope.spawn(move || {
                    s.set_read_timeout(Some(Duration::from_millis(50))).ok();
                    let key = key(Side::Server);
                    // The batch ring's stand-in: 64 MiB in all, written in
                    // turn, so the copies land in memory as cold as a store's.
                    let mut ring = vec![0u8; ((64 << 20) / n).max(payload)];
                    let mut at = 0;
                    let mut buf = vec![0u8; packet];
                    let mut got = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((len, from)) = s.recv_from(&mut buf) else {
                            continue;
                        };
                        if len < HEADER + TAG {
                            // The sender's last word: everything before it
                            // (one socket's datagrams stay in order) is in.
                            s.send_to(&got.to_be_bytes(), from).ok();
                            continue;
                        }
                        let (head, body) = buf[..len].split_at_mut(HEADER);
                        let pn = u64::from_be_bytes(head[..].try_into().expect("8 bytes"));
                        let plain = key
                            .decrypt_in_place(pn, head, body)
                            .expect("a floor datagram that does not open");
                        let k = plain.len();
                        if at + k > ring.len() {
                            at = 0;
                        }
                        ring[at..at + k].copy_from_slice(plain);
                        at += k;
                        bytes.fetch_add(k as u64, Ordering::Relaxed);
                        got += 1;
                        if got % credit_every == 0 {
                            s.send_to(&got.to_be_bytes(), from).ok();
                        }
                    }
                });
            }
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
        println!(
            "SAMPLES {}",
            bytes.load(Ordering::Relaxed) / payload.max(1) as u64
        );
    }

    /// One sender: whole payloads for `secs`, then a short datagram, which the
    /// receiver answers with a credit for everything it received. Returns
    /// payloads sent.
    fn send(to: SocketAddr, payload: usize, packet: usize, window: u64, secs: f64) -> u64 {
        let s = socket().0;
        s.connect(to).expect("connect UDP");
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        let key = key(Side::Client);
        let data = vec![7u8; payload];
        let piece = packet - HEADER - TAG;
        let mut buf = vec![0u8; packet];
        let (mut pn, mut credited) = (0u64, 0u64);
        // False when no credit came within a second (datagrams were lost).
        let credit = |credited: &mut u64| {
            let mut c = [0u8; 8];
            match s.recv(&mut c) {
                Ok(8) => *credited = (*credited).max(u64::from_be_bytes(c)),
                Ok(_) => {}
                Err(_) => return false,
            }
            true
        };
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0;
        while Instant::now() < deadline {
            for part in data.chunks(piece) {
                while pn - credited >= window {
                    if !credit(&mut credited) {
                        eprintln!("floor: no credit from the receiver within 1 s");
                        return sent;
                    }
                }
                buf[..HEADER].copy_from_slice(&pn.to_be_bytes());
                let (head, rest) = buf.split_at_mut(HEADER);
                rest[..part.len()].copy_from_slice(part);
                let tag = key
                    .encrypt_in_place(pn, head, &mut rest[..part.len()])
                    .expect("seal");
                rest[part.len()..part.len() + TAG].copy_from_slice(tag.as_ref());
                s.send(&buf[..HEADER + part.len() + TAG]).expect("send UDP");
                pn += 1;
            }
            sent += 1;
        }
        s.send(&[0]).expect("send UDP");
        while credited < pn && credit(&mut credited) {}
        sent
    }

    /// The datagram size in a `floor://` URL.
    pub(crate) fn packet_of(url: &str) -> usize {
        url.rsplit_once("packet=")
            .and_then(|(_, v)| v.split('&').next()?.parse().ok())
            .expect("packet=")
    }

    /// One measurement of the floor with `clients` sender threads.
    pub(crate) fn measure(server_url: &str, payload: usize, clients: usize, secs: f64) -> Cell {
        let packet = packet_of(server_url);
        let (window, credit_every) = window(packet);
        let server = Proc::start(
            &format!("{server_url}&n={clients}&credit={credit_every}"),
            payload,
        );
        let addrs: Vec<SocketAddr> = server
            .url
            .strip_prefix("floor://")
            .expect("floor URL")
            .split(',')
            .map(|a| a.parse().expect("floor address"))
            .collect();
        let (s0, c0) = (server.usage(), usage("self"));
        let start = Instant::now();
        let sent: u64 = std::thread::scope(|scope| {
            let threads: Vec<_> = addrs
                .iter()
                .map(|&a| scope.spawn(move || send(a, payload, packet, window, secs)))
                .collect();
            threads.into_iter().map(|t| t.join().expect("sender")).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        let (server_used, client_used) = (server.usage() - s0, usage("self") - c0);
        let received = server.stop();
        // A lost datagram stalls its sender for a second: no rate then.
        let samples = if received < sent {
            eprintln!(
                "floor: {sent} payloads sent, {received} received (datagrams lost); \
                 the round counts as 0"
            );
            0
        } else {
            sent
        };
        Cell {
            samples,
            secs,
            server: server_used,
            client: client_used,
        }
    }
}

/// The `proto` target: quinn-proto (the protocol state machine under quinn)
/// driven by hand, without quinn's endpoint and connection tasks: one
/// blocking thread per client owns its socket, endpoint and connection and
/// writes whole payloads to one stream (handed over as `Bytes`, not copied);
/// one server thread owns the server's socket, endpoint and connections,
/// receives each datagram straight into its own buffer (quinn copies it out of
/// a shared one), and copies the stream's bytes into a ring like `floor`.
/// TLS 1.3 with AES-128-GCM and our transport settings for loopback (2/4 MiB
/// windows, 65,527-byte MTU bound). No wire v1, acks or store: how fast a QUIC
/// stack built on quinn-proto could move bytes here, between `floor` and
/// `quic1`.
mod proto {
    use std::collections::HashMap;
    use std::io::{self, Read};
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::{Bytes, BytesMut};
    use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use quinn_proto::{
        ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
        Event, MtuDiscoveryConfig, ServerConfig, StreamEvent, TransportConfig, VarInt, WriteError,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::{floor, usage, Cell, Proc};

    const MTU: u16 = 65_527;
    const ALPN: &[u8] = b"echo-proto-bench";
    /// Datagrams taken off the socket before the connections get to send
    /// (their acknowledgements, among others).
    const RECV_BATCH: usize = 64;

    fn transport() -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(2 << 20))
            .receive_window(VarInt::from_u32(4 << 20))
            .send_window(16 << 20)
            .initial_rtt(Duration::from_millis(10))
            .enable_segmentation_offload(false);
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(MTU);
        t.mtu_discovery_config(Some(mtu));
        Arc::new(t)
    }

    fn endpoint(server: Option<Arc<ServerConfig>>) -> Endpoint {
        let mut e = EndpointConfig::default();
        e.max_udp_payload_size(MTU).expect("MTU bound");
        Endpoint::new(Arc::new(e), server, true, None)
    }

    /// A non-blocking socket with `floor`'s buffer sizes.
    fn socket() -> UdpSocket {
        let s = floor::socket().0;
        s.set_nonblocking(true).expect("non-blocking UDP");
        s
    }

    /// One datagram from `s` into `buf`'s spare room, without zeroing it first.
    fn recv(s: &UdpSocket, buf: &mut BytesMut) -> io::Result<SocketAddr> {
        buf.reserve(MTU as usize);
        let spare = buf.spare_capacity_mut();
        // SAFETY: sockaddr_in is plain data, valid zeroed.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `spare.len()` bytes into `spare`
        // and at most `len` bytes into `addr`.
        let n = unsafe {
            libc::recvfrom(
                s.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                0,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel initialized the first `n` bytes of the spare room.
        unsafe { buf.set_len(n as usize) };
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
    }

    /// Hands up to [`RECV_BATCH`] datagrams waiting on `s` to `ep`, and each
    /// event to `on` (with `out` holding the response a `Response` refers to).
    fn take_datagrams(
        s: &UdpSocket,
        ep: &mut Endpoint,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
        now: Instant,
        mut on: impl FnMut(&mut Endpoint, DatagramEvent, &mut Vec<u8>),
    ) {
        for _ in 0..RECV_BATCH {
            let Ok(from) = recv(s, buf) else {
                break;
            };
            let data = buf.split();
            out.clear();
            if let Some(ev) = ep.handle(now, from, None, None, data, out) {
                on(ep, ev, out);
            }
        }
    }

    /// Waits until `s` is readable or `until` (at most 50 ms).
    fn wait(s: &UdpSocket, until: Option<Instant>) {
        let ms = until.map_or(50, |t| {
            let left = t.saturating_duration_since(Instant::now());
            left.as_micros().div_ceil(1000).min(50) as libc::c_int
        });
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// Everything `conn` has to say: endpoint events, then datagrams.
    fn flush(
        h: ConnectionHandle,
        conn: &mut Connection,
        ep: &mut Endpoint,
        s: &UdpSocket,
        out: &mut Vec<u8>,
        now: Instant,
    ) {
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(back) = ep.handle_event(h, ev) {
                conn.handle_event(back);
            }
        }
        loop {
            out.clear();
            let Some(t) = conn.poll_transmit(now, 1, out) else {
                break;
            };
            // A full socket buffer drops the datagram, like a lossy path.
            let _ = s.send_to(&out[..t.size], t.destination);
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect()
    }

    /// The server role: `proto://127.0.0.1:0` binds, prints
    /// `URL proto://ADDR?cert=HEX` (its self-signed certificate), reads every
    /// stream of every connection into a ring until stdin closes, then prints
    /// `SAMPLES n` (whole payloads' worth of bytes).
    pub(crate) fn receive(payload: usize) {
        echo_core::heap::server_heap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(echo_quic::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("certificate");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut sc =
            ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).expect("QUIC TLS")));
        sc.transport_config(transport());
        let mut ep = endpoint(Some(Arc::new(sc)));
        let s = socket();
        println!(
            "URL proto://{}?cert={}",
            s.local_addr().expect("address"),
            hex(ck.cert.der())
        );
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::spawn({
            let stop = stop.clone();
            move || {
                let _ = io::stdin().read_to_end(&mut Vec::new());
                stop.store(true, Ordering::Relaxed);
            }
        });
        let bytes = AtomicU64::new(0);
        let mut conns: HashMap<ConnectionHandle, (Connection, Vec<quinn_proto::StreamId>)> =
            HashMap::new();
        let mut ring = vec![0u8; 64 << 20];
        let mut at = 0;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            take_datagrams(
                &s,
                &mut ep,
                &mut buf,
                &mut out,
                now,
                |ep, ev, out| match ev {
                    DatagramEvent::NewConnection(incoming) => {
                        out.clear();
                        match ep.accept(incoming, now, out, None) {
                            Ok((h, c)) => {
                                conns.insert(h, (c, Vec::new()));
                            }
                            Err(e) => {
                                if let Some(t) = e.response {
                                    let _ = s.send_to(&out[..t.size], t.destination);
                                }
                            }
                        }
                    }
                    DatagramEvent::ConnectionEvent(h, ev) => {
                        if let Some((c, _)) = conns.get_mut(&h) {
                            c.handle_event(ev);
                        }
                    }
                    DatagramEvent::Response(t) => {
                        let _ = s.send_to(&out[..t.size], t.destination);
                    }
                },
            );
            let now = Instant::now();
            for (&h, (conn, streams)) in conns.iter_mut() {
                if conn.poll_timeout().is_some_and(|t| t <= now) {
                    conn.handle_timeout(now);
                }
                while let Some(ev) = conn.poll() {
                    if let Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) = ev {
                        while let Some(id) = conn.streams().accept(Dir::Bi) {
                            streams.push(id);
                        }
                    }
                }
                for &id in streams.iter() {
                    let mut rs = conn.recv_stream(id);
                    let Ok(mut chunks) = rs.read(true) else {
                        continue;
                    };
                    while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                        let k = chunk.bytes.len();
                        if at + k > ring.len() {
                            at = 0;
                        }
                        ring[at..at + k].copy_from_slice(&chunk.bytes);
                        at += k;
                        bytes.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    let _ = chunks.finalize();
                }
                flush(h, conn, &mut ep, &s, &mut out, now);
            }
            conns.retain(|_, (c, _)| !c.is_drained());
            let next = conns
                .values_mut()
                .filter_map(|(c, _)| c.poll_timeout())
                .min();
            wait(&s, next);
        }
        println!(
            "SAMPLES {}",
            bytes.load(Ordering::Relaxed) / payload.max(1) as u64
        );
    }

    /// One client: connects, writes whole payloads to one stream for `secs`,
    /// finishes it and waits until the server has acknowledged all of it.
    /// Returns the payloads written.
    fn send(to: SocketAddr, cert: &[u8], payload: usize, secs: f64) -> u64 {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(cert.to_vec()))
            .expect("the server's certificate");
        let mut tls = rustls::ClientConfig::builder_with_provider(echo_quic::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cc =
            ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("QUIC TLS")));
        cc.transport_config(transport());
        let mut ep = endpoint(None);
        let s = socket();
        let (h, mut conn) = ep
            .connect(Instant::now(), cc, to, "localhost")
            .expect("connect");
        let data = Bytes::from(vec![7u8; payload]);
        let (mut stream, mut deadline) = (None, None);
        let mut rest: Option<Bytes> = None;
        let (mut written, mut finished) = (0u64, false);
        let (mut buf, mut out) = (BytesMut::new(), Vec::new());
        loop {
            let now = Instant::now();
            take_datagrams(&s, &mut ep, &mut buf, &mut out, now, |_, ev, _| {
                if let DatagramEvent::ConnectionEvent(_, ev) = ev {
                    conn.handle_event(ev);
                }
            });
            let now = Instant::now();
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
            while let Some(ev) = conn.poll() {
                match ev {
                    Event::Connected => {
                        stream = conn.streams().open(Dir::Bi);
                        deadline = Some(now + Duration::from_secs_f64(secs));
                    }
                    Event::Stream(StreamEvent::Finished { .. }) => return written,
                    Event::ConnectionLost { reason } => panic!("proto: connection lost: {reason}"),
                    _ => {}
                }
            }
            if let (Some(id), Some(end)) = (stream, deadline) {
                // New payloads until the deadline; the one under way is finished.
                while rest.is_some() || (now < end && !finished) {
                    let mut chunk = [rest.take().unwrap_or_else(|| data.clone())];
                    match conn.send_stream(id).write_chunks(&mut chunk) {
                        Ok(w) if w.chunks == 1 => written += 1,
                        Ok(_) | Err(WriteError::Blocked) => {
                            rest = Some(chunk[0].clone());
                            break;
                        }
                        Err(e) => panic!("proto: write: {e}"),
                    }
                }
                if rest.is_none() && now >= end && !finished {
                    conn.send_stream(id).finish().expect("finish");
                    finished = true;
                }
            }
            flush(h, &mut conn, &mut ep, &s, &mut out, now);
            wait(&s, conn.poll_timeout());
        }
    }

    /// One measurement with `clients` client threads.
    pub(crate) fn measure(server_url: &str, payload: usize, clients: usize, secs: f64) -> Cell {
        let server = Proc::start(server_url, payload);
        let (addr, cert) = server
            .url
            .strip_prefix("proto://")
            .and_then(|r| r.split_once("?cert="))
            .expect("proto URL");
        let addr: SocketAddr = addr.parse().expect("proto address");
        let cert = unhex(cert);
        let (s0, c0) = (server.usage(), usage("self"));
        let start = Instant::now();
        let sent: u64 = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..clients)
                .map(|_| scope.spawn(|| send(addr, &cert, payload, secs)))
                .collect();
            threads.into_iter().map(|t| t.join().expect("sender")).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        let (server_used, client_used) = (server.usage() - s0, usage("self") - c0);
        let received = server.stop();
        assert!(
            received >= sent,
            "proto: {sent} payloads acknowledged, {received} received"
        );
        Cell {
            samples: sent,
            secs,
            server: server_used,
            client: client_used,
        }
    }
}

//! Streams: spreading over several streams, stalls that stay on their own stream,
//! and the server's bounds on streams and connections.

use std::sync::Arc;
use std::time::Duration;

use echo_core::stream::StreamClient;
use echo_core::{Client, ClientOptions, Error, Registry, Server, Spec};
use echo_quic::{quinn, raw_connection, QuicClientFactory, QuicTransportFactory};
use tokio::time::timeout;

const SIZE: usize = 64;

fn spec() -> Spec {
    spec_of(SIZE)
}

fn spec_of(size: usize) -> Spec {
    Spec::from_json(&format!(
        r#"{{"x": {{"shape": [{size}], "dtype": "uint8"}}}}"#
    ))
    .unwrap()
}

fn registry() -> Registry {
    let mut r = Registry::new();
    echo_quic::register(&mut r).unwrap();
    r
}

fn options(max_inflight: usize) -> ClientOptions {
    ClientOptions {
        max_inflight,
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

async fn server(query: &str, batch: usize) -> (Server, String) {
    server_of(SIZE, query, batch).await
}

async fn server_of(size: usize, query: &str, batch: usize) -> (Server, String) {
    let server = Server::builder(spec_of(size))
        .batch_size(batch)
        .registry(registry())
        .build()
        .unwrap();
    let url = server
        .listen(&format!("quic://127.0.0.1:0?{query}"))
        .await
        .unwrap();
    (server, url)
}

/// Connects to `url` as soon as the server has a free slot (refusals are
/// retried for 5 s; `what` says what should have freed one), then sends one
/// sample of `byte`s and closes.
async fn served_once_free(url: &str, byte: u8, what: &str) {
    let mut client = None;
    for _ in 0..100 {
        match registry().connect(url, &spec(), &options(8)).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(e) if e.is_closed() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let mut client = client.unwrap_or_else(|| panic!("no free slot within 5 s: {what}"));
    client.send(&[byte; SIZE]).await.unwrap();
    client.wait().await.unwrap();
    client.close().await.unwrap();
}

/// The first byte of each of the next `n` samples the server hands out.
async fn collect(server: &Server, n: usize) -> Vec<u8> {
    collect_payloads(server, n)
        .await
        .iter()
        .map(|p| p[0])
        .collect()
}

/// A stand-in server whose first stream completes the handshake and then never
/// acknowledges anything, while its other streams acknowledge every payload.
async fn stalling_server(
    size: usize,

    dir: &std::path::Path,
) -> (quinn::Endpoint, String, tokio::task::JoinHandle<()>) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca = dir.join("stall.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![echo_quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let url = format!(
        "quic://{}?ca={}",
        endpoint.local_addr().unwrap(),
        ca.to_str().unwrap()
    );
    let ep = endpoint.clone();
    let task = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let hs = echo_core::wire::handshake_bytes(&spec_of(size).wire());
        let mut first = true;
        let mut tasks = Vec::new();
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut hello = [0u8; 5];
            recv.read_exact(&mut hello).await.unwrap();
            assert_eq!(hello, echo_core::wire::CLIENT_HELLO);
            send.write_all(&hs).await.unwrap();
            let stall = std::mem::replace(&mut first, false);
            tasks.push(tokio::spawn(async move {
                if stall {
                    // Hold the stream open, never read, never ack.
                    std::future::pending::<()>().await;
                }
                let mut buf = vec![0u8; size];
                while recv.read_exact(&mut buf).await.is_ok() {
                    if send.write_all(&[1]).await.is_err() {
                        break;
                    }
                }
                drop((send, recv));
            }));
        }
        for t in tasks {
            t.abort();
        }
    });
    (endpoint, url, task)
}

/// A client with two streams to [`stalling_server`] keeps sending on the live
/// stream once the stalled one has `cap` payloads in flight.
async fn stalled_stream_case(size: usize, max_inflight: usize, n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, url, task) = stalling_server(size, dir.path()).await;
    let spec = spec_of(size);
    let mut client = registry()
        .connect(
            &format!("{url}&streams=2&linger=1"),
            &spec,
            &options(max_inflight),
        )
        .await
        .unwrap();
    let stuck = (max_inflight / 2) as u64;
    let payload = vec![5u8; size];
    timeout(Duration::from_secs(30), async {
        for _ in 0..n {
            client.send(&payload).await.unwrap();
        }
    })
    .await
    .expect("sends kept going past the stalled stream");
    let st = client.stats();
    assert_eq!(st.sent, n);
    assert!(st.acked + 2 * stuck >= n, "acked {} of {n}", st.acked);
    // Waiting for everything cannot finish: the stalled stream holds its share.
    assert!(timeout(Duration::from_millis(300), client.wait())
        .await
        .is_err());
    client.close().await.unwrap();
    task.abort();
    endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn a_stalled_stream_does_not_stall_the_client() {
    bounded(stalled_stream_case(SIZE, 4, 200)).await;
}

#[tokio::test]
async fn a_stalled_stream_does_not_stall_the_client_with_large_payloads() {
    // 8 payloads of 256 KiB per stream in flight: more than the stand-in server's
    // stream window (quinn's default, 1.25 MB), so the stalled stream's flow
    // control fills up as well; `send` must still not wait on it.
    bounded(stalled_stream_case(256 * 1024, 16, 40)).await;
}

#[tokio::test]
async fn a_stalled_stream_does_not_stall_its_connection_on_the_server() {
    stalled_stream_on_server_case(SIZE).await;
}

#[tokio::test]
async fn a_stream_stalled_mid_payload_does_not_stall_its_connection_on_the_server() {
    // Large payloads: the server waits for whole ones before reserving store
    // slots (core's direct receive over the stream's look-ahead queue).
    stalled_stream_on_server_case(200_000).await;
}

async fn stalled_stream_on_server_case(size: usize) {
    bounded(async {
        let (server, url) = server_of(size, "", 1).await;
        let (_endpoint, conn) = raw_connection(&url, Duration::from_secs(10)).await.unwrap();
        // Stream A: hello, handshake, then half a payload, and silence (kept open).
        let (mut a_send, mut a_recv) = conn.open_bi().await.unwrap();
        a_send
            .write_all(&echo_core::wire::CLIENT_HELLO)
            .await
            .unwrap();
        let hs = echo_core::wire::handshake_bytes(&spec_of(size).wire());
        let mut got = vec![0u8; hs.len()];
        a_recv.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hs);
        let a_payload = numbered(1_000_000, size);
        a_send.write_all(&a_payload[..size / 2]).await.unwrap();
        // Stream B: a bad hello; the server closes that stream only.
        let (mut b_send, mut b_recv) = conn.open_bi().await.unwrap();
        b_send.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let r = timeout(Duration::from_secs(10), b_recv.read_to_end(1024))
            .await
            .expect("the bad stream is closed");
        assert!(
            r.as_ref().map_or(true, |v| v.is_empty()),
            "no handshake for a bad hello, got {r:?}"
        );
        // Streams C and D on the same connection deliver everything.
        let mut clients = Vec::new();
        for id in [1u32, 2] {
            let (send, recv) = conn.open_bi().await.unwrap();
            let c = StreamClient::connect(
                recv,
                send,
                &spec_of(size),
                &options(8),
                true,
                format!("s{id}"),
            )
            .await
            .unwrap();
            clients.push((id, c));
        }
        // Batches are taken while the clients send: the store holds fewer
        // than 100 large samples.
        let send_all = async {
            for (id, c) in &mut clients {
                for k in 0..50 {
                    c.send(&numbered(*id * 1000 + k, size)).await.unwrap();
                }
                c.wait().await.unwrap();
            }
        };
        let ((), got) = tokio::join!(send_all, collect_payloads(&server, 100));
        let mut next = [1000, 2000];
        for p in &got {
            let i = u32::from_le_bytes(p[..4].try_into().unwrap());
            let s = (i / 1000) as usize - 1;
            assert!(s < 2 && i == next[s], "sample {i} out of order or unknown");
            assert!(*p == numbered(i, size), "sample {i} corrupted");
            next[s] += 1;
        }
        assert_eq!(next, [1050, 2050]);
        for (_, c) in &mut clients {
            c.close().await.unwrap();
        }
        // Stream A resumes: its payload arrives whole.
        a_send.write_all(&a_payload[size / 2..]).await.unwrap();
        let got = collect_payloads(&server, 1).await;
        assert!(
            got[0] == a_payload,
            "the stalled stream's payload corrupted"
        );
        // Stalled again mid-payload: shutdown is not held up, and the partial
        // payload never arrives.
        a_send.write_all(&a_payload[..size / 2]).await.unwrap();
        timeout(Duration::from_secs(15), server.shutdown())
            .await
            .unwrap()
            .unwrap();
        if let Some(b) = server.next_batch().await {
            panic!("unexpected batch of {} after shutdown", b.len());
        }
    })
    .await;
}

/// The next `n` samples the server hands out, whole.
async fn collect_payloads(server: &Server, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        let b = timeout(Duration::from_secs(20), server.next_batch())
            .await
            .expect("batch in time")
            .expect("a batch");
        for k in 0..b.len() {
            let mut p = Vec::new();
            b.copy_sample(k, &mut p);
            got.push(p);
        }
    }
    got
}

#[tokio::test]
async fn samples_spread_over_streams_and_all_arrive() {
    bounded(async {
        let (server, url) = server("", 50).await;
        let mut client = registry()
            .connect(&format!("{url}&streams=4"), &spec(), &options(16))
            .await
            .unwrap();
        // The ring holds 150 samples: consume while sending.
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { collect(&server, 400).await })
        };
        for i in 0..400u32 {
            client.send(&[(i % 251) as u8; SIZE]).await.unwrap();
        }
        client.wait().await.unwrap();
        assert_eq!(client.stats().acked, 400);
        let got = consumer.await.unwrap();
        assert_eq!(got.len(), 400);
        let m = server.metrics();
        assert_eq!(
            m.transports["quic"].connections_total, 4,
            "one ingress connection per stream"
        );
        assert_eq!(m.transports["quic"].samples, 400);
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
    })
    .await;
}

/// Payloads handed over as `Bytes` (`send_bytes`, which QUIC does not copy)
/// and borrowed ones (`send`, copied) arrive intact, and in order on one
/// stream; once acknowledged, quinn holds no reference to a handed-over one.
async fn owned_sends_case(size: usize, streams: usize) {
    let n = 40u32;
    let (server, url) = server_of(size, "", 8).await;
    let mut client = registry()
        .connect(
            &format!("{url}&streams={streams}"),
            &spec_of(size),
            &options(8),
        )
        .await
        .unwrap();
    let consumer = {
        let server = server.clone();
        tokio::spawn(async move { collect_payloads(&server, n as usize).await })
    };
    let mut last = None;
    for i in 0..n {
        let p = numbered(i, size);
        if i % 3 == 2 {
            client.send(&p).await.unwrap();
        } else {
            let p = bytes::Bytes::from(p);
            client.send_bytes(p.clone()).await.unwrap();
            last = Some(p);
        }
    }
    client.wait().await.unwrap();
    let got = consumer.await.unwrap();
    assert_eq!(got.len(), n as usize);
    if streams == 1 {
        for (i, p) in (0..n).zip(&got) {
            assert!(*p == numbered(i, size), "payload {i} of {size} B differs");
        }
    } else {
        let mut want: Vec<Vec<u8>> = (0..n).map(|i| numbered(i, size)).collect();
        let mut got = got;
        want.sort();
        got.sort();
        assert!(
            got == want,
            "payloads of {size} B over {streams} streams differ"
        );
    }
    // Acknowledged data is released by quinn (perhaps a moment after the
    // stream-level ack).
    let last = last.unwrap();
    let released = timeout(Duration::from_secs(10), async {
        while !last.is_unique() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "the client still holds a sent payload");
    client.close().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn owned_payloads_arrive_intact() {
    bounded(async {
        // Below the pooled-copy size, across several 64 KiB pieces, and over
        // several streams (where they pass through an outbox, queued by
        // reference).
        owned_sends_case(64, 1).await;
        // One stream, queued by reference in its outbox (16-64 KiB), order kept.
        owned_sends_case(30_000, 1).await;
        owned_sends_case(200_000, 1).await;
        owned_sends_case(200_000, 4).await;
    })
    .await;
}

#[tokio::test]
async fn streams_per_connection_are_bounded() {
    bounded(async {
        let (server, url) = server("max_streams=2", 4).await;
        let e = match registry()
            .connect(
                &format!("{url}&streams=3"),
                &spec(),
                &ClientOptions {
                    connect_timeout: Duration::from_secs(1),
                    ..options(8)
                },
            )
            .await
        {
            Ok(_) => panic!("a third stream should not open"),
            Err(e) => e,
        };
        assert!(
            matches!(e, Error::Timeout(_)) && e.to_string().contains("max_streams"),
            "{e}"
        );
        let mut ok = registry()
            .connect(&format!("{url}&streams=2"), &spec(), &options(8))
            .await
            .unwrap();
        for i in 0..4u8 {
            ok.send(&[i; SIZE]).await.unwrap();
        }
        ok.wait().await.unwrap();
        ok.close().await.unwrap();
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connections_are_bounded() {
    bounded(async {
        let (server, url) = server("max_conns=1", 4).await;
        let mut first = registry()
            .connect(&url, &spec(), &options(8))
            .await
            .unwrap();
        let e = match registry().connect(&url, &spec(), &options(8)).await {
            Ok(_) => panic!("a second connection should be refused"),
            Err(e) => e,
        };
        assert!(
            e.is_closed() && e.to_string().contains("refused the connection"),
            "{e}"
        );
        first.send(&[1; SIZE]).await.unwrap();
        first.wait().await.unwrap();
        first.close().await.unwrap();
        // The slot frees once the server has seen the first connection close.
        served_once_free(&url, 2, "a connection after the first closed").await;
        assert!(server.metrics().transports["quic"].connections_refused >= 1);
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_vanished_clients_connection_times_out_and_frees_its_slot() {
    bounded(async {
        // The server's idle timeout (1 s) wins the negotiation; the raw
        // connection's keep-alives (every 10 s) come too late to keep it up.
        let (server, url) = server("max_conns=1&idle_timeout=1", 4).await;
        let (_ep, silent) = raw_connection(&url, Duration::from_secs(10)).await.unwrap();
        let e = match registry().connect(&url, &spec(), &options(8)).await {
            Ok(_) => panic!("the silent connection holds the only slot"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("refused the connection"), "{e}");
        // Nothing arrives for it, so only its idle timer can end it.
        let reason = timeout(Duration::from_secs(10), silent.closed())
            .await
            .expect("the idle timeout closes the silent connection");
        assert!(
            matches!(reason, quinn::ConnectionError::TimedOut),
            "{reason}"
        );
        served_once_free(
            &url,
            3,
            "the slot frees once the server timed the connection out",
        )
        .await;
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_clients_see_it() {
    bounded(async {
        let (server, url) = server("", 4).await;
        let (_endpoint, idle) = raw_connection(&url, Duration::from_secs(10)).await.unwrap();
        let mut client = registry()
            .connect(&url, &spec(), &options(8))
            .await
            .unwrap();
        client.send(&[3; SIZE]).await.unwrap();
        client.wait().await.unwrap();
        timeout(Duration::from_secs(15), server.shutdown())
            .await
            .unwrap()
            .unwrap();
        let reason = timeout(Duration::from_secs(10), idle.closed())
            .await
            .unwrap();
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == echo_quic::CODE_SHUTDOWN.into()),
            "{reason}"
        );
        let e = timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = client.send(&[4; SIZE]).await {
                    break e;
                }
            }
        })
        .await
        .unwrap();
        assert!(e.is_closed(), "{e}");
        client.close().await.unwrap();
        client.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_stream_over_max_connections_is_refused_clearly() {
    bounded(async {
        let server = Server::builder(spec())
            .batch_size(4)
            .max_connections(1)
            .registry(registry())
            .build()
            .unwrap();
        let url = server.listen("quic://127.0.0.1:0").await.unwrap();
        let e = match registry()
            .connect(&format!("{url}&streams=2"), &spec(), &options(8))
            .await
        {
            Ok(_) => panic!("the second stream should be refused"),
            Err(e) => e,
        };
        eprintln!("{e}");
        assert!(
            e.is_closed() && e.to_string().contains("refused stream 1"),
            "{e}"
        );
        // The refused client's first stream is gone with it; one stream fits.
        served_once_free(&url, 9, "one stream within max_connections").await;
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn factory_default_streams_apply() {
    bounded(async {
        let (server, url) = server("", 8).await;
        let mut reg = Registry::new();
        reg.register(
            "quic",
            Arc::new(QuicTransportFactory),
            Arc::new(QuicClientFactory::with_streams(3)),
        )
        .unwrap();
        let mut client = reg.connect(&url, &spec(), &options(8)).await.unwrap();
        for i in 0..8u8 {
            client.send(&[i; SIZE]).await.unwrap();
        }
        client.wait().await.unwrap();
        assert_eq!(server.metrics().transports["quic"].connections_total, 3);
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
    })
    .await;
}

/// A payload of `size` bytes that carries its index and differs at every offset.
fn numbered(i: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|k| (k as u32).wrapping_mul(7).wrapping_add(i.wrapping_mul(131)) as u8)
        .collect();
    p[..4].copy_from_slice(&i.to_le_bytes());
    p
}

#[tokio::test]
async fn large_payloads_arrive_intact_on_loopback_and_gso_paths() {
    // 200,000 bytes: three 64 KiB pieces written through the client's buffer
    // pool and a short tail through quinn's own copy.
    const BIG: usize = 200_000;
    const N: u32 = 24;
    bounded(async {
        for (query, streams) in [
            ("", 1),
            ("", 2),
            ("loopback_mtu=0", 1),
            ("loopback_mtu=0", 2),
        ] {
            let (server, url) = server_of(BIG, query, 4).await;
            let mut client = registry()
                .connect(
                    &format!("{url}&streams={streams}&{query}"),
                    &spec_of(BIG),
                    &options(8),
                )
                .await
                .unwrap();
            let sender = tokio::spawn(async move {
                for i in 0..N {
                    client.send(&numbered(i, BIG)).await.unwrap();
                }
                client.wait().await.unwrap();
                client
            });
            let mut seen = vec![false; N as usize];
            for p in collect_payloads(&server, N as usize).await {
                let i = u32::from_le_bytes(p[..4].try_into().unwrap());
                assert!(
                    i < N && !seen[i as usize],
                    "{query} x{streams}: sample {i} again"
                );
                assert!(
                    p == numbered(i, BIG),
                    "{query} x{streams}: sample {i} corrupted"
                );
                seen[i as usize] = true;
            }
            let mut client = sender.await.unwrap();
            client.close().await.unwrap();
            server.shutdown().await.unwrap();
        }
    })
    .await;
}

/// Waits until the connection's path MTU exceeds `above`, and returns it.
async fn mtu_above(conn: &quinn::Connection, above: u16) -> u16 {
    loop {
        let mtu = conn.stats().path.current_mtu;
        if mtu > above {
            return mtu;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn loopback_connections_discover_large_packets_unless_told_not_to() {
    bounded(async {
        let (server, url) = server("", 8).await;
        let (_endpoint, conn) = raw_connection(&url, Duration::from_secs(10)).await.unwrap();
        // Larger than any GSO-compatible size: only loopback_mtu allows it.
        // The default bound (65527) is in effect: above the old 32768.
        let mtu = mtu_above(&conn, 32768).await;
        assert!(mtu <= 65527, "{mtu}");
        conn.close(0u32.into(), b"");

        let (_endpoint, conn) =
            raw_connection(&format!("{url}&loopback_mtu=0"), Duration::from_secs(10))
                .await
                .unwrap();
        // Discovery runs, bounded by max_mtu like on any other path.
        let mtu = mtu_above(&conn, 1452).await;
        assert!(mtu <= 6500, "{mtu}");
        conn.close(0u32.into(), b"");
        server.shutdown().await.unwrap();
    })
    .await;
}

/// Every test here finishes well within this, or fails instead of hanging.
async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(90), test)
        .await
        .expect("test took over 90 s");
}

/// A server bound to a wildcard address, reached at another of the host's
/// addresses than the one the system would send from (127.0.0.2; Linux routes
/// all of 127/8 to loopback, and answers to 127.0.0.1 from 127.0.0.1): it
/// answers from the address it was reached at, or the client drops every
/// answer and never connects.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_wildcard_server_answers_from_the_address_it_was_reached_at() {
    bounded(async {
        let server = Server::builder(spec())
            .batch_size(4)
            .registry(registry())
            .build()
            .unwrap();
        let url = server.listen("quic://0.0.0.0:0").await.unwrap();
        let url = url.replacen("quic://0.0.0.0:", "quic://127.0.0.2:", 1);
        assert!(url.starts_with("quic://127.0.0.2:"), "{url}");
        let mut client = registry()
            .connect(&url, &spec(), &options(8))
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        for byte in 1..=4u8 {
            client.send(&[byte; SIZE]).await.unwrap();
        }
        client.wait().await.unwrap();
        assert_eq!(collect(&server, 4).await, vec![1, 2, 3, 4]);
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
    })
    .await;
}

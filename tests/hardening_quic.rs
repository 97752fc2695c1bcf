//! Hostile peers against a `quic://` server while well-behaved clients keep
//! sending: garbage instead of the client hello, a hello that never finishes,
//! a stream sending one byte at a time, a flood of QUIC connections that never
//! open a stream, and QUIC handshakes that never finish. Every well-behaved sample
//! arrives exactly once, byte-exact.
//! (Streams over `max_streams` and connections over `max_conns` are in
//! echo-quic's own tests.)
#![cfg(feature = "quic")]

mod hardening;

use std::time::Duration;

use echo::quic::{quinn, raw_connection};
use echo::wire::{handshake_bytes, CLIENT_HELLO};
use echo::{Limits, Server};
use echo_core::testkit::{kit_sample, kit_spec};
use hardening::{assert_exactly, rss_kib, spawn_consumer, spawn_good, within};

/// Opens `n` QUIC connections to the server at `url` from ONE client endpoint
/// (each endpoint has megabytes of receive buffers, which would hide the server's
/// share of the process's memory), completing the TLS handshake and nothing else.
async fn silent_connections(url: &str, n: usize) -> (quinn::Endpoint, Vec<quinn::Connection>) {
    use quinn::crypto::rustls::QuicClientConfig;
    use quinn::rustls;
    let url = echo::Url::parse(url).unwrap();
    let ca = url
        .query_pairs()
        .find(|(k, _)| k == "ca")
        .map(|(_, v)| std::path::PathBuf::from(v.as_ref()))
        .expect("the listener URL names its certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(echo::quic::load_certs(&ca).unwrap());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![echo::quic::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
        .parse()
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..n {
        let c = within(
            10,
            "a QUIC handshake",
            ep.connect(addr, "127.0.0.1").unwrap(),
        )
        .await
        .unwrap();
        conns.push(c);
    }
    (ep, conns)
}

/// Reads a stream to its end (or reset), bounded; returns what came.
async fn read_to_end(recv: &mut quinn::RecvStream, secs: u64) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    within(secs, "the server ending the stream", async {
        // The end, or a reset: either way the stream is over.
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    got
}

/// A server for `spec` on `quic://127.0.0.1:0` with a handshake timeout of 1 s
/// (for wire and TLS handshakes alike), and its URL.
async fn quic_server(spec: &echo::Spec) -> (Server, String) {
    let server = Server::builder(spec.clone())
        .batch_size(16)
        .limits(Limits {
            handshake_timeout: Duration::from_secs(1),
            ..Limits::default()
        })
        .registry(echo::registry())
        .build()
        .unwrap();
    let url = server.listen("quic://127.0.0.1:0").await.unwrap();
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hellos_slow_streams_and_silent_connections_harm_no_one() {
    within(60, "the test", async {
        let spec = kit_spec(64);
        let (server, url) = quic_server(&spec).await;
        let consumer = spawn_consumer(&server);
        let good = spawn_good(&url, &spec, 0..3, 400);

        // Garbage instead of the hello: the stream ends without a handshake.
        let (_ep, conn) = raw_connection(&url, Duration::from_secs(10)).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_end(&mut recv, 10).await;
        assert!(got.is_empty(), "a bad hello got {got:?}");

        // Half a hello, then silence: closed after the handshake timeout (1 s).
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&CLIENT_HELLO[..2]).await.unwrap();
        let got = read_to_end(&mut recv, 10).await;
        assert!(got.is_empty(), "an unfinished hello got {got:?}");
        drop(send);

        // The same connection still serves a proper stream, one byte at a time.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&CLIENT_HELLO).await.unwrap();
        let want = handshake_bytes(&spec.wire());
        let mut hs = vec![0u8; want.len()];
        within(10, "the handshake", recv.read_exact(&mut hs))
            .await
            .unwrap();
        assert_eq!(hs, want);
        let mut sample = Vec::new();
        kit_sample(&spec, 500, 0, &mut sample);
        for b in &sample {
            send.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut ack = [0u8; 1];
        within(10, "the slow stream's ack", recv.read_exact(&mut ack))
            .await
            .unwrap();
        assert_eq!(ack, [1]);
        send.finish().unwrap();

        // A flood of QUIC connections that never open a stream.
        let before = rss_kib();
        let (_silent_ep, silent) = silent_connections(&url, 50).await;
        let later = spawn_good(&url, &spec, 3..5, 200);
        for g in good.into_iter().chain(later) {
            within(30, "a good client", g).await.unwrap();
        }
        let after = rss_kib();
        eprintln!(
            "quic: RSS {before} KiB before, {after} KiB with 50 silent connections (and 400 more samples)"
        );
        assert!(
            after.saturating_sub(before) < 64 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
        within(15, "shutdown with silent connections", server.shutdown())
            .await
            .unwrap();
        let got = within(10, "the consumer", consumer).await.unwrap();
        for (id, n) in [(0, 400), (1, 400), (2, 400), (3, 200), (4, 200), (500, 1)] {
            assert_exactly(&got, id, n);
        }
        assert_eq!(got.len(), 6, "unexpected ids: {:?}", got.keys());
        // Shutdown closed the silent connections.
        for c in &silent {
            within(10, "a silent connection's close", c.closed()).await;
        }
    })
    .await
}

/// A UDP relay in front of the server at `server`: it passes on the first
/// datagram it receives from a client (a QUIC Initial, the start of a TLS
/// handshake) and drops everything after it, both ways, so the handshake it
/// started never finishes. Returns the relay's address.
async fn first_datagram_only(server: std::net::SocketAddr) -> std::net::SocketAddr {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = relay.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut passed = false;
        while let Ok((n, from)) = relay.recv_from(&mut buf).await {
            if from != server && !std::mem::replace(&mut passed, true) {
                let _ = relay.send_to(&buf[..n], server).await;
            }
        }
    });
    addr
}

/// QUIC connections whose TLS handshake starts and never finishes (the server's
/// answers are lost, the client sends nothing more) are closed after
/// `handshake_timeout` (1 s here; the idle timeout that would otherwise end
/// them is 30 s) and counted as refused, while good clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_quic_handshakes_are_cut_at_the_handshake_timeout() {
    within(60, "the test", async {
        let spec = kit_spec(64);
        let (server, url) = quic_server(&spec).await;
        let consumer = spawn_consumer(&server);
        let refused = || server.metrics().transports["quic"].connections_refused;
        assert_eq!(refused(), 0);

        let parsed = echo::Url::parse(&url).unwrap();
        let target = format!("127.0.0.1:{}", parsed.port().unwrap())
            .parse()
            .unwrap();
        let mut hanging = Vec::new();
        for _ in 0..3 {
            let mut via = parsed.clone();
            via.set_port(Some(first_datagram_only(target).await.port()))
                .unwrap();
            // Its own connect gives up long after the server's limit.
            hanging.push(tokio::spawn(async move {
                raw_connection(via.as_str(), Duration::from_secs(30)).await
            }));
        }
        let good = spawn_good(&url, &spec, 0..2, 300);
        within(6, "the server cutting 3 unfinished handshakes", async {
            while refused() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(refused(), 3, "only the unfinished handshakes are refused");
        for h in &hanging {
            assert!(!h.is_finished(), "a client behind the relay connected");
        }
        hanging.iter().for_each(|h| h.abort());

        let later = spawn_good(&url, &spec, 2..3, 300);
        for g in good.into_iter().chain(later) {
            within(30, "a good client", g).await.unwrap();
        }
        within(15, "shutdown", server.shutdown()).await.unwrap();
        let got = within(10, "the consumer", consumer).await.unwrap();
        for id in 0..3 {
            assert_exactly(&got, id, 300);
        }
        assert_eq!(got.len(), 3, "unexpected ids: {:?}", got.keys());
        assert_eq!(refused(), 3);
    })
    .await
}

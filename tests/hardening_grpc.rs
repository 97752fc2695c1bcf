//! Hostile peers against a `grpc://` server while well-behaved clients keep
//! sending: messages over the per-message limits, bytes that are not HTTP/2, and a
//! flood of TCP connections that never send anything; and on `grpcs://`, TLS
//! handshakes that never finish holding every connection slot. Each hostile peer
//! is refused or held on its own (TLS handshakes for `handshake_timeout` at most);
//! every well-behaved sample arrives exactly once, byte-exact, and nothing from a
//! refused message reaches a batch.
#![cfg(feature = "grpc")]

mod hardening;

use std::time::Duration;

use bytes::Bytes;
use echo::grpc::proto::PushRequest;
use echo::{Server, Spec, Url};
use echo_core::testkit::{kit_sample, kit_spec};
use hardening::{
    assert_exactly, join_good, rss_kib, self_signed, spawn_consumer, spawn_good, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Pushes one message of kit samples `0..count` of client 900, cut to `len`
/// bytes, on a fresh Push stream; returns the status it was refused with.
async fn push_refused(url: &str, spec: &Spec, count: u32, len: usize) -> (String, String) {
    let mut api = echo::grpc::api_client(&Url::parse(url).unwrap(), Duration::from_secs(10))
        .await
        .unwrap();
    let (mut body, mut buf) = (Vec::new(), Vec::new());
    for seq in 0..count {
        kit_sample(spec, 900, seq, &mut buf);
        body.extend_from_slice(&buf);
    }
    body.truncate(len);
    let msg = PushRequest {
        payloads: Bytes::from(body),
    };
    let reply = within(10, "the refusal", async {
        match api.push(futures::stream::iter([msg])).await {
            Ok(r) => r.into_inner().message().await,
            Err(s) => Err(s),
        }
    })
    .await;
    let s = match reply {
        Ok(r) => panic!("a message of {count} payloads was accepted: {r:?}"),
        Err(s) => s,
    };
    (format!("{:?}", s.code()), s.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_non_http2_bytes_and_silent_connections_harm_no_one() {
    within(60, "the test", async {
        let spec = kit_spec(64);
        let server = Server::builder(spec.clone())
            .batch_size(16)
            .registry(echo::registry())
            .build()
            .unwrap();
        let url = server
            .listen("grpc://127.0.0.1:0?max_payloads=4")
            .await
            .unwrap();
        let addr = url.strip_prefix("grpc://").unwrap().to_string();
        let consumer = spawn_consumer(&server);
        let good = spawn_good(&url, &spec, 0..3, 400);

        // One payload short of its size: INVALID_ARGUMENT naming both sizes.
        let (code, msg) = push_refused(&url, &spec, 1, 63).await;
        assert_eq!(code, "InvalidArgument", "{msg}");
        assert!(msg.contains("64") && msg.contains("63"), "{msg}");
        // Over the message limit (4 payloads of 64 bytes plus framing), a little
        // and a lot: refused before it is decoded, OUT_OF_RANGE naming the limit.
        for count in [5, 256] {
            let (code, msg) = push_refused(&url, &spec, count, 64 * count as usize).await;
            assert_eq!(code, "OutOfRange", "{msg}");
            assert!(msg.contains("limit"), "{msg}");
        }

        // Bytes that are not HTTP/2: the connection is closed, not left hanging.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = within(10, "closing a non-HTTP/2 peer", s.read_to_end(&mut rest)).await;

        // A flood of TCP connections that never send the HTTP/2 preface.
        let before = rss_kib();
        let mut silent = Vec::new();
        for _ in 0..200 {
            silent.push(TcpStream::connect(&addr).await.unwrap());
        }
        let later = spawn_good(&url, &spec, 3..5, 200);
        for g in good.into_iter().chain(later) {
            within(30, "a good client", g).await.unwrap();
        }
        let after = rss_kib();
        eprintln!("grpc: RSS {before} KiB before, {after} KiB with 200 silent connections");
        assert!(
            after.saturating_sub(before) < 64 * 1024,
            "RSS grew from {before} KiB to {after} KiB with 200 silent connections"
        );
        // The silent peers leave before the shutdown: a silent peer still open
        // holds the shutdown for its whole grace period (see the ignored test
        // below).
        drop(silent);
        within(15, "shutdown", server.shutdown()).await.unwrap();
        let got = within(10, "the consumer", consumer).await.unwrap();
        for (id, n) in [(0, 400), (1, 400), (2, 400), (3, 200), (4, 200)] {
            assert_exactly(&got, id, n);
        }
        assert!(
            !got.contains_key(&900),
            "samples of a refused message reached a batch"
        );
        assert_eq!(got.len(), 5, "unexpected ids: {:?}", got.keys());
    })
    .await
}

/// A TCP connection that never sends the HTTP/2 preface must not hold the
/// shutdown: the transport closes idle connections after a short grace instead of
/// waiting for the server's (here 60 s) `shutdown_grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_by_a_connection_that_never_sends_the_preface() {
    let spec = kit_spec(64);
    let server = Server::builder(spec.clone())
        .batch_size(4)
        .shutdown_grace(Duration::from_secs(60))
        .registry(echo::registry())
        .build()
        .unwrap();
    let url = server.listen("grpc://127.0.0.1:0").await.unwrap();
    let _silent = TcpStream::connect(url.strip_prefix("grpc://").unwrap())
        .await
        .unwrap();
    // Let the server accept it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(20, "shutdown with one silent connection", server.shutdown())
        .await
        .unwrap();
}

/// A peer that starts a TLS handshake its own way and never finishes it: it
/// writes `first`, then one more byte every 100 ms if `trickle`, until the
/// server closes the connection. Returns how many bytes it wrote.
async fn slow_tls_peer(addr: String, first: Vec<u8>, trickle: bool) -> usize {
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&first).await.unwrap();
    let mut written = first.len();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                // The server closed (or reset) the connection: what we wait for.
                Ok(0) | Err(_) => return written,
                // It never answers an unfinished ClientHello.
                Ok(n) => panic!("the server answered {n} bytes to an unfinished handshake"),
            },
            _ = tokio::time::sleep(Duration::from_millis(100)), if trickle => {
                if s.write_all(&[0]).await.is_err() {
                    return written;
                }
                written += 1;
            }
        }
    }
}

/// `grpcs://` with every TCP connection slot held by peers that start TLS and
/// never finish: silent ones, one that sends half a ClientHello record, one
/// that trickles a byte every 100 ms (each byte would reset an idle timer, not
/// the handshake limit). The server cuts each after `handshake_timeout` (1 s
/// here, against a default of 10 s), their slots come back, and clients that
/// connect afterwards deliver every sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_handshakes_are_cut_at_the_handshake_timeout() {
    within(60, "the test", async {
        let spec = kit_spec(64);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "127.0.0.1");
        let server = Server::builder(spec.clone())
            .batch_size(16)
            .limits(echo::Limits {
                handshake_timeout: Duration::from_secs(1),
                max_connections: 2,
                ..echo::Limits::default()
            })
            .registry(echo::registry())
            .build()
            .unwrap();
        let url = server
            .listen(&format!(
                "grpcs://127.0.0.1:0?cert={}&key={}",
                cert.display(),
                key.display()
            ))
            .await
            .unwrap();
        let addr = url.strip_prefix("grpcs://").unwrap().to_string();
        let consumer = spawn_consumer(&server);

        // max_connections = 2 bounds TCP connections at 4: take all of them.
        // A TLS 1.2/1.3 ClientHello record header claiming 512 bytes, then the
        // handshake header and a few of its bytes.
        let half_hello = vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let peers = [
            (Vec::new(), false),
            (Vec::new(), false),
            (half_hello.clone(), false),
            (half_hello, true),
        ]
        .map(|(first, trickle)| tokio::spawn(slow_tls_peer(addr.clone(), first, trickle)));
        let started = std::time::Instant::now();
        let mut written = Vec::new();
        for p in peers {
            // Cut by the server well before the default 10 s limit.
            written.push(within(6, "cutting a slow TLS peer", p).await.unwrap());
        }
        eprintln!(
            "grpcs: 4 slow TLS peers cut after {:?} (bytes written: {written:?})",
            started.elapsed()
        );
        assert!(
            written[3] > written[2],
            "the trickling peer wrote nothing after its first bytes: {written:?}"
        );

        // Their slots are free again: clients pinning the server's certificate
        // connect and deliver everything.
        let good_url = format!("{url}?pin={}", cert.display());
        join_good(spawn_good(&good_url, &spec, 0..2, 300)).await;
        within(15, "shutdown", server.shutdown()).await.unwrap();
        let got = within(10, "the consumer", consumer).await.unwrap();
        assert_exactly(&got, 0, 300);
        assert_exactly(&got, 1, 300);
        assert_eq!(got.len(), 2, "unexpected ids: {:?}", got.keys());
    })
    .await
}

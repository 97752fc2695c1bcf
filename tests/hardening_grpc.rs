//! Hostile peers against a `grpc://` server while well-behaved clients keep
//! sending: messages over the per-message limits, bytes that are not HTTP/2, and a
//! flood of TCP connections that never send anything. Each hostile peer is refused
//! or held on its own; every well-behaved sample arrives exactly once, byte-exact,
//! and nothing from a refused message reaches a batch.
#![cfg(feature = "grpc")]

mod hardening;

use std::time::Duration;

use bytes::Bytes;
use echo::grpc::proto::PushRequest;
use echo::{Server, Spec, Url};
use echo_core::testkit::{kit_sample, kit_spec};
use hardening::{assert_exactly, rss_kib, spawn_consumer, spawn_good, within};
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

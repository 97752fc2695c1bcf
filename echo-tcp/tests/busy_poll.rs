//! Busy polling over real sockets, on servers and on clients.
//!
//! A test binary of its own: streams stop polling while their process has more
//! of them open than half its CPUs, so no other test may hold streams meanwhile
//! (and everything here runs in one test, one stream that polls at a time).

use std::time::Duration;

use echo_core::testkit::{kit_sample, kit_spec, kit_verify};
use echo_core::{ClientOptions, Limits, Server, Spec};
use echo_tcp::TcpClient;

const SAMPLES: u32 = 3000;

/// Sends `SAMPLES` samples to a server listening on `url`, in bursts with
/// pauses (so that polls also find nothing and back off), and checks that every
/// one arrives intact and in order. Returns the polls that found bytes after
/// waiting for them, and all polls.
async fn run(url: &str, spec: &Spec, server_poll: Duration, client_poll: Duration) -> (u64, u64) {
    let server = Server::builder(spec.clone())
        .batch_size(10)
        .registry(echo_tcp::registry())
        .limits(Limits {
            busy_poll: server_poll,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let url = server.listen(url).await.unwrap();
    let before = echo_core::busy::counts();
    let opts = ClientOptions {
        busy_poll: client_poll,
        ..ClientOptions::default()
    };
    let mut client = TcpClient::connect(&url, spec, &opts).await.unwrap();
    // The learner: takes batches while the samples come, checking each.
    let learner = {
        let server = server.clone();
        let spec = spec.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let (mut p, mut s) = (Vec::new(), Vec::new());
            let mut next = 0;
            while next < SAMPLES {
                let batch = server.next_batch().await.expect("a batch");
                for k in 0..batch.len() {
                    batch.copy_sample(k, &mut p);
                    assert_eq!(kit_verify(&spec, &p, &mut s).unwrap(), (3, next), "{url}");
                    next += 1;
                }
            }
        })
    };
    let mut buf = Vec::new();
    for seq in 0..SAMPLES {
        kit_sample(spec, 3, seq, &mut buf);
        client.send(&buf).await.unwrap();
        if seq % 500 == 499 {
            client.wait().await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    client.wait().await.unwrap();
    learner.await.unwrap();
    let after = echo_core::busy::counts();
    client.close().await.unwrap();
    server.shutdown().await.unwrap();
    (
        after.found_after_waiting - before.found_after_waiting,
        after.polls - before.polls,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_servers_and_clients_deliver_every_sample_in_order() {
    let test = async {
        let spec = kit_spec(64);
        let dir = tempfile::tempdir().unwrap();
        let unix = format!("unix://{}", dir.path().join("s.sock").display());
        // Long enough for a debug build's round trip, so that polls do find bytes.
        let on = Duration::from_millis(20);
        for url in ["tcp://127.0.0.1:0", unix.as_str()] {
            // Bytes that came while a poll waited for them: wake-ups saved.
            let (waited, _) = run(url, &spec, on, Duration::ZERO).await;
            assert!(waited > 0, "{url}: the server's polls never caught bytes");
            let (waited, _) = run(url, &spec, Duration::ZERO, on).await;
            assert!(waited > 0, "{url}: the client's polls never caught acks");
            let (_, polls) = run(url, &spec, Duration::ZERO, Duration::ZERO).await;
            assert_eq!(polls, 0, "{url}: polling is off on both sides");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("timed out");
}

//! The TCP and Unix listeners and TcpClient: limits, socket files, wire details, errors.

use std::future::Future;
use std::time::Duration;

use echo_core::testkit::{kit_sample, kit_spec, kit_verify};
use echo_core::{Client, ClientOptions, Error, Limits, Server, Spec};
use echo_tcp::TcpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

fn server(spec: &Spec, batch: usize) -> Server {
    Server::builder(spec.clone())
        .batch_size(batch)
        .registry(echo_tcp::registry())
        .build()
        .unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// Sends samples `0..n` of `id` and waits for their acks.
async fn send_n(client: &mut TcpClient, spec: &Spec, id: u32, n: u32) {
    let mut buf = Vec::new();
    for seq in 0..n {
        kit_sample(spec, id, seq, &mut buf);
        client.send(&buf).await.unwrap();
    }
    client.wait().await.unwrap();
}

/// Collects `n` samples from `server`, checking each.
async fn collect(server: &Server, n: usize) -> Vec<(u32, u32)> {
    let spec = server.spec().clone();
    let (mut p, mut s) = (Vec::new(), Vec::new());
    let mut got = Vec::new();
    while got.len() < n {
        let batch = server.next_batch().await.expect("a batch");
        for k in 0..batch.len() {
            batch.copy_sample(k, &mut p);
            got.push(kit_verify(&spec, &p, &mut s).unwrap());
        }
    }
    got
}

/// Reads the server's handshake from a raw stream.
async fn read_handshake(stream: &mut TcpStream, spec: &Spec) {
    let want = echo_core::wire::handshake_bytes(&spec.wire());
    let mut got = vec![0u8; want.len()];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, want);
}

async fn raw_connect(url: &str) -> TcpStream {
    let addr = url.strip_prefix("tcp://").unwrap();
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_zero_binds_an_ephemeral_port_and_round_trips() {
    within(30, async {
        let spec = kit_spec(64);
        let server = server(&spec, 10);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        assert_ne!(port, 0, "{url}");
        assert_eq!(url, format!("tcp://127.0.0.1:{port}"));
        // A bare host:port works too.
        let mut client = TcpClient::connect(&format!("127.0.0.1:{port}"), &spec, &opts())
            .await
            .unwrap();
        assert_eq!(client.url().as_str(), url);
        send_n(&mut client, &spec, 7, 30).await;
        assert_eq!(client.stats().acked, 30);
        assert_eq!(client.inflight(), 0);
        let got = collect(&server, 30).await;
        assert_eq!(got, (0..30).map(|s| (7, s)).collect::<Vec<_>>());
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        let listeners = server.listeners();
        assert_eq!(listeners[0].url, url);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ack_per_payload_and_never_another_byte() {
    within(30, async {
        let spec = kit_spec(32);
        let server = server(&spec, 4);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let mut s = raw_connect(&url).await;
        read_handshake(&mut s, &spec).await;
        // Three payloads and a half in one write: exactly three acks.
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for seq in 0..4 {
            kit_sample(&spec, 1, seq, &mut buf);
            all.extend_from_slice(&buf);
        }
        s.write_all(&all[..3 * 32 + 16]).await.unwrap();
        let mut acks = [0u8; 3];
        s.read_exact(&mut acks).await.unwrap();
        assert_eq!(acks, [1, 1, 1]);
        let mut extra = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_millis(200), s.read(&mut extra)).await;
        assert!(
            r.is_err(),
            "server sent more than one ack per payload: {r:?}"
        );
        // The rest of the fourth payload: one more ack.
        s.write_all(&all[3 * 32 + 16..]).await.unwrap();
        s.read_exact(&mut acks[..1]).await.unwrap();
        assert_eq!(acks[0], 1);
        let got = collect(&server, 4).await;
        assert_eq!(got, vec![(1, 0), (1, 1), (1, 2), (1, 3)]);
        // On shutdown the server closes: EOF, no farewell bytes.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "bytes after shutdown: {rest:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_connection_limit_refuses_cleanly_and_frees_slots() {
    within(30, async {
        let spec = kit_spec(64);
        let server = server(&spec, 8);
        let url = server
            .listen("tcp://127.0.0.1:0?max_connections=2")
            .await
            .unwrap();
        assert!(!url.contains('?'), "{url}");
        assert!(server.listeners()[0]
            .details
            .contains(&("max_connections".into(), "2".into())));
        let mut a = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        let b = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        let e = TcpClient::connect(&url, &spec, &opts()).await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        assert!(e.to_string().contains("during the handshake"), "{e}");
        assert_eq!(server.metrics().transports["tcp"].connections_refused, 1);
        // The admitted ones still work.
        send_n(&mut a, &spec, 0, 8).await;
        collect(&server, 8).await;
        // Closing one frees its slot (once the server has seen it go).
        drop(b);
        let mut c = loop {
            match TcpClient::connect(&url, &spec, &opts()).await {
                Ok(c) => break c,
                Err(e) if e.is_closed() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        };
        send_n(&mut c, &spec, 1, 8).await;
        collect(&server, 8).await;
        server.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wide_connection_limit_applies_to_tcp() {
    within(30, async {
        let spec = kit_spec(64);
        let server = Server::builder(spec.clone())
            .batch_size(4)
            .limits(Limits {
                max_connections: 1,
                ..Limits::default()
            })
            .registry(echo_tcp::registry())
            .build()
            .unwrap();
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let _a = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        let e = TcpClient::connect(&url, &spec, &opts()).await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        server.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stalled_mid_payload_holds_only_its_own_connection() {
    within(30, async {
        let spec = kit_spec(1000);
        let server = server(&spec, 10);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let mut stalled = raw_connect(&url).await;
        read_handshake(&mut stalled, &spec).await;
        let mut buf = Vec::new();
        kit_sample(&spec, 99, 0, &mut buf);
        stalled.write_all(&buf[..500]).await.unwrap();
        // Others go on meanwhile.
        let mut clients = Vec::new();
        for id in 0..3 {
            let mut c = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
            let spec = spec.clone();
            clients.push(tokio::spawn(async move {
                send_n(&mut c, &spec, id, 100).await;
                c.close().await.unwrap();
            }));
        }
        let got = collect(&server, 300).await;
        assert!(got.iter().all(|(c, _)| *c < 3));
        for c in clients {
            c.await.unwrap();
        }
        // Shutdown does not wait for the stalled peer to finish its payload.
        server.shutdown().await.unwrap();
        assert!(server.next_batch().await.is_none());
        let mut rest = Vec::new();
        stalled.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sees_connection_closed_when_the_server_leaves_and_after_close() {
    within(30, async {
        let spec = kit_spec(64);
        let server = server(&spec, 4);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let mut client = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        send_n(&mut client, &spec, 0, 4).await;
        collect(&server, 4).await;
        server.shutdown().await.unwrap();
        let mut buf = Vec::new();
        let mut seq = 4;
        let err = loop {
            kit_sample(&spec, 0, seq, &mut buf);
            match client.send(&buf).await {
                Ok(()) => {
                    seq += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => break e,
            }
        };
        assert!(err.is_closed(), "{err}");
        assert!(client.wait().await.is_err() || client.inflight() == 0);
        client.close().await.unwrap();
        client.close().await.unwrap();
        let e = client.send(&buf).await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        assert!(e.to_string().contains("is closed"), "{e}");
    })
    .await
}

/// A fake server that sends `bytes` to whoever connects, then idles.
async fn fake_server(bytes: &'static [u8]) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(bytes).await;
            held.push(s);
        }
    });
    format!("tcp://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_name_what_came() {
    within(30, async {
        let spec = kit_spec(64);
        let short = ClientOptions {
            connect_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        };

        let url = fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let e = TcpClient::connect(&url, &spec, &short).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Wire(_)), "{msg}");
        assert!(
            msg.contains(r#"Unexpected handshake magic b"HTTP""#),
            "{msg}"
        );
        assert!(msg.contains("is the peer an echo server?"), "{msg}");

        let url = fake_server(b"ECHO\x02\x01\x00\x00\x00").await;
        let e = TcpClient::connect(&url, &spec, &short).await.unwrap_err();
        assert!(
            e.to_string().contains("Unsupported echo wire version 2"),
            "{e}"
        );

        // A silent peer: the connect timeout covers the handshake.
        let url = fake_server(b"").await;
        let t0 = std::time::Instant::now();
        let e = TcpClient::connect(&url, &spec, &short).await.unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));

        // Spec mismatch, in the Python client's words.
        let server = server(&spec, 4);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let e = TcpClient::connect(&url, &kit_spec(80), &short)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::SpecMismatch(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "Server spec mismatch: shapes=[[2], [], [48]] vs expected=[[2], [], [64]], \
             dtype_sizes=[4, 8, 1] vs expected=[4, 8, 1]"
        );
        server.shutdown().await.unwrap();

        // Nothing listening.
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("tcp://{}", free.local_addr().unwrap());
        drop(free);
        let e = TcpClient::connect(&url, &spec, &short).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!("connecting to {url}")),
            "{e}"
        );

        // max_inflight 0 is a configuration error, not a hang.
        let zero = ClientOptions {
            max_inflight: 0,
            ..short.clone()
        };
        let e = TcpClient::connect(&url, &spec, &zero).await.unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_get_clear_errors() {
    within(30, async {
        let spec = kit_spec(64);
        let server = server(&spec, 4);
        for (url, want) in [
            (
                "tcp://127.0.0.1:0?max_conections=3",
                "unknown query parameter \"max_conections\"",
            ),
            (
                "tcp://127.0.0.1:0?max_connections=0",
                "max_connections must be at least 1",
            ),
            (
                "tcp://127.0.0.1:0?max_connections=many",
                "max_connections=\"many\"",
            ),
            ("tcp://127.0.0.1", "expected a port"),
            (
                "unix://somehost/tmp/x.sock",
                "expected an absolute path and no host",
            ),
            ("unix:relative.sock", "expected an absolute path"),
        ] {
            let e = server.listen(url).await.unwrap_err();
            assert!(e.to_string().contains(want), "{url}: {e}");
        }
        let e = TcpClient::connect("quic://127.0.0.1:1", &spec, &opts())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not quic://"), "{e}");
        server.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_round_trip_and_socket_file_lifecycle() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        let spec = kit_spec(64);

        // A stale socket file (its listener is gone) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = server(&spec, 5);
        let url = server
            .listen(&format!("unix://{}", path.display()))
            .await
            .unwrap();
        assert_eq!(url, format!("unix://{}", path.display()));

        // A live one is not.
        let other = server
            .listen(&format!("unix://{}", path.display()))
            .await
            .unwrap_err();
        assert!(
            other.to_string().contains("another process is listening"),
            "{other}"
        );

        let mut client = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        send_n(&mut client, &spec, 3, 10).await;
        assert_eq!(
            collect(&server, 10).await,
            (0..10).map(|s| (3, s)).collect::<Vec<_>>()
        );
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert!(!path.exists(), "socket file left behind");

        // Something that is not a socket is never removed.
        std::fs::write(&path, b"precious").unwrap();
        let server = self::server(&spec, 5);
        let e = server
            .listen(&format!("unix://{}", path.display()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        server.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_server_removes_its_socket_file() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped.sock");
        let server = server(&kit_spec(64), 5);
        server
            .listen(&format!("unix://{}", path.display()))
            .await
            .unwrap();
        assert!(path.exists());
        drop(server);
        assert!(!path.exists());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_connects_both_schemes() {
    within(30, async {
        let registry = echo_tcp::registry();
        assert!(registry.contains("tcp") && registry.contains("unix"));
        let dir = tempfile::tempdir().unwrap();
        let spec = kit_spec(40);
        let server = server(&spec, 4);
        let tcp = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let unix = server
            .listen(&format!("unix://{}/r.sock", dir.path().display()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        for (id, url) in [tcp, unix].iter().enumerate() {
            let mut c = registry.connect(url, &spec, &opts()).await.unwrap();
            for seq in 0..2 {
                kit_sample(&spec, id as u32, seq, &mut buf);
                c.send(&buf).await.unwrap();
            }
            c.wait().await.unwrap();
            c.close().await.unwrap();
        }
        let mut got = collect(&server, 4).await;
        got.sort();
        assert_eq!(got, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
        let m = server.metrics();
        assert_eq!(m.transports["tcp"].samples, 2);
        assert_eq!(m.transports["unix"].samples, 2);
        server.shutdown().await.unwrap();
    })
    .await
}

/// A fake server that sends `spec`'s handshake and then never reads.
async fn deaf_server(spec: &Spec) -> String {
    let hs = echo_core::wire::handshake_bytes(&spec.wire());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(&hs).await;
            held.push(s);
        }
    });
    format!("tcp://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_send_cancelled_mid_payload_closes_the_client_instead_of_corrupting_the_stream() {
    within(60, async {
        // Payloads this large are written from the caller's buffer inside `send`.
        let spec = Spec::bytes(1 << 20).unwrap();
        assert!(spec.payload_size() >= echo_core::stream::DIRECT_WRITE_MIN);
        let url = deaf_server(&spec).await;
        let mut client = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        let payload = vec![7u8; spec.payload_size()];
        // The peer never reads: socket buffers fill and a send gets stuck mid-payload.
        let mut cancelled = false;
        for _ in 0..31 {
            match tokio::time::timeout(Duration::from_millis(300), client.send(&payload)).await {
                Ok(r) => r.unwrap(),
                Err(_) => {
                    cancelled = true;
                    break;
                }
            }
        }
        assert!(
            cancelled,
            "socket buffers took 31 MiB without the peer reading"
        );
        let e = client.send(&payload).await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        assert!(e.to_string().contains("was cancelled after"), "{e}");
        // wait() does not hang on the payload that never went out whole.
        let e = client.wait().await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        client.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_send_cancelled_before_writing_leaves_the_client_usable() {
    within(60, async {
        let spec = kit_spec(256 << 10);
        let server = Server::builder(spec.clone())
            .batch_size(4)
            .registry(echo_tcp::registry())
            .build()
            .unwrap();
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let opts = ClientOptions {
            max_inflight: 2,
            ..opts()
        };
        let mut client = TcpClient::connect(&url, &spec, &opts).await.unwrap();
        let mut buf = Vec::new();
        // Nobody consumes: the ring (3 x 4) and the queue fill, acks stop, and a
        // send waits for window room; cancelling that wait costs nothing.
        let mut seq = 0;
        loop {
            kit_sample(&spec, 0, seq, &mut buf);
            match tokio::time::timeout(Duration::from_millis(300), client.send(&buf)).await {
                Ok(r) => {
                    r.unwrap();
                    seq += 1;
                }
                Err(_) => break,
            }
            assert!(seq < 1000, "sends never blocked");
        }
        // Consume everything; the client goes on from where it was.
        let end = seq + 8 - seq % 4; // whole batches
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { collect(&server, end as usize).await })
        };
        for s in seq..end {
            kit_sample(&spec, 0, s, &mut buf);
            client.send(&buf).await.unwrap();
        }
        client.wait().await.unwrap();
        let got = consumer.await.unwrap();
        assert_eq!(got, (0..end).map(|s| (0, s)).collect::<Vec<_>>());
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
    })
    .await
}

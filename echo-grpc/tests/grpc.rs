//! Behaviour of the gRPC transport beyond the conformance kit: refusing bad
//! messages, bearer tokens, TLS checks, packing, the in-flight window, and
//! clients seeing the server go away.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::bounded;
use echo_core::{ClientOptions, Error, Server, Spec, Url};
use echo_grpc::proto::{GetSpecRequest, PushRequest};
use echo_grpc::GrpcClient;
use tonic::Code;

fn new_server(spec: Spec, batch: usize) -> Server {
    Server::builder(spec)
        .batch_size(batch)
        .registry(echo_grpc::registry())
        .build()
        .unwrap()
}

fn msg(bytes: Vec<u8>) -> PushRequest {
    PushRequest {
        payloads: Bytes::from(bytes),
    }
}

/// Every sample the consumer receives until the server is shut down and drained.
async fn drain(server: &Server) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(batch) = server.next_batch().await {
        for k in 0..batch.len() {
            batch.copy_sample(k, &mut buf);
            out.push(buf.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_size_is_invalid_argument_and_earlier_payloads_stay() {
    bounded(60, async {
        let server = new_server(Spec::bytes(8).unwrap(), 4);
        let url = server.listen("grpc://127.0.0.1:0").await.unwrap();
        let mut api = common::raw(&url, "").await;

        let spec = api.get_spec(GetSpecRequest {}).await.unwrap().into_inner();
        assert_eq!(spec.payload_size, 8);
        assert_eq!(spec.leaves.len(), 1);
        assert_eq!(spec.leaves[0].name, "data");
        assert_eq!(spec.leaves[0].dtype, "uint8");
        assert_eq!(spec.leaves[0].shape, [8]);

        let good: Vec<u8> = (0..40).collect();
        let requests = [
            msg(good[..24].to_vec()),
            msg(good[24..].to_vec()),
            msg(vec![0xee; 9]),
            msg(vec![0xdd; 8]),
        ];
        let mut replies = api
            .push(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut acked = 0;
        let status = loop {
            match replies.message().await {
                Ok(Some(r)) => {
                    assert!(r.acked >= acked, "acks are cumulative");
                    acked = r.acked;
                }
                Ok(None) => panic!("the wrong-size message was accepted"),
                Err(s) => break s,
            }
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("8 bytes") && status.message().contains("got 9 bytes"),
            "the error names expected and received sizes: {}",
            status.message()
        );
        assert_eq!(
            acked, 5,
            "both whole messages were acknowledged before the error"
        );

        server.shutdown().await.unwrap();
        let got = drain(&server).await;
        let want: Vec<Vec<u8>> = good.chunks(8).map(|c| c.to_vec()).collect();
        assert_eq!(got, want, "exactly the acknowledged payloads arrived");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_payloads_or_bytes_per_message_are_refused() {
    bounded(60, async {
        // Small payloads: the message fits the decoder's limit, our check refuses it.
        let server = new_server(Spec::bytes(8).unwrap(), 4);
        let url = server
            .listen("grpc://127.0.0.1:0?max_payloads=4")
            .await
            .unwrap();
        let info = server.listeners();
        assert!(info[0]
            .details
            .contains(&("max_payloads_per_message".into(), "4".into())));
        let mut api = common::raw(&url, "").await;
        let r = api
            .push(futures::stream::iter([msg(vec![1; 40])]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await;
        let s = r.expect_err("5 payloads in one message is over the limit of 4");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("at most 4"), "{}", s.message());
        server.shutdown().await.unwrap();
        assert!(drain(&server).await.is_empty());

        // Large payloads: the decoder refuses the message before it is read.
        let server = server_big();
        let url = server
            .listen("grpc://127.0.0.1:0?max_payloads=4")
            .await
            .unwrap();
        let mut api = common::raw(&url, "").await;
        let r = api
            .push(futures::stream::iter([msg(vec![1; 5 * 64])]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await;
        let s = r.expect_err("a message over max_message_bytes");
        assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
        server.shutdown().await.unwrap();
        assert!(drain(&server).await.is_empty());
    })
    .await
}

fn server_big() -> Server {
    new_server(Spec::bytes(64).unwrap(), 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_and_nothing_reaches_the_store_without_it() {
    bounded(60, async {
        let server = new_server(Spec::bytes(8).unwrap(), 2);
        let url = server
            .listen("grpc://127.0.0.1:0?token=open-sesame")
            .await
            .unwrap();
        assert!(server.listeners()[0]
            .details
            .contains(&("auth".into(), "bearer".into())));

        for query in ["", "token=wrong"] {
            let mut api = common::raw(&url, query).await;
            let e = api.get_spec(GetSpecRequest {}).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{query}: {e:?}");
            let e = api
                .push(futures::stream::iter([msg(vec![7; 16])]))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{query}: {e:?}");

            let u = common::with_query(&Url::parse(&url).unwrap(), query);
            let e = GrpcClient::connect(&u, &Spec::bytes(8).unwrap(), &ClientOptions::default())
                .await
                .unwrap_err();
            assert!(e.to_string().contains("Unauthenticated"), "{e}");
        }
        let m = server.metrics();
        let t = m.transports.get("grpc").cloned().unwrap_or_default();
        assert_eq!((t.samples, t.connections_total), (0, 0), "{t:?}");

        let u = common::with_query(&Url::parse(&url).unwrap(), "token=open-sesame");
        let mut c = GrpcClient::connect(&u, &Spec::bytes(8).unwrap(), &ClientOptions::default())
            .await
            .unwrap();
        use echo_core::Client;
        c.send(&[3; 8]).await.unwrap();
        c.send(&[4; 8]).await.unwrap();
        c.wait().await.unwrap();
        c.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(drain(&server).await, vec![vec![3; 8], vec![4; 8]]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_the_server_certificate() {
    use echo_core::Client;
    bounded(60, async {
        let certs = common::certs(&["localhost"]);
        let other = common::certs(&["localhost"]);
        let server = new_server(Spec::bytes(8).unwrap(), 2);
        let url = server
            .listen(&format!(
                "grpcs://127.0.0.1:0?cert={}&key={}",
                certs.cert.display(),
                certs.key.display()
            ))
            .await
            .unwrap();
        let base = Url::parse(&url).unwrap();
        let spec = Spec::bytes(8).unwrap();
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        let connect = |q: String| {
            let u = common::with_query(&base, &q);
            let spec = spec.clone();
            let opts = opts.clone();
            async move { GrpcClient::connect(&u, &spec, &opts).await }
        };

        // Trusted as a CA with the right name, or pinned: accepted.
        for q in [
            format!("ca={}&domain=localhost", certs.cert.display()),
            format!("pin={}", certs.cert.display()),
        ] {
            let mut c = connect(q.clone())
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
            c.send(&[1; 8]).await.unwrap();
            c.wait().await.unwrap();
            c.close().await.unwrap();
        }
        // The wrong name, another certificate, or plaintext: refused, not hung.
        for q in [
            format!("ca={}", certs.cert.display()),
            format!("ca={}&domain=localhost", other.cert.display()),
            format!("pin={}", other.cert.display()),
        ] {
            let e = connect(q.clone())
                .await
                .err()
                .unwrap_or_else(|| panic!("{q} was accepted"));
            assert!(matches!(e, Error::Io(_)), "{q}: {e}");
        }
        let plain = Url::parse(&url.replace("grpcs://", "grpc://")).unwrap();
        assert!(GrpcClient::connect(&plain, &spec, &opts).await.is_err());

        server.shutdown().await.unwrap();
        assert_eq!(drain(&server).await.len(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_errors_name_the_problem() {
    let server = new_server(Spec::bytes(8).unwrap(), 2);
    let e = server.listen("grpcs://127.0.0.1:0").await.unwrap_err();
    assert!(
        e.to_string().contains("needs cert=PATH and key=PATH"),
        "{e}"
    );
    let e = server
        .listen("grpcs://127.0.0.1:0?cert=/nonexistent/c.pem&key=/nonexistent/k.pem")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Tls(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
    let certs = common::certs(&["localhost"]);
    let e = server
        .listen(&format!(
            "grpcs://127.0.0.1:0?cert={}&key={}",
            certs.cert.display(),
            certs.cert.display()
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no usable private key"), "{e}");
    server.shutdown().await.unwrap();
}

/// On a current-thread runtime nothing else runs between sends that do not wait,
/// so packing is deterministic: everything sent goes out together.
#[tokio::test(flavor = "current_thread")]
async fn client_packs_waiting_payloads_into_one_message() {
    use echo_core::Client;
    bounded(60, async {
        let spec = Spec::bytes(16).unwrap();
        let server = new_server(spec.clone(), 64);
        let url = server.listen("grpc://127.0.0.1:0").await.unwrap();
        let opts = ClientOptions {
            max_inflight: 64,
            ..ClientOptions::default()
        };
        let sample = |i: u8| [i; 16];

        let mut c = GrpcClient::connect(&Url::parse(&url).unwrap(), &spec, &opts)
            .await
            .unwrap();
        for i in 0..64 {
            c.send(&sample(i)).await.unwrap();
        }
        c.wait().await.unwrap();
        assert_eq!(
            c.messages_sent(),
            1,
            "64 waiting payloads go out as one message"
        );
        c.close().await.unwrap();

        // A per-message cap on the client splits them.
        let u = common::with_query(&Url::parse(&url).unwrap(), "max_payloads=10");
        let mut c = GrpcClient::connect(&u, &spec, &opts).await.unwrap();
        assert_eq!(c.max_payloads_per_message(), 10);
        for i in 64..128 {
            c.send(&sample(i)).await.unwrap();
        }
        c.wait().await.unwrap();
        assert_eq!(c.messages_sent(), 7);
        c.close().await.unwrap();

        server.shutdown().await.unwrap();
        let got = drain(&server).await;
        let want: Vec<Vec<u8>> = (0..128).map(|i| sample(i).to_vec()).collect();
        assert_eq!(got, want);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keeps_at_most_max_inflight_unacknowledged() {
    use echo_core::Client;
    bounded(60, async {
        let spec = Spec::bytes(32).unwrap();
        // A ring of 2 x 2 samples and one queued chunk: the server soon stops
        // acknowledging while nobody consumes.
        let server = Server::builder(spec.clone())
            .batch_size(2)
            .num_buffers(2)
            .queue_size(1)
            .registry(echo_grpc::registry())
            .build()
            .unwrap();
        let url = server.listen("grpc://127.0.0.1:0").await.unwrap();
        let opts = ClientOptions {
            max_inflight: 3,
            ..ClientOptions::default()
        };
        let mut c = GrpcClient::connect(&Url::parse(&url).unwrap(), &spec, &opts)
            .await
            .unwrap();
        let sender = tokio::spawn(async move {
            for i in 0..40u8 {
                c.send(&[i; 32]).await?;
                let s = c.stats();
                assert!(s.sent - s.acked <= 3, "{s:?}");
            }
            c.wait().await?;
            c.close().await?;
            Ok::<_, Error>(c.stats())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !sender.is_finished(),
            "the client went on although nothing was consumed"
        );
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while n < 40 {
                    n += server.next_batch().await.unwrap().len();
                }
                n
            })
        };
        let stats = sender.await.unwrap().unwrap();
        assert_eq!(stats.acked, 40);
        assert_eq!(consumer.await.unwrap(), 40);
        server.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_connection_closed_when_the_server_goes_away() {
    use echo_core::Client;
    bounded(60, async {
        let spec = Spec::bytes(8).unwrap();

        // Graceful shutdown.
        let server = new_server(spec.clone(), 2);
        let url = server.listen("grpc://127.0.0.1:0").await.unwrap();
        let mut c =
            GrpcClient::connect(&Url::parse(&url).unwrap(), &spec, &ClientOptions::default())
                .await
                .unwrap();
        c.send(&[1; 8]).await.unwrap();
        c.wait().await.unwrap();
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { drain(&server).await })
        };
        server.shutdown().await.unwrap();
        let e = loop {
            if let Err(e) = c.send(&[2; 8]).await {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(e.is_closed(), "{e}");
        assert!(c
            .wait()
            .await
            .map_err(|e| e.is_closed())
            .err()
            .unwrap_or(true));
        c.close().await.unwrap();
        c.close().await.unwrap();
        assert!(c.send(&[3; 8]).await.unwrap_err().is_closed());
        assert_eq!(consumer.await.unwrap()[0], vec![1; 8]);

        // The server's runtime vanishes without any shutdown.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let spec2 = spec.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let server = rt.block_on(async {
                let s = new_server(spec2, 2);
                let url = s.listen("grpc://127.0.0.1:0").await.unwrap();
                tx.send(url).unwrap();
                s
            });
            let _ = stop_rx.recv();
            drop(rt);
            drop(server);
        });
        let url = rx.recv().unwrap();
        let mut c =
            GrpcClient::connect(&Url::parse(&url).unwrap(), &spec, &ClientOptions::default())
                .await
                .unwrap();
        c.send(&[5; 8]).await.unwrap();
        stop_tx.send(()).unwrap();
        thread.join().unwrap();
        let e = loop {
            if let Err(e) = c.send(&[6; 8]).await {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(e.is_closed(), "{e}");
        c.close().await.unwrap();
    })
    .await
}

#[test]
fn registry_has_both_schemes() {
    let r = echo_grpc::registry();
    assert_eq!(r.schemes(), ["grpc", "grpcs", "mem"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_the_connection_limit_is_unavailable() {
    use echo_core::Client;
    bounded(60, async {
        let spec = Spec::bytes(8).unwrap();
        let server = Server::builder(spec.clone())
            .batch_size(2)
            .max_connections(1)
            .registry(echo_grpc::registry())
            .build()
            .unwrap();
        let url = Url::parse(&server.listen("grpc://127.0.0.1:0").await.unwrap()).unwrap();
        let opts = ClientOptions::default();
        let mut first = GrpcClient::connect(&url, &spec, &opts).await.unwrap();
        let e = GrpcClient::connect(&url, &spec, &opts).await.unwrap_err();
        assert!(e.is_closed(), "{e}");
        assert!(
            e.to_string().contains("Unavailable") && e.to_string().contains("connection limit"),
            "{e}"
        );
        // The first client is unaffected, and its slot is free again once it closed.
        first.send(&[9; 8]).await.unwrap();
        first.wait().await.unwrap();
        first.close().await.unwrap();
        let mut again = None;
        for _ in 0..100 {
            match GrpcClient::connect(&url, &spec, &opts).await {
                Ok(c) => {
                    again = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut again = again.expect("the slot was freed");
        again.send(&[10; 8]).await.unwrap();
        again.wait().await.unwrap();
        again.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(drain(&server).await, vec![vec![9; 8], vec![10; 8]]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_without_a_stream_are_bounded_too() {
    use echo_core::Client;
    use tokio::io::AsyncReadExt;
    bounded(60, async {
        let spec = Spec::bytes(8).unwrap();
        let server = Server::builder(spec.clone())
            .batch_size(1)
            .max_connections(2)
            .registry(echo_grpc::registry())
            .build()
            .unwrap();
        let url = Url::parse(&server.listen("grpc://127.0.0.1:0").await.unwrap()).unwrap();
        let addr = format!("127.0.0.1:{}", url.port().unwrap());
        // Twice max_connections silent TCP connections (no HTTP/2 preface) are
        // held open...
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        // ...the next one is closed as soon as it is accepted...
        let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 64];
        match extra.read(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("a connection over the limit was served: {:?}", &buf[..n]),
        }
        let refused = server.metrics().transports["grpc"].connections_refused;
        assert!(refused >= 1, "refusals counted: {refused}");
        // ...while one within the limit is served: it got the server's HTTP/2
        // SETTINGS frame.
        let mut held = [0u8; 64];
        let n = silent[0].read(&mut held).await.unwrap();
        assert!(n > 0, "a connection within the limit was closed");
        // Once the silent peers leave, well-behaved clients are served.
        drop(silent);
        let opts = ClientOptions::default();
        let mut client = None;
        for _ in 0..100 {
            match GrpcClient::connect(&url, &spec, &opts).await {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut client = client.expect("served once the silent peers left");
        client.send(&[7; 8]).await.unwrap();
        client.wait().await.unwrap();
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(drain(&server).await, vec![vec![7; 8]]);
    })
    .await
}

//! Certificates and TLS: pinned self-signed certificates, given certificate
//! files, and a clear error for each way the TLS handshake can fail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use echo_core::{Client, ClientOptions, Error, Registry, Server, Spec};
use echo_quic::quinn;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn spec() -> Spec {
    Spec::from_json(r#"{"x": {"shape": [4], "dtype": "float32"}}"#).unwrap()
}

fn registry() -> Registry {
    let mut r = Registry::new();
    echo_quic::register(&mut r).unwrap();
    r
}

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn server(url: &str) -> (Server, String) {
    let server = Server::builder(spec())
        .batch_size(2)
        .registry(registry())
        .build()
        .unwrap();
    let url = server.listen(url).await.unwrap();
    (server, url)
}

/// `quic://ADDR?ca=...` of a listener URL, with its query replaced by `query`.
fn with_query(url: &str, query: &str) -> String {
    let mut u = echo_core::Url::parse(url).unwrap();
    u.set_query(Some(query));
    u.to_string()
}

fn enc(p: &Path) -> String {
    echo_core::Url::parse("x://h/")
        .unwrap()
        .query_pairs_mut()
        .append_pair("p", &p.to_string_lossy())
        .finish()
        .query()
        .unwrap()
        .trim_start_matches("p=")
        .to_string()
}

async fn round_trip(server: &Server, client: &mut Box<dyn Client>) {
    for i in 0..2u8 {
        client.send(&[i; 16]).await.unwrap();
    }
    client.wait().await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), server.next_batch())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.leaf(0).bytes()[..16], [0u8; 16]);
    assert_eq!(batch.leaf(0).bytes()[16..], [1u8; 16]);
}

async fn connect_err(url: &str) -> Error {
    match registry().connect(url, &spec(), &options()).await {
        Ok(_) => panic!("connecting to {url} should fail"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn generated_certificate_is_written_reported_and_trusted() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server.pem");
        let (server, url) = server(&format!("quic://127.0.0.1:0?cert_out={}", enc(&cert))).await;
        let text = std::fs::read_to_string(&cert).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        let info = &server.listeners()[0];
        assert_eq!(
            info.details,
            vec![("cert".to_string(), cert.to_string_lossy().into_owned())]
        );
        assert!(
            url.contains("ca="),
            "listener URL names its certificate: {url}"
        );
        // The listener's URL works as is, and so do the names the certificate carries.
        let mut client = registry().connect(&url, &spec(), &options()).await.unwrap();
        round_trip(&server, &mut client).await;
        client.close().await.unwrap();
        let port = echo_core::Url::parse(&url).unwrap().port().unwrap();
        let by_name = format!("quic://localhost:{port}?ca={}", enc(&cert));
        let mut client = registry()
            .connect(&by_name, &spec(), &options())
            .await
            .unwrap();
        round_trip(&server, &mut client).await;
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert!(cert.exists(), "a cert_out file given by the user stays");
        // Both ends built their configs with an explicit provider: nothing
        // installed, or needed, a process-wide default.
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    })
    .await;
}

#[tokio::test]
async fn default_certificate_path_is_in_temp_dir_and_removed_at_shutdown() {
    bounded(async {
        let (server, _url) = server("quic://127.0.0.1:0").await;
        let path = server.listeners()[0].details[0].1.clone();
        assert!(Path::new(&path).starts_with(std::env::temp_dir()), "{path}");
        assert!(Path::new(&path).exists());
        server.shutdown().await.unwrap();
        assert!(!Path::new(&path).exists(), "{path} left behind");
    })
    .await;
}

#[tokio::test]
async fn another_servers_certificate_is_not_trusted() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        let (server_a, url_a) = server(&format!("quic://127.0.0.1:0?cert_out={}", enc(&a))).await;
        let (server_b, _) = server(&format!("quic://127.0.0.1:0?cert_out={}", enc(&b))).await;
        let e = connect_err(&with_query(&url_a, &format!("ca={}", enc(&b)))).await;
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, Error::Tls(_)), "{e:?}");
        assert!(
            msg.contains("not trusted") && msg.contains("b.pem"),
            "{msg}"
        );
        // The server is unharmed.
        let mut client = registry()
            .connect(&url_a, &spec(), &options())
            .await
            .unwrap();
        round_trip(&server_a, &mut client).await;
        client.close().await.unwrap();
        server_a.shutdown().await.unwrap();
        server_b.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn wrong_server_name_is_named() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let (server, url) = server(&format!("quic://127.0.0.1:0?cert_out={}", enc(&cert))).await;
        let e = connect_err(&with_query(
            &url,
            &format!("ca={}&server_name=learner.example", enc(&cert)),
        ))
        .await;
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, Error::Tls(_)), "{e:?}");
        assert!(
            msg.contains("not valid for server name \"learner.example\""),
            "{msg}"
        );
        // With names= the generated certificate carries that name.
        let named = dir.path().join("named.pem");
        let (server2, url2) = server_with_names(&named).await;
        let mut client = registry()
            .connect(
                &with_query(
                    &url2,
                    &format!("ca={}&server_name=learner.example", enc(&named)),
                ),
                &spec(),
                &options(),
            )
            .await
            .unwrap();
        round_trip(&server2, &mut client).await;
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        server2.shutdown().await.unwrap();
    })
    .await;
}

async fn server_with_names(cert: &Path) -> (Server, String) {
    server(&format!(
        "quic://127.0.0.1:0?cert_out={}&names=learner.example",
        enc(cert)
    ))
    .await
}

fn foreign_cert(
    dir: &Path,
) -> (
    std::path::PathBuf,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".into()])
        .unwrap();
    let path = dir.join("foreign.pem");
    std::fs::write(&path, ck.cert.pem()).unwrap();
    std::fs::write(dir.join("foreign.key"), ck.signing_key.serialize_pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    (path, ck.cert.der().clone(), key)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn server_speaking_another_alpn_is_reported() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, cert, key) = foreign_cert(dir.path());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accepting = {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                if let Some(incoming) = endpoint.accept().await {
                    let _ = incoming.await;
                }
            })
        };
        let e = connect_err(&format!("quic://{addr}?ca={}", enc(&path))).await;
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, Error::Tls(_)), "{e:?}");
        assert!(
            msg.contains("ALPN mismatch") && msg.contains("echo/1"),
            "{msg}"
        );
        accepting.abort();
        endpoint.close(0u32.into(), b"");
    })
    .await;
}

#[tokio::test]
async fn client_speaking_another_alpn_is_refused_and_others_still_served() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let (server, url) = server(&format!("quic://127.0.0.1:0?cert_out={}", enc(&cert))).await;
        let addr: std::net::SocketAddr = {
            let u = echo_core::Url::parse(&url).unwrap();
            format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
                .parse()
                .unwrap()
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in echo_quic::load_certs(&cert).unwrap() {
            roots.add(c).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let r = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr,
                "localhost",
            )
            .unwrap()
            .await;
        let e = r.expect_err("a client without ALPN echo/1 is refused");
        assert!(
            matches!(&e, quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::crypto(120)),
            "expected no_application_protocol, got {e}"
        );
        let mut client = registry().connect(&url, &spec(), &options()).await.unwrap();
        round_trip(&server, &mut client).await;
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(server.metrics().transports["quic"].connections_refused, 1);
    })
    .await;
}

#[tokio::test]
async fn given_certificate_and_key_files_are_served() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = foreign_cert(dir.path());
        let key = dir.path().join("foreign.key");
        let (server, url) = server(&format!(
            "quic://127.0.0.1:0?cert={}&key={}",
            enc(&cert),
            enc(&key)
        ))
        .await;
        assert_eq!(server.listeners()[0].details[0].1, cert.to_string_lossy());
        let mut client = registry().connect(&url, &spec(), &options()).await.unwrap();
        round_trip(&server, &mut client).await;
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
        assert!(cert.exists(), "a given certificate is never removed");
    })
    .await;
}

#[tokio::test]
async fn bad_configuration_gets_clear_errors() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = foreign_cert(dir.path());
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let s = Server::builder(spec())
            .registry(registry())
            .build()
            .unwrap();
        let bind_err = |url: String| {
            let s = s.clone();
            async move { s.listen(&url).await.unwrap_err().to_string() }
        };
        let msg = bind_err(format!("quic://127.0.0.1:0?cert={}", enc(&cert))).await;
        assert!(msg.contains("give both cert=PATH and key=PATH"), "{msg}");
        let msg = bind_err(format!(
            "quic://127.0.0.1:0?cert={}&key={}",
            enc(&garbage),
            enc(&garbage)
        ))
        .await;
        assert!(
            msg.contains("holds no PEM certificate") && msg.contains("garbage.pem"),
            "{msg}"
        );
        let msg = bind_err(format!(
            "quic://127.0.0.1:0?cert={}&key={}",
            enc(&cert),
            enc(&garbage)
        ))
        .await;
        assert!(msg.contains("no usable PEM private key"), "{msg}");
        let msg = bind_err(format!(
            "quic://127.0.0.1:0?cert_out={}",
            enc(&dir.path().join("no-such-dir").join("c.pem"))
        ))
        .await;
        assert!(
            msg.contains("cannot write the server certificate") && msg.contains("no-such-dir"),
            "{msg}"
        );
        let msg = bind_err("quic://127.0.0.1:0?max_streams=0".into()).await;
        assert!(
            msg.contains("max_streams must be between 1 and 1024, got 0"),
            "{msg}"
        );
        let msg = bind_err("quic://127.0.0.1:0?stream_window=10".into()).await;
        assert!(msg.contains("stream_window must be between"), "{msg}");
        let msg = bind_err("quic://127.0.0.1:0?cc=vegas".into()).await;
        assert!(msg.contains("expected cubic, bbr or newreno"), "{msg}");
        let msg = bind_err("quic://127.0.0.1".into()).await;
        assert!(msg.contains("expected a port"), "{msg}");

        let (server, url) = server(&format!(
            "quic://127.0.0.1:0?cert_out={}",
            enc(&dir.path().join("s.pem"))
        ))
        .await;
        let bare = with_query(&url, "");
        let e = connect_err(bare.trim_end_matches('?')).await;
        assert!(e.to_string().contains("need ?ca=PATH"), "{e}");
        let e = connect_err(&with_query(
            &url,
            &format!("ca={}", enc(&dir.path().join("missing.pem"))),
        ))
        .await;
        assert!(
            e.to_string().contains("cannot read certificate file"),
            "{e}"
        );
        let e = connect_err(&with_query(
            &url,
            &format!("ca={}&server_name=a%20b", enc(&cert)),
        ))
        .await;
        assert!(
            e.to_string().contains("not a DNS name or IP address"),
            "{e}"
        );
        let e = registry()
            .connect(
                &format!("{url}&streams=4"),
                &spec(),
                &ClientOptions {
                    max_inflight: 2,
                    ..options()
                },
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("streams=4 needs max_inflight of at least 4"),
            "{e}"
        );
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

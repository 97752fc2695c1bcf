//! Helpers shared by the gRPC tests: certificates, kit registries, raw clients.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use echo_core::{async_trait, Client, ClientFactory, ClientOptions, Registry, Result, Spec, Url};
use echo_grpc::{api_client, EchoApi, GrpcClientFactory, GrpcTransportFactory};

/// A self-signed certificate and its key, written as PEM files in a temp dir.
#[derive(Debug)]
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed certificate for `names` (DNS names or IP addresses).
pub fn certs(names: &[&str]) -> Certs {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("rcgen makes a certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Certs { dir, cert, key }
}

/// Connects `GrpcClientFactory` with extra query parameters appended to the URL
/// the server reports (which never carries client-side options).
#[derive(Debug)]
pub struct WithParams(pub String);

#[async_trait]
impl ClientFactory for WithParams {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        GrpcClientFactory
            .connect(&with_query(url, &self.0), spec, options)
            .await
    }
}

/// `url` with `query` (may be empty) as its query string.
pub fn with_query(url: &Url, query: &str) -> Url {
    let mut u = url.clone();
    if !query.is_empty() {
        u.set_query(Some(query));
    }
    u
}

/// A registry binding `scheme` with the real factory and connecting with `client_params`.
pub fn registry(scheme: &str, client_params: &str) -> Registry {
    let mut r = Registry::new();
    r.register(
        scheme,
        Arc::new(GrpcTransportFactory),
        Arc::new(WithParams(client_params.to_string())),
    )
    .unwrap();
    r
}

/// The raw generated client for `url` plus `query`.
pub async fn raw(url: &str, query: &str) -> EchoApi {
    let url = with_query(&Url::parse(url).unwrap(), query);
    api_client(&url, Duration::from_secs(10)).await.unwrap()
}

/// Runs `f` with a limit, failing the test when it takes too long.
pub async fn bounded<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

//! The transport conformance kit, over `tcp://` and `unix://`.

use std::sync::atomic::{AtomicU64, Ordering};

use echo_core::testkit::{self, Conformance};
use echo_core::transport::host_port;
use echo_core::{async_trait, Registry, Result, Spec};
use tokio::net::{TcpStream, UnixStream};

struct Tcp;

#[async_trait]
impl Conformance for Tcp {
    fn registry(&self) -> Registry {
        echo_tcp::registry()
    }

    fn bind_url(&self) -> String {
        "tcp://127.0.0.1:0".into()
    }

    async fn send_then_abort(
        &self,
        url: &str,
        _spec: &Spec,
        whole: &[u8],
        partial: &[u8],
    ) -> Result<()> {
        let (host, port) = host_port(&echo_core::registry::parse_url(url)?)?;
        let (r, w) = TcpStream::connect((host.as_str(), port))
            .await?
            .into_split();
        testkit::stream_send_then_abort(r, w, false, whole, partial).await
    }
}

struct Unix {
    dir: tempfile::TempDir,
    n: AtomicU64,
}

#[async_trait]
impl Conformance for Unix {
    fn registry(&self) -> Registry {
        echo_tcp::registry()
    }

    fn bind_url(&self) -> String {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        format!("unix://{}/kit-{n}.sock", self.dir.path().display())
    }

    async fn send_then_abort(
        &self,
        url: &str,
        _spec: &Spec,
        whole: &[u8],
        partial: &[u8],
    ) -> Result<()> {
        let url = echo_core::registry::parse_url(url)?;
        let path = url.to_file_path().expect("a socket path");
        let (r, w) = UnixStream::connect(path).await?.into_split();
        testkit::stream_send_then_abort(r, w, false, whole, partial).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_passes_the_conformance_kit() {
    testkit::run_all(&Tcp, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_passes_the_conformance_kit() {
    let kit = Unix {
        dir: tempfile::tempdir().unwrap(),
        n: AtomicU64::new(0),
    };
    testkit::run_all(&kit, true).await.unwrap();
}

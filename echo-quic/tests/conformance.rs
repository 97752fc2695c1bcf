//! The transport conformance kit on `quic://`, with one stream per client (order
//! kept) and with four (order kept per stream only).

use std::sync::Arc;
use std::time::Duration;

use echo_core::testkit::{self, Conformance};
use echo_core::{async_trait, Registry, Result, Spec};
use echo_quic::{raw_connection, QuicClientFactory, QuicTransportFactory};

struct Quic {
    streams: usize,
    aborts: std::sync::atomic::AtomicU32,
}

impl Quic {
    fn new(streams: usize) -> Self {
        Quic {
            streams,
            aborts: Default::default(),
        }
    }
}

#[async_trait]
impl Conformance for Quic {
    fn registry(&self) -> Registry {
        let mut r = Registry::new();
        r.register(
            "quic",
            Arc::new(QuicTransportFactory),
            Arc::new(QuicClientFactory::with_streams(self.streams)),
        )
        .unwrap();
        r
    }

    fn bind_url(&self) -> String {
        "quic://127.0.0.1:0".into()
    }

    async fn send_then_abort(
        &self,
        url: &str,
        _spec: &Spec,
        whole: &[u8],
        partial: &[u8],
    ) -> Result<()> {
        let (endpoint, conn) = raw_connection(url, Duration::from_secs(10)).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| echo_core::Error::closed(format!("cannot open a stream: {e}")))?;
        testkit::stream_send_then_abort(&mut recv, &mut send, true, whole, partial).await?;
        // Vary how the peer goes away: reset the stream, or close the connection.
        let n = self
            .aborts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 2 == 0 {
            let _ = send.reset(7u32.into());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        conn.close(9u32.into(), b"abort");
        drop(endpoint);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_one_stream_passes_the_kit_in_order() {
    testkit::run_all(&Quic::new(1), true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_four_streams_pass_the_kit() {
    testkit::run_all(&Quic::new(4), false).await.unwrap();
}

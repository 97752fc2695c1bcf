//! The transport conformance kit over grpc:// and grpcs:// (with a bearer token).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use echo_core::testkit::{self, Conformance};
use echo_core::{async_trait, Error, Registry, Result, Spec};
use echo_grpc::proto::PushRequest;
use futures::StreamExt;

struct Kit {
    scheme: &'static str,
    server_params: String,
    client_params: String,
    aborts: AtomicUsize,
}

#[async_trait]
impl Conformance for Kit {
    fn registry(&self) -> Registry {
        common::registry(self.scheme, &self.client_params)
    }

    fn bind_url(&self) -> String {
        format!("{}://127.0.0.1:0{}", self.scheme, self.server_params)
    }

    /// Alternates two ways to misbehave on a raw Push stream: a message holding a
    /// truncated payload (refused with INVALID_ARGUMENT), and a stream dropped
    /// mid-way after its whole payloads were acknowledged.
    async fn send_then_abort(
        &self,
        url: &str,
        spec: &Spec,
        whole: &[u8],
        partial: &[u8],
    ) -> Result<()> {
        let whole_n = (whole.len() / spec.payload_size()) as u64;
        let mut api = common::raw(url, &self.client_params).await;
        let first = PushRequest {
            payloads: Bytes::copy_from_slice(whole),
        };
        if self.aborts.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
            let second = PushRequest {
                payloads: Bytes::copy_from_slice(partial),
            };
            let mut replies = api
                .push(futures::stream::iter([first, second]))
                .await
                .map_err(|s| Error::Other(format!("push: {s}")))?
                .into_inner();
            let mut acked = 0;
            loop {
                match replies.message().await {
                    Ok(Some(r)) => acked = r.acked,
                    Ok(None) => return Err(Error::Other("truncated payload was accepted".into())),
                    Err(s) if s.code() == tonic::Code::InvalidArgument => break,
                    Err(s) => {
                        return Err(Error::Other(format!("expected INVALID_ARGUMENT, got {s}")))
                    }
                }
            }
            if acked != whole_n {
                return Err(Error::Other(format!(
                    "{acked} of {whole_n} whole payloads acked"
                )));
            }
        } else {
            let requests = futures::stream::iter([first]).chain(futures::stream::pending());
            let mut replies = api
                .push(requests)
                .await
                .map_err(|s| Error::Other(format!("push: {s}")))?
                .into_inner();
            let r = replies
                .message()
                .await
                .map_err(|s| Error::Other(format!("ack: {s}")))?;
            if r.map(|r| r.acked) != Some(whole_n) {
                return Err(Error::Other("whole payloads were not acknowledged".into()));
            }
            // Dropping the stream and the channel resets the stream mid-way.
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_the_kit() {
    let kit = Kit {
        scheme: "grpc",
        server_params: String::new(),
        client_params: String::new(),
        aborts: AtomicUsize::new(0),
    };
    testkit::run_all(&kit, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_with_token_passes_the_kit() {
    let certs = common::certs(&["localhost"]);
    let kit = Kit {
        scheme: "grpcs",
        server_params: format!(
            "?cert={}&key={}&token=kit-secret",
            certs.cert.display(),
            certs.key.display()
        ),
        client_params: format!(
            "ca={}&domain=localhost&token=kit-secret",
            certs.cert.display()
        ),
        aborts: AtomicUsize::new(0),
    };
    testkit::run_all(&kit, true).await.unwrap();
}

//! The client side: [`GrpcClient`], one Push stream on its own HTTP/2 connection.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use echo_core::spec::{WireLeaf, WireSpec};
use echo_core::transport::host_port;
use echo_core::wire::VERSION;
use echo_core::{
    Client, ClientFactory, ClientOptions, ClientStats, Error, InflightWindow, LatencyHistogram,
    Result, Spec, Url,
};
use futures::Stream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

use crate::config::{redacted, ClientUrlOptions};
use crate::proto::echo_client::EchoClient;
use crate::proto::{GetSpecRequest, PushReply, PushRequest, SpecReply};
use crate::server::MESSAGE_OVERHEAD;
use crate::tls::{self, ClientCheck};

/// Connects `grpc://` and `grpcs://` clients (see the crate docs for the URL options).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClientFactory;

#[async_trait]
impl ClientFactory for GrpcClientFactory {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        Ok(Box::new(GrpcClient::connect(url, spec, options).await?))
    }
}

/// A tonic interceptor adding `authorization: Bearer <token>` to every call when a
/// token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BearerToken")
            .field(&self.0.as_ref().map(|_| "***"))
            .finish()
    }
}

impl BearerToken {
    /// An interceptor sending `token`; `None` sends nothing.
    pub fn new(token: Option<&str>) -> Result<BearerToken> {
        match token {
            None => Ok(BearerToken(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| {
                    Error::Config(
                        "the token is not a valid HTTP header value; expected visible ASCII".into(),
                    )
                }),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The generated tonic client with the URL's token attached, as [`api_client`] returns it.
pub type EchoApi = EchoClient<InterceptedService<Channel, BearerToken>>;

/// Payloads handed to `send` and not yet taken by the request stream.
#[derive(Debug, Default)]
struct Outbox {
    state: Mutex<OutState>,
    /// Signalled when the request stream ended (drained after close, or dropped).
    finished: Notify,
    /// Messages the request stream produced.
    messages: AtomicU64,
}

#[derive(Debug, Default)]
struct OutState {
    buf: BytesMut,
    /// No more payloads: end the stream once `buf` is empty.
    closing: bool,
    /// The request stream ended; nothing more can be sent.
    finished: bool,
    waker: Option<Waker>,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the stream: with `discard`, payloads not yet taken are dropped.
    fn close(&self, discard: bool) {
        let mut st = self.lock();
        st.closing = true;
        if discard {
            st.buf.clear();
        }
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }
}

/// The request side of the Push stream: each poll takes every payload waiting
/// (up to the per-message limit) as one message.
struct OutStream {
    outbox: Arc<Outbox>,
    max_bytes: usize,
}

impl Stream for OutStream {
    type Item = PushRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PushRequest>> {
        let mut st = self.outbox.lock();
        if !st.buf.is_empty() {
            let n = st.buf.len().min(self.max_bytes);
            let payloads = st.buf.split_to(n).freeze();
            self.outbox.messages.fetch_add(1, Relaxed);
            return Poll::Ready(Some(PushRequest { payloads }));
        }
        if st.closing {
            st.finished = true;
            drop(st);
            self.outbox.finished.notify_waiters();
            return Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for OutStream {
    fn drop(&mut self) {
        let mut st = self.outbox.lock();
        st.finished = true;
        st.buf.clear();
        drop(st);
        self.outbox.finished.notify_waiters();
    }
}

/// A client of an echo gRPC server: one `Push` stream on its own HTTP/2
/// connection.
///
/// `send` copies the payload into an outgoing buffer; whenever HTTP/2 is ready
/// for the next message, everything buffered (up to the server's
/// `max_payloads_per_message`) goes out as one message. At most `max_inflight`
/// payloads are unacknowledged. Once the server ends the stream or the
/// connection is lost, `send` and `wait` fail with `ConnectionClosed`.
pub struct GrpcClient {
    peer: String,
    payload_size: usize,
    max_payloads: usize,
    window: Arc<InflightWindow>,
    outbox: Arc<Outbox>,
    reader: Option<JoinHandle<()>>,
    close_timeout: Duration,
    closed: bool,
    _channel: Channel,
}

impl fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcClient")
            .field("peer", &self.peer)
            .field("payload_size", &self.payload_size)
            .field("max_payloads", &self.max_payloads)
            .field("inflight", &self.window.inflight())
            .field("closed", &self.closed)
            .finish()
    }
}

/// An echo error for a failed call.
fn status_error(peer: &str, what: &str, s: &Status) -> Error {
    let msg = format!("{what} on {peer} failed: {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::Aborted => Error::ConnectionClosed(msg),
        _ => Error::Other(msg),
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The spec a `GetSpec` reply describes, checked for consistency.
fn reply_spec(reply: &SpecReply, peer: &str) -> Result<WireSpec> {
    if reply.wire_version != u32::from(VERSION) {
        return Err(Error::Other(format!(
            "{peer} speaks echo wire version {}; this client supports {VERSION}",
            reply.wire_version
        )));
    }
    let got = WireSpec {
        leaves: reply
            .leaves
            .iter()
            .map(|l| WireLeaf {
                itemsize: l.itemsize,
                shape: l.shape.clone(),
            })
            .collect(),
    };
    match got.payload_size() {
        Some(ps) if ps as u64 == reply.payload_size => Ok(got),
        other => Err(Error::Other(format!(
            "{peer}'s spec reply is inconsistent: payload_size {} but its leaves add up to {}",
            reply.payload_size,
            other.map_or("more than fits in memory".to_string(), |p| p.to_string())
        ))),
    }
}

/// The URL's peer name, endpoint and token.
fn endpoint_for(url: &Url, connect_timeout: Duration) -> Result<(String, Endpoint, BearerToken)> {
    let opts = ClientUrlOptions::parse(url)?;
    endpoint_with(url, &opts, connect_timeout)
}

fn endpoint_with(
    url: &Url,
    opts: &ClientUrlOptions,
    connect_timeout: Duration,
) -> Result<(String, Endpoint, BearerToken)> {
    let (host, port) = host_port(url)?;
    let host_in_uri = url.host_str().unwrap_or(&host).to_string();
    let peer = format!("{}://{host_in_uri}:{port}", url.scheme());
    let http = if opts.tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{http}://{host_in_uri}:{port}"))
        .map_err(|e| Error::Url {
            url: redacted(url),
            reason: chain(&e),
        })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let endpoint = match &opts.tls {
        None => endpoint,
        Some(t) => match tls::client_config(t, &host)? {
            ClientCheck::Roots(cfg) => endpoint.tls_config(cfg),
            ClientCheck::Pinned(cfg, verifier) => endpoint.tls_config_with_verifier(cfg, verifier),
        }
        .map_err(|e| Error::Tls(chain(&e)))?,
    };
    Ok((peer, endpoint, BearerToken::new(opts.token.as_deref())?))
}

async fn open_channel(peer: &str, endpoint: &Endpoint) -> Result<Channel> {
    endpoint.connect().await.map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("cannot connect to {peer}: {}", chain(&e)),
        ))
    })
}

/// Connects the generated `echo.v1.Echo` client to `url`, with the same TLS and
/// token options as [`GrpcClient`], below the [`Client`] API: for tools, and for
/// tests that need to misbehave.
pub async fn api_client(url: &Url, connect_timeout: Duration) -> Result<EchoApi> {
    let (peer, endpoint, token) = endpoint_for(url, connect_timeout)?;
    let channel = match timeout(connect_timeout, open_channel(&peer, &endpoint)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::Timeout(format!(
                "connecting to {peer} took over {connect_timeout:?}"
            )))
        }
    };
    Ok(EchoClient::with_interceptor(channel, token).max_decoding_message_size(4 << 20))
}

impl GrpcClient {
    /// Connects to `url` (`grpc://host:port` or `grpcs://host:port?ca=...`), fetches
    /// the server's spec, checks it against `spec` and opens the Push stream.
    pub async fn connect(url: &Url, spec: &Spec, options: &ClientOptions) -> Result<GrpcClient> {
        options.validate()?;
        let opts = ClientUrlOptions::parse(url)?;
        let (peer, endpoint, token) = endpoint_with(url, &opts, options.connect_timeout)?;
        let setup = async {
            let channel = open_channel(&peer, &endpoint).await?;
            let mut api: EchoApi = EchoClient::with_interceptor(channel.clone(), token)
                .max_decoding_message_size(4 << 20);
            let reply = api
                .get_spec(GetSpecRequest {})
                .await
                .map_err(|s| status_error(&peer, "GetSpec", &s))?
                .into_inner();
            reply_spec(&reply, &peer)?.check_matches(&spec.wire())?;
            let server_max = usize::try_from(reply.max_payloads_per_message)
                .unwrap_or(usize::MAX)
                .max(1);
            let max_payloads = opts.max_payloads.unwrap_or(server_max).min(server_max);
            let max_bytes = max_payloads.saturating_mul(spec.payload_size());
            api = api.max_encoding_message_size(max_bytes.saturating_add(MESSAGE_OVERHEAD));
            let outbox = Arc::new(Outbox::default());
            let requests = OutStream {
                outbox: outbox.clone(),
                max_bytes,
            };
            let replies = api
                .push(requests)
                .await
                .map_err(|s| status_error(&peer, "Push", &s))?
                .into_inner();
            Ok::<_, Error>((channel, outbox, replies, max_payloads))
        };
        let (channel, outbox, replies, max_payloads) =
            match timeout(options.connect_timeout, setup).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "connecting to {peer} took over {:?}",
                        options.connect_timeout
                    )))
                }
            };
        let window = Arc::new(InflightWindow::new(options.max_inflight));
        let reader = tokio::spawn(read_acks(
            replies,
            window.clone(),
            outbox.clone(),
            peer.clone(),
        ));
        Ok(GrpcClient {
            peer,
            payload_size: spec.payload_size(),
            max_payloads,
            window,
            outbox,
            reader: Some(reader),
            close_timeout: options.connect_timeout,
            closed: false,
            _channel: channel,
        })
    }

    /// Messages sent so far (each carries one or more payloads).
    pub fn messages_sent(&self) -> u64 {
        self.outbox.messages.load(Relaxed)
    }

    /// Most payloads this client puts in one message.
    pub fn max_payloads_per_message(&self) -> usize {
        self.max_payloads
    }

    /// The in-flight window (for latency histograms).
    pub fn window(&self) -> &InflightWindow {
        &self.window
    }
}

/// Reads cumulative acks until the stream ends; then closes the window (so
/// `send` and `wait` fail with `ConnectionClosed`) and the request stream.
async fn read_acks(
    mut replies: Streaming<PushReply>,
    window: Arc<InflightWindow>,
    outbox: Arc<Outbox>,
    peer: String,
) {
    let mut last = 0u64;
    let reason = loop {
        match replies.message().await {
            Ok(Some(r)) => {
                if r.acked < last {
                    break format!(
                        "{peer} sent a decreasing ack count ({} after {last})",
                        r.acked
                    );
                }
                if let Err(e) = window.ack(r.acked - last) {
                    break format!("{peer}: {e}");
                }
                last = r.acked;
            }
            Ok(None) => break format!("{peer} ended the stream"),
            Err(s) => break format!("{peer} ended the stream: {:?}: {}", s.code(), s.message()),
        }
    };
    window.close(reason);
    outbox.close(true);
}

#[async_trait]
impl Client for GrpcClient {
    fn payload_size(&self) -> usize {
        self.payload_size
    }

    async fn send(&mut self, payload: &[u8]) -> Result<()> {
        if self.closed {
            return Err(Error::closed(format!("client for {} is closed", self.peer)));
        }
        if payload.len() != self.payload_size {
            return Err(Error::PayloadSize {
                expected: self.payload_size,
                got: payload.len(),
            });
        }
        self.window.acquire(1).await?;
        let mut st = self.outbox.lock();
        if st.finished || st.closing {
            drop(st);
            self.window.unsend(1);
            self.window.check_open()?;
            return Err(Error::closed(format!("the stream to {} ended", self.peer)));
        }
        st.buf.extend_from_slice(payload);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        Ok(())
    }

    async fn wait(&mut self) -> Result<()> {
        self.window.wait_all().await
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // Half-close once everything buffered went out, then let the server
        // answer the last acks and end the stream (bounded in time).
        self.outbox.close(false);
        let drained = async {
            loop {
                let notified = self.outbox.finished.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.outbox.lock().finished {
                    break;
                }
                notified.await;
            }
        };
        let _ = timeout(self.close_timeout, drained).await;
        if let Some(mut reader) = self.reader.take() {
            if timeout(self.close_timeout, &mut reader).await.is_err() {
                reader.abort();
            }
        }
        self.window
            .close(format!("client for {} is closed", self.peer));
        Ok(())
    }

    fn stats(&self) -> ClientStats {
        self.window.stats()
    }

    fn latency_histogram(&self) -> LatencyHistogram {
        self.window.latency()
    }
}

impl Drop for GrpcClient {
    fn drop(&mut self) {
        self.outbox.close(false);
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

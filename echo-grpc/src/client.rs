//! The client side: [`GrpcClient`], one Push stream on its own HTTP/2 connection.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use echo_core::spec::{WireLeaf, WireSpec};
use echo_core::transport::host_port;
use echo_core::wire::VERSION;
use echo_core::{
    Client, ClientFactory, ClientOptions, ClientStats, Error, InflightWindow, LatencyHistogram,
    Result, Spec, Url,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::codec::Codec;
use tonic::codegen::Service;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::config::{redacted, ClientUrlOptions};
use crate::proto::echo_client::EchoClient;
use crate::proto::{GetSpecRequest, PushReply, PushRequest, SpecReply};
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
    /// Message buffers for reuse.
    pool: Arc<Pool>,
}

#[derive(Debug, Default)]
struct OutState {
    /// Messages being built: each is [`HEADER_ROOM`] reserved bytes followed by
    /// its payloads; the last one is still open.
    msgs: VecDeque<Vec<u8>>,
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
            st.msgs.clear();
        }
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }
}

/// Room reserved in front of each message in the outbox for its framing: the
/// gRPC prefix (compressed flag, u32 length), the protobuf tag of `payloads`
/// and its length varint (at most 10 bytes).
const HEADER_ROOM: usize = 5 + 1 + 10;

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Writes the framing of a message carrying `n` payload bytes right-aligned into
/// `room`; returns its length.
fn write_header(room: &mut [u8], n: usize) -> usize {
    let proto_len = 1 + varint_len(n as u64) + n;
    let mut hdr = [0u8; HEADER_ROOM];
    hdr[0] = 0; // not compressed
    hdr[1..5].copy_from_slice(&(proto_len as u32).to_be_bytes());
    hdr[5] = 0x0a; // field 1 (payloads), wire type 2 (length-delimited)
    let mut len = 6;
    let mut v = n as u64;
    while v >= 0x80 {
        hdr[len] = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
        len += 1;
    }
    hdr[len] = v as u8;
    len += 1;
    room[HEADER_ROOM - len..].copy_from_slice(&hdr[..len]);
    len
}

/// Message buffers a client reuses: a buffer handed to HTTP/2 comes back here
/// once written, so steady state allocates nothing.
#[derive(Debug, Default)]
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept for reuse per client.
const POOLED: usize = 16;

impl Pool {
    fn get(&self, capacity: usize) -> Vec<u8> {
        let v = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match v {
            Some(mut v) => {
                v.reserve(capacity);
                v
            }
            None => Vec::with_capacity(capacity),
        }
    }
}

/// A framed message lent to HTTP/2; its buffer returns to the pool when dropped.
struct Pooled {
    vec: Vec<u8>,
    start: usize,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.vec);
        v.clear();
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOLED {
            free.push(v);
        }
    }
}

impl OutState {
    /// Appends a payload, opening a new message (of `capacity` bytes, from the
    /// pool) when the open one would exceed `max_bytes` of payloads.
    fn push(&mut self, payload: &[u8], max_bytes: usize, capacity: usize, pool: &Pool) {
        match self.msgs.back_mut() {
            Some(open) if open.len() - HEADER_ROOM + payload.len() <= max_bytes => {
                open.extend_from_slice(payload)
            }
            _ => {
                let mut v = pool.get(capacity.max(HEADER_ROOM + payload.len()));
                v.resize(HEADER_ROOM, 0);
                v.extend_from_slice(payload);
                self.msgs.push_back(v);
            }
        }
    }

    /// The first message, framed, as one buffer (no copy: the framing is written
    /// into its reserved room).
    fn take(&mut self, pool: &Arc<Pool>) -> Option<Bytes> {
        let mut vec = self.msgs.pop_front()?;
        let n = vec.len() - HEADER_ROOM;
        let h = write_header(&mut vec[..HEADER_ROOM], n);
        Some(Bytes::from_owner(Pooled {
            vec,
            start: HEADER_ROOM - h,
            pool: pool.clone(),
        }))
    }
}

/// The request body of the Push stream: gRPC-framed `PushRequest` messages built
/// in place in the outbox, so the payload bytes `send` copied in go to HTTP/2
/// without another copy. Each poll takes the oldest message (all payloads that
/// waited, up to the per-message limit).
struct OutBody {
    outbox: Arc<Outbox>,
}

impl fmt::Debug for Pooled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("len", &(self.vec.len() - self.start))
            .finish()
    }
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut st = self.outbox.lock();
        if let Some(msg) = st.take(&self.outbox.pool) {
            self.outbox.messages.fetch_add(1, Relaxed);
            return Poll::Ready(Some(Ok(http_body::Frame::data(msg))));
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

impl Drop for OutBody {
    fn drop(&mut self) {
        let mut st = self.outbox.lock();
        st.finished = true;
        st.msgs.clear();
        drop(st);
        self.outbox.finished.notify_waiters();
    }
}

/// Opens the Push stream on `channel` with `body` as its request side.
async fn open_push(
    channel: &Channel,
    token: &BearerToken,
    body: OutBody,
    peer: &str,
) -> Result<Streaming<PushReply>> {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/echo.v1.Echo/Push")
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(v) = &token.0 {
        request = request.header(http::header::AUTHORIZATION, v.as_bytes());
    }
    let request = request
        .body(tonic::body::Body::new(body))
        .map_err(|e| Error::Other(format!("building the Push request: {e}")))?;
    let mut channel = channel.clone();
    let lost = |e: &(dyn std::error::Error + 'static)| {
        Error::ConnectionClosed(format!("Push on {peer} failed: {}", chain(e)))
    };
    futures::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| lost(&e))?;
    let response = channel.call(request).await.map_err(|e| lost(&e))?;
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != Code::Ok {
            return Err(status_error(peer, "Push", &status));
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(Error::Other(format!(
            "Push on {peer} failed: HTTP status {}",
            response.status()
        )));
    }
    let status = response.status();
    let decoder = ProstCodec::<PushRequest, PushReply>::default().decoder();
    Ok(Streaming::new_response(
        decoder,
        response.into_body(),
        status,
        None,
        Some(4 << 20),
    ))
}

/// A client of an echo gRPC server: one `Push` stream on its own HTTP/2
/// connection.
///
/// `send` copies the payload into a pooled message buffer (the only copy on this
/// side); whenever HTTP/2 is ready for the next message, everything buffered (up
/// to the server's `max_payloads_per_message`) goes out as one message. At most `max_inflight`
/// payloads are unacknowledged. Once the server ends the stream or the
/// connection is lost, `send` and `wait` fail with `ConnectionClosed`.
pub struct GrpcClient {
    peer: String,
    payload_size: usize,
    max_payloads: usize,
    /// Most payload bytes per message.
    max_bytes: usize,
    /// Capacity of a new message buffer: room for as many payloads as may be
    /// sent before an ack, up to `max_bytes`.
    msg_capacity: usize,
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
        // Some errors already print their sources; do not repeat them.
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!(": {text}"));
        }
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
            let mut api: EchoApi = EchoClient::with_interceptor(channel.clone(), token.clone())
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
            let mut max_payloads = opts.max_payloads.unwrap_or(server_max).min(server_max);
            // Stay within the server's message size limit (when it states one) and
            // gRPC's u32 message length, whatever the payload count says.
            let ps = spec.payload_size();
            let limit = usize::try_from(reply.max_message_bytes)
                .unwrap_or(usize::MAX)
                .min(u32::MAX as usize);
            let limit = if limit == 0 { u32::MAX as usize } else { limit };
            let fits = (limit.saturating_sub(HEADER_ROOM - 5) / ps).max(1);
            max_payloads = max_payloads.min(fits);
            let max_bytes = max_payloads * ps;
            let outbox = Arc::new(Outbox::default());
            let body = OutBody {
                outbox: outbox.clone(),
            };
            let replies = open_push(&channel, &token, body, &peer).await?;
            Ok::<_, Error>((channel, outbox, replies, max_payloads, max_bytes))
        };
        let (channel, outbox, replies, max_payloads, max_bytes) =
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
            max_bytes,
            msg_capacity: HEADER_ROOM
                + max_bytes.min(options.max_inflight.saturating_mul(spec.payload_size())),
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
        echo_core::check_send(self.closed, &self.peer, self.payload_size, payload)?;
        self.window.acquire(1).await?;
        let mut st = self.outbox.lock();
        if st.finished || st.closing {
            drop(st);
            self.window.unsend(1);
            self.window.check_open()?;
            return Err(Error::closed(format!("the stream to {} ended", self.peer)));
        }
        st.push(
            payload,
            self.max_bytes,
            self.msg_capacity,
            &self.outbox.pool,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn framing_matches_prost_and_grpc() {
        let mut st = OutState::default();
        let pool = Arc::new(Pool::default());
        let sizes = [1usize, 127, 128, 300, 16_383, 16_384, 1 << 21];
        for &n in &sizes {
            let payload: Vec<u8> = (0..n).map(|i| (i * 13) as u8).collect();
            // One payload per message: each push opens a new message.
            st.push(&payload, n, 64, &pool);
            let framed = st.take(&pool).unwrap();
            let want = PushRequest {
                payloads: Bytes::from(payload),
            }
            .encode_to_vec();
            assert_eq!(framed[0], 0, "not compressed");
            assert_eq!(
                u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize,
                want.len()
            );
            assert!(framed[5..] == want[..], "n = {n}");
        }
        // Several payloads share a message up to the limit.
        for i in 0..5u8 {
            st.push(&[i; 4], 12, 64, &pool);
        }
        let a = st.take(&pool).unwrap();
        let b = st.take(&pool).unwrap();
        assert!(st.take(&pool).is_none());
        let decode = |m: &Bytes| PushRequest::decode(&m[5..]).unwrap().payloads;
        assert_eq!(&decode(&a)[..], &[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(&decode(&b)[..], &[3, 3, 3, 3, 4, 4, 4, 4]);
        // Buffers come back once HTTP/2 is done with them.
        let before = pool.free.lock().unwrap().len();
        drop((a, b));
        assert_eq!(pool.free.lock().unwrap().len(), before + 2);
    }
}

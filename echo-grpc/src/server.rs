//! The server side: a tonic service feeding the ingress, bound per URL.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use echo_core::stream::Stopper;
use echo_core::transport::host_port;
use echo_core::wire::{PayloadSplitter, VERSION};
use echo_core::{
    Connection, Error, Ingress, Result, ShutdownSignal, Spec, Transport, TransportFactory, Url,
};
use futures::Stream;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{redacted, ServerOptions};
use crate::incoming::incoming;
use crate::proto::echo_server::{Echo, EchoServer};
use crate::proto::{GetSpecRequest, Leaf as ProtoLeaf, PushReply, PushRequest, SpecReply};
use crate::tls;

/// Bytes of protobuf framing around `payloads` in a `PushRequest`: one tag byte
/// and a length varint of at most ten bytes, rounded up.
pub(crate) const MESSAGE_OVERHEAD: usize = 16;

/// Above this many bytes per message, `max_payloads` is refused (one payload per
/// message is always allowed, whatever its size).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Binds `grpc://host:port` and `grpcs://host:port` listeners (see the crate docs
/// for the URL options).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTransportFactory;

/// A bound gRPC listener.
#[derive(Debug)]
pub struct GrpcTransport {
    url: Url,
    details: Vec<(String, String)>,
    stopper: Stopper,
    server: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    streams: Arc<Mutex<JoinSet<()>>>,
}

/// Checks `authorization: Bearer <token>` on every call when a token is set.
#[derive(Clone)]
struct BearerAuth {
    expected: Option<Arc<[u8]>>,
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

/// Compares in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(v) if constant_time_eq(v.as_bytes(), expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong bearer token in the authorization metadata",
            )),
            None => Err(Status::unauthenticated(
                "this server requires a bearer token: send metadata \"authorization: Bearer <token>\"",
            )),
        }
    }
}

/// The `echo.v1.Echo` service.
struct EchoService {
    ingress: Ingress,
    scheme: &'static str,
    spec_reply: SpecReply,
    max_payloads: usize,
    stop: ShutdownSignal,
    streams: Arc<Mutex<JoinSet<()>>>,
}

/// What a Push stream's handler tells its response stream.
#[derive(Debug, Default)]
struct AckState {
    /// Payloads queued so far.
    acked: u64,
    /// Set once the handler ended: `Ok` ends the stream with status OK.
    end: Option<std::result::Result<(), Status>>,
}

fn spec_reply(spec: &Spec, max_payloads: usize) -> SpecReply {
    let leaves = spec
        .leaves()
        .iter()
        .enumerate()
        .map(|(i, l)| ProtoLeaf {
            name: l.name.clone(),
            shape: l.shape.clone(),
            dtype: l.dtype.name().to_string(),
            itemsize: l.dtype.itemsize() as u32,
            nbytes: spec.leaf_bytes(i) as u64,
            offset: spec.leaf_offset(i) as u64,
        })
        .collect();
    SpecReply {
        leaves,
        payload_size: spec.payload_size() as u64,
        wire_version: u32::from(VERSION),
        max_payloads_per_message: max_payloads as u64,
        max_message_bytes: (max_payloads * spec.payload_size() + MESSAGE_OVERHEAD) as u64,
    }
}

/// Checks a message's `payloads` length; returns the number of payloads.
fn check_message(
    len: usize,
    payload_size: usize,
    max: usize,
) -> std::result::Result<usize, Status> {
    if len == 0 || len % payload_size != 0 {
        return Err(Status::invalid_argument(format!(
            "payload size mismatch: expected a positive multiple of the payload size, \
             {payload_size} bytes (at most {max} payloads per message); got {len} bytes"
        )));
    }
    let n = len / payload_size;
    if n > max {
        return Err(Status::invalid_argument(format!(
            "too many payloads in one message: expected at most {max} ({} bytes); got {n} ({len} bytes)",
            max * payload_size
        )));
    }
    Ok(n)
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down")
}

/// Reads one Push stream: checks each message, queues its payloads without
/// copying, and publishes the cumulative ack count.
async fn serve_push(
    mut stream: Streaming<PushRequest>,
    mut conn: Connection,
    acks: watch::Sender<AckState>,
    mut stop: ShutdownSignal,
    max_payloads: usize,
) {
    let payload_size = conn.spec().payload_size();
    let mut server_stop = conn.shutdown_signal();
    let mut acked = 0u64;
    let end = loop {
        let msg = tokio::select! {
            biased;
            _ = server_stop.wait_or(&mut stop) => break Err(shutting_down()),
            m = stream.message() => m,
        };
        let payloads = match msg {
            Ok(Some(m)) => m.payloads,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        if let Err(status) = check_message(payloads.len(), payload_size, max_payloads) {
            break Err(status);
        }
        let pushed = tokio::select! {
            biased;
            _ = server_stop.wait_or(&mut stop) => break Err(shutting_down()),
            r = conn.push_bytes(payloads) => r,
        };
        match pushed {
            Ok(n) => {
                acked += n as u64;
                acks.send_modify(|s| s.acked = acked);
            }
            Err(Error::Shutdown) => break Err(shutting_down()),
            Err(e) => break Err(Status::internal(e.to_string())),
        }
    };
    match &end {
        Ok(()) => tracing::debug!("grpc {}: stream ended after {acked} payloads", conn.peer()),
        Err(s) => tracing::debug!(
            "grpc {}: stream ended after {acked} payloads: {:?}: {}",
            conn.peer(),
            s.code(),
            s.message()
        ),
    }
    // Close the ingress connection before the client can see the end.
    drop(conn);
    acks.send_modify(|s| s.end = Some(end));
}

type AckStream =
    Pin<Box<dyn Stream<Item = std::result::Result<PushReply, Status>> + Send + 'static>>;

/// The response side of a Push stream: the latest cumulative count whenever it
/// grew (several pushes coalesce into one reply), then the handler's end status.
fn ack_stream(rx: watch::Receiver<AckState>) -> AckStream {
    Box::pin(futures::stream::unfold(
        (rx, 0u64, false),
        |(mut rx, sent, done)| async move {
            if done {
                return None;
            }
            loop {
                let (acked, end) = {
                    let st = rx.borrow_and_update();
                    (st.acked, st.end.clone())
                };
                if acked > sent {
                    return Some((Ok(PushReply { acked }), (rx, acked, false)));
                }
                match end {
                    Some(Ok(())) => return None,
                    Some(Err(status)) => return Some((Err(status), (rx, sent, true))),
                    None => {}
                }
                if rx.changed().await.is_err() {
                    let status = Status::internal("the stream's handler ended unexpectedly");
                    return Some((Err(status), (rx, sent, true)));
                }
            }
        },
    ))
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn get_spec(
        &self,
        _request: Request<GetSpecRequest>,
    ) -> std::result::Result<Response<SpecReply>, Status> {
        Ok(Response::new(self.spec_reply.clone()))
    }

    type PushStream = AckStream;

    async fn push(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> std::result::Result<Response<AckStream>, Status> {
        if self.stop.is_set() {
            return Err(shutting_down());
        }
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown peer".into());
        let conn = self.ingress.open(self.scheme, peer).map_err(|e| match e {
            Error::Shutdown => shutting_down(),
            e => Status::unavailable(e.to_string()),
        })?;
        let (tx, rx) = watch::channel(AckState::default());
        let task = serve_push(
            request.into_inner(),
            conn,
            tx,
            self.stop.clone(),
            self.max_payloads,
        );
        {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            while streams.try_join_next().is_some() {}
            streams.spawn(task);
        }
        Ok(Response::new(ack_stream(rx)))
    }
}

/// TCP connections a `grpc://` listener keeps open at once.
pub(crate) fn tcp_connection_limit(max_connections: usize) -> usize {
    max_connections.saturating_mul(2).max(1)
}

fn scheme_of(url: &Url) -> &'static str {
    if url.scheme() == "grpcs" {
        "grpcs"
    } else {
        "grpc"
    }
}

fn tonic_error(what: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = format!("{what}: {e}");
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

#[async_trait]
impl TransportFactory for GrpcTransportFactory {
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>> {
        let opts = ServerOptions::parse(url)?;
        let scheme = scheme_of(url);
        let payload_size = ingress.payload_size();
        let max_payloads = opts.max_payloads.unwrap_or_else(|| {
            PayloadSplitter::payloads_per_chunk(payload_size, ingress.limits().chunk_bytes)
        });
        let message_bytes = max_payloads
            .checked_mul(payload_size)
            .filter(|&b| max_payloads == 1 || b <= MAX_MESSAGE_BYTES)
            .ok_or_else(|| Error::Url {
                url: redacted(url),
                reason: format!(
                    "max_payloads={max_payloads} makes messages of over {} MiB with {payload_size}-byte payloads; expected at most {}",
                    MAX_MESSAGE_BYTES >> 20,
                    (MAX_MESSAGE_BYTES / payload_size).max(1)
                ),
            })?;
        let max_message = message_bytes + MESSAGE_OVERHEAD;

        let tls_config = opts.tls.as_ref().map(tls::server_config).transpose()?;
        let (host, port) = host_port(url)?;
        let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await?;
        let addr = listener.local_addr()?;
        let local = Url::parse(&format!("{scheme}://{addr}")).map_err(|e| Error::Url {
            url: redacted(url),
            reason: format!("bound address {addr} does not make a URL: {e}"),
        })?;

        let stream_window = opts.stream_window(max_message);
        let conn_window = opts.connection_window(stream_window);
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(stream_window)
            .initial_connection_window_size(conn_window)
            .max_frame_size(opts.frame)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(cfg) = tls_config {
            builder = builder
                .tls_config(cfg.timeout(ingress.limits().handshake_timeout))
                .map_err(|e| Error::Tls(tonic_error("TLS setup", &e)))?;
        }

        let stopper = Stopper::default();
        let streams = Arc::new(Mutex::new(JoinSet::new()));
        let service = EchoService {
            ingress: ingress.clone(),
            scheme,
            spec_reply: spec_reply(ingress.spec(), max_payloads),
            max_payloads,
            stop: stopper.signal(),
            streams: streams.clone(),
        };
        let auth = BearerAuth {
            expected: opts
                .token
                .as_ref()
                .map(|t| Arc::from(format!("Bearer {t}").into_bytes().into_boxed_slice())),
        };
        let svc = InterceptedService::new(
            EchoServer::new(service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(4 << 20),
            auth,
        );
        // Each Push stream takes an ingress connection (max_connections, then
        // UNAVAILABLE naming the limit). TCP connections, with a stream or not, are
        // bounded at twice that: headroom enough for a client over the stream limit
        // to get that clear refusal, while connections that never open a stream
        // (or never send the HTTP/2 preface) cannot grow without bound.
        let incoming = incoming(
            listener,
            tcp_connection_limit(ingress.limits().max_connections),
            ingress.counters(scheme),
        );
        let mut server_stop = ingress.shutdown_signal();
        let mut stop = stopper.signal();
        let router = builder.add_service(svc);
        let server = tokio::spawn(async move {
            let signal = async move { server_stop.wait_or(&mut stop).await };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!("{}", tonic_error("grpc server", &e));
            }
        });

        let mut details = vec![
            (
                "max_payloads_per_message".to_string(),
                max_payloads.to_string(),
            ),
            ("max_message_bytes".to_string(), max_message.to_string()),
            ("http2_stream_window".to_string(), stream_window.to_string()),
            (
                "http2_connection_window".to_string(),
                conn_window.to_string(),
            ),
            ("http2_max_frame".to_string(), opts.frame.to_string()),
            (
                "auth".to_string(),
                if opts.token.is_some() {
                    "bearer"
                } else {
                    "none"
                }
                .to_string(),
            ),
        ];
        if let Some(files) = &opts.tls {
            details.push(("tls_cert".to_string(), files.cert.display().to_string()));
        }
        tracing::info!("grpc: listening on {local}");
        Ok(Box::new(GrpcTransport {
            url: local,
            details,
            stopper,
            server: tokio::sync::Mutex::new(Some(server)),
            streams,
        }))
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    fn local_url(&self) -> Url {
        self.url.clone()
    }

    fn details(&self) -> Vec<(String, String)> {
        self.details.clone()
    }

    async fn shutdown(&self) -> Result<()> {
        self.stopper.stop();
        if let Some(mut server) = self.server.lock().await.take() {
            // Streams end on the stop signal; tonic then waits for idle connections
            // to close. A peer that never even sent the HTTP/2 preface would hold it
            // for ever, so past a short grace the server task is aborted, which
            // drops whatever connections it still has.
            match tokio::time::timeout(CLOSE_GRACE, &mut server).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("grpc server task: {e}"),
                Err(_) => {
                    tracing::debug!(
                        "grpc: idle connections still open after {CLOSE_GRACE:?}; closing them"
                    );
                    server.abort();
                    let _ = server.await;
                }
            }
        }
        // Every stream's handler saw the stop; wait until they closed their
        // ingress connections.
        let mut streams =
            std::mem::take(&mut *self.streams.lock().unwrap_or_else(|e| e.into_inner()));
        while streams.join_next().await.is_some() {}
        Ok(())
    }
}

/// How long shutdown lets tonic close idle connections gracefully.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_checked() {
        assert_eq!(check_message(64, 32, 4).unwrap(), 2);
        let e = check_message(65, 32, 4).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("32 bytes") && e.message().contains("got 65 bytes"),
            "{}",
            e.message()
        );
        assert_eq!(
            check_message(0, 32, 4).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let e = check_message(32 * 5, 32, 4).unwrap_err();
        assert!(e.message().contains("at most 4"), "{}", e.message());
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"Bearer a", b"Bearer a"));
        assert!(!constant_time_eq(b"Bearer a", b"Bearer b"));
        assert!(!constant_time_eq(b"Bearer a", b"Bearer ab"));
        let mut auth = BearerAuth {
            expected: Some(Arc::from(&b"Bearer s3cret"[..])),
        };
        let e = auth.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.call(req).is_ok());
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn spec_reply_lists_leaves_in_order() {
        let spec = Spec::from_json(
            r#"{"obs": {"shape": [2, 3], "dtype": "float32"}, "act": {"shape": [], "dtype": "int64"}}"#,
        )
        .unwrap();
        let r = spec_reply(&spec, 10);
        let names: Vec<_> = r.leaves.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["act", "obs"]);
        assert_eq!(r.leaves[1].shape, [2, 3]);
        assert_eq!(r.leaves[1].itemsize, 4);
        assert_eq!(r.leaves[1].offset, 8);
        assert_eq!(r.payload_size, 32);
        assert_eq!(r.max_message_bytes, 320 + MESSAGE_OVERHEAD as u64);
        assert_eq!(r.wire_version, 1);
    }
}

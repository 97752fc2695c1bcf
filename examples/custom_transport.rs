//! A transport added downstream, in one file: echo over WebSocket, `ws://host:port`.
//!
//! This is the recipe for plugging any transport into echo (gRPC, RDMA, shared
//! memory, ...) without touching the workspace's crates:
//!
//! 1. a [`TransportFactory`] that binds a URL and returns a [`Transport`]; for each
//!    peer it opens a [`Connection`] on the server's [`Ingress`] and pushes whole
//!    payloads into it (acknowledge a payload only once the push returned `Ok`);
//! 2. a [`ClientFactory`] that connects a [`Client`] by URL; [`InflightWindow`]
//!    gives the client `max_inflight`, `wait` and `close` semantics for free;
//! 3. [`register`] puts both in a [`Registry`] under a scheme, and from then on
//!    `server.listen("ws://...")` and `registry.connect("ws://...")` work exactly
//!    as they do for `tcp://` or `quic://`;
//! 4. the `tests` module at the bottom runs echo's conformance kit on it:
//!    `cargo test -p echo --example custom_transport`.
//!
//! The protocol is ours to choose, since we write both ends. Every message is a
//! binary WebSocket message:
//!
//! * server -> client, once, right after the upgrade: the wire v1 handshake
//!   (`ECHO`, version, the leaves' item sizes and shapes), encoded and checked
//!   with echo-core's codec, so a spec mismatch reads as it does on TCP;
//! * client -> server: one or more whole payloads back to back (this client sends
//!   one per message; the server takes any whole number, zero-copy);
//! * server -> client, once per message queued: the total number of payloads
//!   acknowledged on this connection so far, a u64 little-endian. Cumulative
//!   counts make each ack self-contained: the client credits `total - seen`.
//!
//! A message that is not a whole number of payloads is refused with a close frame
//! saying why; what came before it is unaffected.
//!
//! Run it: `cargo run --example custom_transport`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use echo::stream::Stopper;
use echo::transport::host_port;
use echo::wire::{self, HandshakeLimits};
use echo::{
    async_trait, Client, ClientFactory, ClientOptions, ClientStats, Connection, Error,
    InflightWindow, Ingress, Registry, Result, Server, ShutdownSignal, Spec, Transport,
    TransportFactory, Url,
};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Registers the `ws` scheme.
fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        "ws",
        Arc::new(WsTransportFactory),
        Arc::new(WsClientFactory),
    )
}

fn ws_error(e: WsError) -> Error {
    Error::closed(format!("websocket: {e}"))
}

// ---------------------------------------------------------------- server side

/// Binds `ws://host:port` listeners.
#[derive(Debug)]
struct WsTransportFactory;

/// A bound listener: an accept loop and the peers it serves.
#[derive(Debug)]
struct WsTransport {
    url: Url,
    stop: Stopper,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

#[async_trait]
impl TransportFactory for WsTransportFactory {
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>> {
        let (host, port) = host_port(url)?;
        let listener = TcpListener::bind((host.as_str(), port))
            .await
            .map_err(|e| Error::Other(format!("binding {url}: {e}")))?;
        let url = echo::registry::parse_url(&format!("ws://{}", listener.local_addr()?))?;
        let stop = Stopper::default();
        let task = tokio::spawn(accept_loop(listener, ingress, stop.signal()));
        Ok(Box::new(WsTransport {
            url,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }))
    }
}

#[async_trait]
impl Transport for WsTransport {
    fn local_url(&self) -> Url {
        self.url.clone()
    }

    async fn shutdown(&self) -> Result<()> {
        self.stop.stop();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, ingress: Ingress, mut stop: ShutdownSignal) {
    let mut server_stop = ingress.shutdown_signal();
    let mut peers = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            _ = server_stop.wait() => break,
            Some(_) = peers.join_next(), if !peers.is_empty() => {}
            accepted = listener.accept() => match accepted {
                // The connection limit is the ingress's: over it, `open` refuses.
                Ok((tcp, addr)) => match ingress.open("ws", addr.to_string()) {
                    Ok(conn) => {
                        peers.spawn(async move {
                            let peer = conn.peer().to_string();
                            if let Err(e) = serve_peer(tcp, conn).await {
                                tracing::info!("ws {peer}: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("ws: refused {addr}: {e}"),
                },
                Err(e) => {
                    tracing::warn!("ws: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    // Stopping the peers' tasks drops their connections; what they queued (and
    // acknowledged) still reaches the store, and their clients see the socket close.
    peers.shutdown().await;
}

/// Serves one peer: upgrade, send the spec, then queue payloads and acknowledge them.
async fn serve_peer(tcp: TcpStream, mut conn: Connection) -> Result<()> {
    tcp.set_nodelay(true)?;
    let payload_size = conn.spec().payload_size();
    // Bound what one peer can make us hold: a message carries at most one receive
    // chunk's worth of payloads (or one payload, if that is larger).
    let max_message = conn.limits().chunk_bytes.max(payload_size);
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let spec_message = Message::binary(wire::handshake_bytes(&conn.spec().wire()));
    let limit = conn.limits().handshake_timeout;
    let mut ws = timeout(limit, async {
        let mut ws = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await?;
        ws.send(spec_message).await?;
        Ok(ws)
    })
    .await
    .map_err(|_| Error::Timeout(format!("websocket handshake took over {limit:?}")))?
    .map_err(ws_error)?;

    let mut acked = 0u64;
    while let Some(message) = ws.next().await {
        let payloads = match message.map_err(ws_error)? {
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue, // tungstenite answers pings
            other => return refuse(&mut ws, format!("expected payloads, got {other:?}")).await,
        };
        // Zero-copy: the message's bytes are queued as they are.
        match conn.push_bytes(payloads).await {
            Ok(n) => acked += n as u64,
            Err(e @ Error::PayloadSize { .. }) => return refuse(&mut ws, e.to_string()).await,
            Err(e) => return Err(e), // shutting down
        }
        ws.send(Message::binary(acked.to_le_bytes().to_vec()))
            .await
            .map_err(ws_error)?;
    }
    Ok(())
}

/// Closes the connection with a close frame that says why.
async fn refuse(ws: &mut Ws, why: String) -> Result<()> {
    let mut reason = why.clone();
    reason.truncate(120); // a close frame's reason must fit in 123 bytes
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    };
    let _ = timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
    Err(Error::Other(why))
}

// ---------------------------------------------------------------- client side

/// Connects [`WsClient`]s.
#[derive(Debug)]
struct WsClientFactory;

/// A client: payloads go out on the socket, a task reads the acks.
#[derive(Debug)]
struct WsClient {
    url: String,
    payload_size: usize,
    window: Arc<InflightWindow>,
    sink: SplitSink<Ws, Message>,
    acks: JoinHandle<()>,
    closed: bool,
}

/// Opens a WebSocket to `url` and checks the server's spec message against `spec`.
async fn open(url: &Url, spec: &Spec) -> Result<Ws> {
    let (host, port) = host_port(url)?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .map_err(ws_error)?;
    let first = match ws.next().await {
        Some(Ok(Message::Binary(bytes))) => bytes,
        Some(Ok(other)) => {
            return Err(Error::Other(format!(
                "{url}: expected the spec message, got {other:?}"
            )))
        }
        Some(Err(e)) => return Err(ws_error(e)),
        None => {
            return Err(Error::closed(format!(
                "{url} closed before sending its spec"
            )))
        }
    };
    match wire::parse_handshake(&first, &HandshakeLimits::default())? {
        Some((server_spec, used)) if used == first.len() => {
            server_spec.check_matches(&spec.wire())?;
            Ok(ws)
        }
        _ => Err(Error::Other(format!(
            "{url}: the spec message ({} bytes) is not one whole handshake",
            first.len()
        ))),
    }
}

#[async_trait]
impl ClientFactory for WsClientFactory {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        options.validate()?;
        let limit = options.connect_timeout;
        let ws = timeout(limit, open(url, spec))
            .await
            .map_err(|_| Error::Timeout(format!("connecting to {url} took over {limit:?}")))??;
        let (sink, stream) = ws.split();
        let window = Arc::new(InflightWindow::new(options.max_inflight));
        let acks = tokio::spawn(read_acks(stream, window.clone(), url.to_string()));
        Ok(Box::new(WsClient {
            url: url.to_string(),
            payload_size: spec.payload_size(),
            window,
            sink,
            acks,
            closed: false,
        }))
    }
}

/// Credits acks to the window until the connection ends, then closes the window
/// (so blocked `send`s and `wait`s fail with `ConnectionClosed`, not hang).
async fn read_acks(mut stream: SplitStream<Ws>, window: Arc<InflightWindow>, url: String) {
    let mut seen = 0u64;
    let why = loop {
        let total = match stream.next().await {
            Some(Ok(Message::Binary(b))) => match <[u8; 8]>::try_from(&b[..]) {
                Ok(count) => u64::from_le_bytes(count),
                Err(_) => break format!("{url} sent a {}-byte ack, expected 8", b.len()),
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(Some(frame)))) => {
                break format!("{url} closed the connection: {}", frame.reason)
            }
            Some(Ok(other)) => break format!("{url} sent {other:?}, expected an ack"),
            Some(Err(e)) => break format!("connection to {url} lost: {e}"),
            None => break format!("{url} closed the connection"),
        };
        let Some(new) = total.checked_sub(seen) else {
            break format!("{url}: ack count went back from {seen} to {total}");
        };
        if let Err(e) = window.ack(new) {
            break e.to_string(); // more acks than payloads sent
        }
        seen = total;
    };
    window.close(why);
}

#[async_trait]
impl Client for WsClient {
    fn payload_size(&self) -> usize {
        self.payload_size
    }

    async fn send(&mut self, payload: &[u8]) -> Result<()> {
        echo::transport::check_send(self.closed, &self.url, self.payload_size, payload)?;
        self.window.acquire(1).await?; // waits while max_inflight are unacknowledged
        let message = Message::binary(Bytes::copy_from_slice(payload));
        if let Err(e) = self.sink.send(message).await {
            self.window.unsend(1);
            let why = format!("connection to {} lost: {e}", self.url);
            self.window.close(why.clone());
            return Err(Error::closed(why));
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
        // Every `send` already flushed its message; say goodbye, bounded in case the
        // server is gone.
        let _ = timeout(Duration::from_secs(1), self.sink.close()).await;
        self.acks.abort();
        self.window
            .close(format!("client for {} is closed", self.url));
        Ok(())
    }

    fn stats(&self) -> ClientStats {
        self.window.stats()
    }
}

impl Drop for WsClient {
    fn drop(&mut self) {
        self.acks.abort();
    }
}

// ---------------------------------------------------------------- using it

#[tokio::main]
async fn main() -> Result<()> {
    let spec = Spec::from_json(
        r#"{"obs": {"shape": [64], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}"#,
    )?;
    let mut registry = echo::registry();
    register(&mut registry)?;
    println!("schemes: {}", registry.schemes().join(", "));

    let server = Server::builder(spec.clone())
        .batch_size(64)
        .registry(registry)
        .build()?;
    let url = server.listen("ws://127.0.0.1:0").await?;
    println!("listening on {url}");

    // Actors connect by URL through the registry, as with any built-in transport.
    let (actors, steps) = (4u32, 1024u32);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for actor in 0..actors {
        let mut client = server
            .registry()
            .connect(&url, &spec, &ClientOptions::default())
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; client.payload_size()];
            for step in 0..steps {
                // obs[0] = actor, reward = step; the reward is the last leaf (sorted keys).
                payload[..4].copy_from_slice(&(actor as f32).to_le_bytes());
                let reward = payload.len() - 4;
                payload[reward..].copy_from_slice(&(step as f32).to_le_bytes());
                client.send(&payload).await?;
            }
            client.wait().await?;
            client.close().await?;
            Ok::<_, Error>(client.stats())
        }));
    }

    // The learner: consume batches until every sample arrived.
    let total = (actors * steps) as usize;
    let (mut received, mut batches, mut reward_sum) = (0usize, 0usize, 0f64);
    while received < total {
        let batch = server
            .next_batch()
            .await
            .ok_or_else(|| Error::Other("server stopped early".into()))?;
        let rewards: &[f32] = batch
            .leaf_by_name("reward")
            .ok_or_else(|| Error::Other("no reward leaf".into()))?
            .as_slice()?;
        reward_sum += rewards.iter().map(|&r| f64::from(r)).sum::<f64>();
        received += batch.len();
        batches += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    for task in tasks {
        let stats = task
            .await
            .map_err(|e| Error::Other(format!("actor task: {e}")))??;
        println!(
            "actor: {} sent, {} acked, ack p50 {:.0} us",
            stats.sent, stats.acked, stats.ack_latency.p50_us
        );
    }
    server.shutdown().await?;

    let expected = f64::from(actors) * f64::from(steps) * f64::from(steps - 1) / 2.0;
    println!(
        "{received} samples in {batches} batches over ws:// in {elapsed:.2} s ({:.0} samples/s); \
         reward sum {reward_sum} (expected {expected})",
        received as f64 / elapsed
    );
    if reward_sum != expected {
        return Err(Error::Other("samples were lost or corrupted".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use echo_core::testkit::{self, Conformance};

    struct WsKit;

    #[async_trait]
    impl Conformance for WsKit {
        fn registry(&self) -> Registry {
            let mut registry = echo::registry();
            register(&mut registry).expect("ws is not registered yet");
            registry
        }

        fn bind_url(&self) -> String {
            "ws://127.0.0.1:0".into()
        }

        /// Sends the whole payloads as one message, then a message holding part of
        /// a payload (which the server must refuse), then drops the socket.
        async fn send_then_abort(
            &self,
            url: &str,
            spec: &Spec,
            whole: &[u8],
            partial: &[u8],
        ) -> Result<()> {
            let mut ws = open(&echo::registry::parse_url(url)?, spec).await?;
            ws.send(Message::binary(whole.to_vec()))
                .await
                .map_err(ws_error)?;
            ws.send(Message::binary(partial.to_vec()))
                .await
                .map_err(ws_error)?;
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ws_passes_the_conformance_kit() {
        testkit::run_all(&WsKit, true).await.unwrap();
    }

    #[tokio::test]
    async fn a_message_that_is_not_whole_payloads_is_refused_with_a_reason() {
        let spec = testkit::kit_spec(32);
        let server = Server::builder(spec.clone())
            .batch_size(2)
            .registry(WsKit.registry())
            .build()
            .unwrap();
        let url = server.listen("ws://127.0.0.1:0").await.unwrap();
        let mut ws = open(&echo::registry::parse_url(&url).unwrap(), &spec)
            .await
            .unwrap();
        ws.send(Message::binary(vec![0u8; 48])).await.unwrap();
        let reply = timeout(Duration::from_secs(10), ws.next()).await.unwrap();
        match reply {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Policy);
                assert_eq!(frame.reason.as_str(), "Payload size 48 != expected 32");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        server.shutdown().await.unwrap();
    }
}

//! Wire v1 over any byte stream: the server side ([`serve_stream`], [`spawn_acceptor`])
//! and the client side ([`StreamClient`]). TCP, Unix sockets, QUIC streams and the
//! in-memory transport all run on these, so there is one framing in the project.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use crate::ingress::{Connection, Ingress, ShutdownSignal};
use crate::metrics::LatencyHistogram;
use crate::spec::Spec;
use crate::transport::{Client, ClientOptions, ClientStats};
use crate::window::InflightWindow;
use crate::wire::{self, Decoded, HandshakeDecoder, WireError, ACKS, CLIENT_HELLO};
use crate::{Error, Result};

/// How a served stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The peer closed between payloads.
    Eof,
    /// The peer closed inside a payload; that partial payload was discarded.
    EofMidPayload {
        /// Bytes of the discarded partial payload.
        discarded: usize,
    },
    /// The server or transport is shutting down.
    Shutdown,
}

/// A stop signal for one transport's tasks, independent of the server's.
#[derive(Debug)]
pub struct Stopper(watch::Sender<bool>);

impl Default for Stopper {
    fn default() -> Self {
        Stopper(watch::channel(false).0)
    }
}

impl Stopper {
    /// A signal that fires when [`stop`](Self::stop) is called.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal::from_watch(self.0.subscribe())
    }

    /// Fires the signal.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

async fn either(a: &mut ShutdownSignal, b: &mut ShutdownSignal) {
    tokio::select! {
        _ = a.wait() => {},
        _ = b.wait() => {},
    }
}

/// Serves wire v1 on one stream: optional client hello, the handshake, then
/// payloads in, acks out, until EOF or `stop`/server shutdown.
///
/// Reads are amortised: after each read, whatever else the stream already has is
/// read too (until the receive buffer is full), every whole payload is queued in
/// one push, and their acks go out in one write.
pub async fn serve_stream<R, W>(
    mut reader: R,
    mut writer: W,
    mut conn: Connection,
    expect_hello: bool,
    mut stop: ShutdownSignal,
) -> Result<StreamEnd>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut server_stop = conn.shutdown_signal();
    let limit = conn.limits().handshake_timeout;
    if expect_hello {
        let mut hello = [0u8; CLIENT_HELLO.len()];
        let mut got = 0;
        let read_hello = async {
            while got < hello.len() {
                let n = reader.read(&mut hello[got..]).await?;
                if n == 0 {
                    return Err(Error::Wire(WireError::Truncated("client hello")));
                }
                got += n;
                wire::check_hello(&hello[..got])?;
            }
            Ok::<_, Error>(())
        };
        match timeout(limit, read_hello).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "client hello from {} not received within {limit:?}",
                    conn.peer()
                )))
            }
        }
    }
    let hs = wire::handshake_bytes(&conn.spec().wire());
    let send_hs = async {
        writer.write_all(&hs).await?;
        writer.flush().await
    };
    match timeout(limit, send_hs).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::Timeout(format!(
                "handshake to {} not written within {limit:?}",
                conn.peer()
            )))
        }
    }

    let mut sp = conn.splitter();
    // One stop future for the connection's lifetime: registering a waiter on the
    // shared shutdown channel per read (and dropping it) costs two contended locks.
    // Reads and ack writes are polled first; the stop future only when they wait
    // (Tokio's cooperative budget makes a busy stream wait now and then, and every
    // push sees a server shutdown at once).
    let stopped = either(&mut server_stop, &mut stop);
    tokio::pin!(stopped);
    loop {
        let asked = sp.spare().len();
        let n = tokio::select! {
            biased;
            r = reader.read(sp.spare()) => r?,
            _ = &mut stopped => return Ok(StreamEnd::Shutdown),
        };
        let mut eof = n == 0;
        sp.commit(n);
        // A short read drained the socket: only a full one is worth another try.
        let mut last = (n, asked);
        while !eof && !sp.is_full() && last.0 == last.1 {
            let asked = sp.spare().len();
            match reader.read(sp.spare()).now_or_never() {
                Some(Ok(0)) => eof = true,
                Some(Ok(m)) => {
                    sp.commit(m);
                    last = (m, asked);
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        if sp.ready() > 0 {
            let chunk = sp.take(conn.buffer());
            let mut left = match conn.push(chunk).await {
                Ok(n) => n,
                Err(Error::Shutdown) => return Ok(StreamEnd::Shutdown),
                Err(e) => return Err(e),
            };
            let ack = async {
                while left > 0 {
                    let k = left.min(ACKS.len());
                    writer.write_all(&ACKS[..k]).await?;
                    left -= k;
                }
                writer.flush().await
            };
            tokio::select! {
                biased;
                r = ack => r?,
                _ = &mut stopped => return Ok(StreamEnd::Shutdown),
            }
        }
        if eof {
            let partial = sp.partial_len();
            let _ = timeout(std::time::Duration::from_secs(1), writer.shutdown()).await;
            return Ok(if partial > 0 {
                StreamEnd::EofMidPayload { discarded: partial }
            } else {
                StreamEnd::Eof
            });
        }
    }
}

/// Something that accepts byte streams: a TCP or Unix listener, an in-memory one.
#[async_trait]
pub trait Accept: Send + 'static {
    /// The read half.
    type Reader: AsyncRead + Unpin + Send + 'static;
    /// The write half.
    type Writer: AsyncWrite + Unpin + Send + 'static;
    /// Accepts the next peer: its halves and a name for logs.
    async fn accept(&mut self) -> io::Result<(Self::Reader, Self::Writer, String)>;
}

/// A running accept loop; [`shutdown`](Self::shutdown) stops it and its connections.
#[derive(Debug)]
pub struct AcceptorHandle {
    stopper: Stopper,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl AcceptorHandle {
    /// Stops accepting, stops every connection it served, and waits for them.
    pub async fn shutdown(&self) {
        self.stopper.stop();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// Spawns an accept loop serving wire v1 on each accepted stream, feeding `ingress`
/// under the transport name `scheme`. A peer over `max_connections` is closed at once.
pub fn spawn_acceptor<A: Accept>(
    scheme: &'static str,
    mut acceptor: A,
    ingress: Ingress,
    expect_hello: bool,
) -> AcceptorHandle {
    let stopper = Stopper::default();
    let mut stop = stopper.signal();
    let conn_stop = stopper.signal();
    let task = tokio::spawn(async move {
        let mut server_stop = ingress.shutdown_signal();
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = either(&mut server_stop, &mut stop) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = acceptor.accept() => match accepted {
                    Ok((r, w, peer)) => match ingress.open(scheme, peer.clone()) {
                        Ok(conn) => {
                            let stop = conn_stop.clone();
                            tasks.spawn(async move {
                                match serve_stream(r, w, conn, expect_hello, stop).await {
                                    Ok(StreamEnd::EofMidPayload { discarded }) => tracing::debug!(
                                        "{scheme} {peer}: closed mid-payload, {discarded} bytes discarded"
                                    ),
                                    Ok(_) => tracing::debug!("{scheme} {peer}: closed"),
                                    Err(e) => tracing::info!("{scheme} {peer}: {e}"),
                                }
                            });
                        }
                        Err(e) => tracing::warn!("{scheme}: refused {peer}: {e}"),
                    },
                    Err(e) => {
                        tracing::warn!("{scheme}: accept failed: {e}");
                        // Back off briefly (e.g. out of file descriptors).
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
            }
        }
        drop(acceptor);
        stop_all(&mut tasks).await;
    });
    AcceptorHandle {
        stopper,
        task: tokio::sync::Mutex::new(Some(task)),
    }
}

async fn stop_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// Reads the server's handshake and checks it against `spec`.
async fn read_handshake<R: AsyncRead + Unpin>(
    reader: &mut R,
    spec: &Spec,
    peer: &str,
) -> Result<()> {
    let mut dec = HandshakeDecoder::new(Default::default());
    let mut buf = [0u8; 1024];
    let got = loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(Error::closed(format!(
                "{peer} closed the connection during the handshake"
            )));
        }
        match dec.feed(&buf[..n])? {
            Decoded::NeedMore => continue,
            Decoded::Done { spec, used } => {
                if used < n {
                    return Err(Error::Wire(WireError::UnexpectedAckByte { got: buf[used] }));
                }
                break spec;
            }
        }
    };
    got.check_matches(&spec.wire())
}

#[derive(Debug, Default)]
struct Outbox {
    state: Mutex<OutState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct OutState {
    buf: Vec<u8>,
    closing: bool,
}

/// Payloads of at least this many bytes are written by [`StreamClient`] straight
/// from the caller's buffer, inside `send`; smaller ones are copied into an
/// outgoing buffer that a writer task flushes, many payloads per write.
pub const DIRECT_WRITE_MIN: usize = 64 * 1024;

type BoxWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// How payloads leave a [`StreamClient`].
enum Output {
    /// Copied into the outbox; a writer task flushes it.
    Buffered {
        outbox: Arc<Outbox>,
        task: Option<JoinHandle<()>>,
    },
    /// Written inside `send`. The mutex is only there to make the client `Sync`;
    /// `send` and `close` reach the writer through `&mut self` (`get_mut`).
    Direct {
        writer: Mutex<Option<BoxWriter>>,
        /// Bytes of the payload being written, while a `send` writes it; still set
        /// afterwards only if that `send` was cancelled.
        pending: Option<usize>,
    },
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Buffered { .. } => f.write_str("Buffered"),
            Output::Direct { pending, .. } => {
                f.debug_struct("Direct").field("pending", pending).finish()
            }
        }
    }
}

/// A wire v1 client over any byte stream; TCP, Unix and QUIC clients wrap it.
///
/// Small payloads are copied into an outgoing buffer that a writer task flushes;
/// payloads queued while a write is under way go out together in the next one.
/// Payloads of [`DIRECT_WRITE_MIN`] bytes or more are written from the caller's
/// buffer inside `send`, saving a copy. Either way at most `max_inflight` are
/// unacknowledged.
#[derive(Debug)]
pub struct StreamClient {
    peer: String,
    payload_size: usize,
    window: Arc<InflightWindow>,
    output: Output,
    reader: JoinHandle<()>,
    closed: bool,
}

impl StreamClient {
    /// Runs the client side of wire v1 on a connected stream: optional hello,
    /// the server's handshake (checked against `spec`), then payloads and acks.
    pub async fn connect<R, W>(
        reader: R,
        writer: W,
        spec: &Spec,
        options: &ClientOptions,
        send_hello: bool,
        peer: String,
    ) -> Result<StreamClient>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let direct = spec.payload_size() >= DIRECT_WRITE_MIN;
        Self::connect_with(reader, writer, spec, options, send_hello, peer, direct).await
    }

    /// [`connect`](Self::connect) that always copies payloads into the outbox
    /// (never writes inside `send`), so `send` waits only for the in-flight
    /// window, never for the stream: for clients that spread payloads over
    /// several streams and must not be held up by one that stalls.
    pub async fn connect_buffered<R, W>(
        reader: R,
        writer: W,
        spec: &Spec,
        options: &ClientOptions,
        send_hello: bool,
        peer: String,
    ) -> Result<StreamClient>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::connect_with(reader, writer, spec, options, send_hello, peer, false).await
    }

    async fn connect_with<R, W>(
        mut reader: R,
        mut writer: W,
        spec: &Spec,
        options: &ClientOptions,
        send_hello: bool,
        peer: String,
        direct: bool,
    ) -> Result<StreamClient>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        options.validate()?;
        let setup = async {
            if send_hello {
                writer.write_all(&CLIENT_HELLO).await?;
                writer.flush().await?;
            }
            read_handshake(&mut reader, spec, &peer).await
        };
        match timeout(options.connect_timeout, setup).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "no handshake from {peer} within {:?}",
                    options.connect_timeout
                )))
            }
        }
        let window = Arc::new(InflightWindow::new(options.max_inflight));
        let reader = tokio::spawn(read_acks(reader, window.clone(), peer.clone()));
        let output = if direct {
            Output::Direct {
                writer: Mutex::new(Some(Box::pin(writer))),
                pending: None,
            }
        } else {
            let outbox = Arc::new(Outbox::default());
            let task = tokio::spawn(write_out(
                writer,
                outbox.clone(),
                window.clone(),
                peer.clone(),
            ));
            Output::Buffered {
                outbox,
                task: Some(task),
            }
        };
        Ok(StreamClient {
            peer,
            payload_size: spec.payload_size(),
            window,
            output,
            reader,
            closed: false,
        })
    }

    /// The window (for latency histograms).
    pub fn window(&self) -> &InflightWindow {
        &self.window
    }

    /// [`Client::send`] without boxing the future (for wrappers and hot loops).
    pub async fn send_payload(&mut self, payload: &[u8]) -> Result<()> {
        if self.closed {
            return Err(Error::closed(format!("client for {} is closed", self.peer)));
        }
        if payload.len() != self.payload_size {
            return Err(Error::PayloadSize {
                expected: self.payload_size,
                got: payload.len(),
            });
        }
        match &mut self.output {
            Output::Buffered { outbox, .. } => {
                self.window.acquire(1).await?;
                let was_empty = {
                    let mut st = outbox.state.lock().unwrap_or_else(|e| e.into_inner());
                    let was_empty = st.buf.is_empty();
                    st.buf.extend_from_slice(payload);
                    was_empty
                };
                // The writer empties the buffer after each wake-up: only the payload
                // that makes it non-empty needs to wake it.
                if was_empty {
                    outbox.notify.notify_one();
                }
                Ok(())
            }
            Output::Direct { writer, pending } => {
                settle_cancelled(pending, &self.window, &self.peer)?;
                self.window.acquire(1).await?;
                let Some(w) = writer.get_mut().unwrap_or_else(|e| e.into_inner()) else {
                    return Err(Error::closed(format!("client for {} is closed", self.peer)));
                };
                // Progress is recorded as it goes: if this future is dropped half-way,
                // the next call knows whether the stream is still in step.
                *pending = Some(0);
                let mut done = 0;
                let r = async {
                    while done < payload.len() {
                        let n = w.write(&payload[done..]).await?;
                        if n == 0 {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                        done += n;
                        *pending = Some(done);
                    }
                    w.flush().await
                }
                .await;
                *pending = None;
                r.map_err(|e: io::Error| {
                    let msg = format!("connection to {} lost: {e}", self.peer);
                    self.window.close(msg.clone());
                    Error::closed(msg)
                })
            }
        }
    }

    /// [`Client::wait`] without boxing the future.
    pub async fn wait_acked(&mut self) -> Result<()> {
        if let Output::Direct { pending, .. } = &mut self.output {
            settle_cancelled(pending, &self.window, &self.peer)?;
        }
        self.window.wait_all().await
    }

    /// [`Client::close`] without boxing the future.
    pub async fn close_stream(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        match &mut self.output {
            Output::Buffered { outbox, task } => {
                outbox
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .closing = true;
                outbox.notify.notify_one();
                if let Some(t) = task.take() {
                    let _ = t.await;
                }
            }
            Output::Direct { writer, pending } => {
                let w = writer.get_mut().unwrap_or_else(|e| e.into_inner()).take();
                // After a write cancelled half-way, just drop the stream.
                if let (Some(mut w), None | Some(0)) = (w, *pending) {
                    let _ = timeout(std::time::Duration::from_secs(5), w.shutdown()).await;
                }
            }
        }
        self.reader.abort();
        self.window
            .close(format!("client for {} is closed", self.peer));
        Ok(())
    }
}

/// Deals with a direct `send` that was cancelled: one that wrote nothing gives its
/// window slot back; one that wrote part of a payload leaves the stream out of step,
/// which closes the client.
fn settle_cancelled(
    pending: &mut Option<usize>,
    window: &InflightWindow,
    peer: &str,
) -> Result<()> {
    match pending.take() {
        None => Ok(()),
        Some(0) => {
            window.unsend(1);
            Ok(())
        }
        Some(done) => {
            let msg = format!(
                "a send to {peer} was cancelled after {done} bytes of its payload; \
                 the stream cannot continue"
            );
            window.close(msg.clone());
            *pending = Some(done);
            Err(Error::closed(msg))
        }
    }
}

async fn read_acks<R: AsyncRead + Unpin>(mut reader: R, window: Arc<InflightWindow>, peer: String) {
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => {
                window.close(format!("{peer} closed the connection"));
                return;
            }
            Ok(n) => {
                if let Some(&b) = buf[..n].iter().find(|&&b| b != wire::ACK) {
                    window.close(WireError::UnexpectedAckByte { got: b }.to_string());
                    return;
                }
                if let Err(e) = window.ack(n as u64) {
                    tracing::warn!("{peer}: {e}");
                    return;
                }
            }
            Err(e) => {
                window.close(format!("connection to {peer} lost: {e}"));
                return;
            }
        }
    }
}

async fn write_out<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: Arc<Outbox>,
    window: Arc<InflightWindow>,
    peer: String,
) {
    let mut local = Vec::new();
    loop {
        outbox.notify.notified().await;
        let closing = {
            let mut st = outbox.state.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut st.buf, &mut local);
            st.closing
        };
        if !local.is_empty() {
            let r = async {
                writer.write_all(&local).await?;
                writer.flush().await
            }
            .await;
            if let Err(e) = r {
                window.close(format!("connection to {peer} lost: {e}"));
                return;
            }
            local.clear();
        }
        if closing {
            let _ = writer.shutdown().await;
            return;
        }
    }
}

#[async_trait]
impl Client for StreamClient {
    fn payload_size(&self) -> usize {
        self.payload_size
    }

    async fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.send_payload(payload).await
    }

    async fn wait(&mut self) -> Result<()> {
        self.wait_acked().await
    }

    async fn close(&mut self) -> Result<()> {
        self.close_stream().await
    }

    fn stats(&self) -> ClientStats {
        self.window.stats()
    }

    fn latency_histogram(&self) -> LatencyHistogram {
        self.window.latency()
    }
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        self.reader.abort();
        if let Output::Buffered { task: Some(t), .. } = &mut self.output {
            t.abort();
        }
    }
}

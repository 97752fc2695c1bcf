//! Wire v1 over any byte stream: the server side ([`serve_stream`], [`spawn_acceptor`])
//! and the client side ([`StreamClient`]). TCP, Unix sockets, QUIC streams and the
//! in-memory transport all run on these, so there is one framing in the project.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use crate::busy::BusyPoll;
use crate::ingress::{Connection, Ingress, ShutdownSignal};
use crate::metrics::LatencyHistogram;
use crate::spec::Spec;
use crate::store::Reservation;
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

/// Payloads of at least this many bytes are received straight into the store's
/// slots by [`spawn_acceptor`]'s connections when their stream supports it
/// ([`DirectRecv`]); smaller ones are read many per call into a receive buffer.
pub const DIRECT_RECV_MIN: usize = 64 * 1024;

/// What a stream's read half offers for receiving large payloads straight into
/// the store (sockets: `SO_RCVLOWAT`, `FIONREAD`, `readv`), and for busy polling
/// ([`busy`](crate::busy), which only needs [`recv_now`](Self::recv_now)). Every
/// method has a default meaning "not supported", so a stream without it just
/// implements the trait with no body.
///
/// With it, a connection waits until a whole payload is in the kernel's receive
/// queue, only then reserves store slots and reads the payload into them, so a
/// peer that stalls mid-payload never holds a batch open.
pub trait DirectRecv {
    /// Asks to be woken only once `bytes` are queued (the low-water mark) and
    /// returns the mark now in effect (the system may cap it), or `None` if the
    /// stream has no such mark (then nothing is received directly).
    fn set_low_water(&self, _bytes: usize) -> io::Result<Option<usize>> {
        Ok(None)
    }

    /// Bytes queued and readable at once. With `forget`, when fewer than `min`
    /// are queued, this is `WouldBlock` and forgets the readiness the stream had
    /// cached, so that [`readable`](Self::readable) next waits for a new event.
    fn queued(&self, _min: usize, _forget: bool) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Reads into `bufs` without waiting (a vectored read): `WouldBlock` if
    /// nothing is queued, `Ok(0)` at the end of the stream. Called with no
    /// buffers to learn whether it is supported (`Unsupported` if not).
    fn recv_now(&self, _bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Waits until the stream is readable; `true` if the peer closed it or it failed.
    fn readable(&self) -> impl Future<Output = io::Result<bool>> + Send {
        async { Ok(true) }
    }

    /// Whether busy polling ([`recv_now`](Self::recv_now) in a loop before
    /// parking) can find bytes sooner than a wake-up would (default `true`).
    /// A socket's bytes are delivered by the kernel, on another CPU; a stream
    /// whose bytes are delivered by other tasks of this process (a protocol
    /// stack in user space, like QUIC's) answers `false`: a spinning reader
    /// would only take CPU time from the task that delivers them.
    fn worth_polling(&self) -> bool {
        true
    }
}

/// How long part of a payload may sit in the receive queue, while a connection
/// waits for the rest to receive it directly, before it is read into the
/// connection's buffer instead. This only matters for slow peers and for
/// receive windows too small for the rest of the payload to arrive (normally
/// prevented by sizing the receive buffer for two payloads).
pub const DIRECT_RECV_STALL: std::time::Duration = std::time::Duration::from_millis(10);

/// Turns on direct receives for payloads of `ps` bytes if `reader` supports a
/// low-water mark that covers two payloads (asking for that mark makes Linux
/// grow the receive buffer to fit, so a payload can always arrive whole behind a
/// part of the next one); then sets the mark to one payload.
fn setup_direct<R: DirectRecv>(reader: &R, ps: usize, peer: &str) -> bool {
    let r = (|| {
        let two = ps.saturating_mul(2);
        match reader.set_low_water(two)? {
            None => Ok(false),
            Some(m) if m >= two => Ok(reader.set_low_water(ps)? == Some(ps)),
            Some(m) => {
                tracing::debug!(
                    "{peer}: the receive buffer cannot hold two payloads of {ps} bytes \
                     (low-water mark capped at {m}); buffered reads"
                );
                reader.set_low_water(1)?;
                Ok(false)
            }
        }
    })();
    r.unwrap_or_else(|e: io::Error| {
        tracing::debug!("{peer}: no direct receives: {e}");
        false
    })
}

/// A read half without [`DirectRecv`] support (for [`serve_stream`]).
struct Plain<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for Plain<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R> DirectRecv for Plain<R> {}

/// Reads the payloads of `res` from `reader`, whose receive queue already holds
/// them: vectored reads straight into the reserved slots.
fn recv_reserved<R: DirectRecv>(reader: &R, res: &mut Reservation<'_>) -> io::Result<()> {
    const IOVS: usize = 64;
    let mut regions = res.regions();
    let mut bufs: [IoSliceMut<'_>; IOVS] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
    loop {
        let mut count = 0;
        for r in regions.by_ref() {
            bufs[count] = IoSliceMut::new(r);
            count += 1;
            if count == IOVS {
                break;
            }
        }
        if count == 0 {
            return Ok(());
        }
        let mut pending = &mut bufs[..count];
        while !pending.is_empty() {
            match reader.recv_now(pending) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended although its receive queue held the payload",
                    ))
                }
                Ok(n) => IoSliceMut::advance_slices(&mut pending, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_acks<W: AsyncWrite + Unpin>(writer: &mut W, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ACKS.len());
        writer.write_all(&ACKS[..k]).await?;
        n -= k;
    }
    writer.flush().await
}

/// The ack side of a served stream. Once an ack write fails (the peer reset the
/// connection, or closed its read side), acks are no longer written but the
/// stream is still read to its end: every whole payload that reached us before
/// the failure is delivered, the same whether the server had read it before
/// the failure or not. The failure is reported when the stream ends.
struct Acks<W> {
    writer: W,
    failed: Option<io::Error>,
}

impl<W: AsyncWrite + Unpin> Acks<W> {
    async fn send(&mut self, n: usize, peer: &str) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = write_acks(&mut self.writer, n).await {
            tracing::debug!("{peer}: acks cannot be written ({e}); reading what is left");
            self.failed = Some(e);
        }
    }
}

/// Busy polling for `reader`, with `budget` per wait if its payloads are small
/// enough ([`busy::MAX_PAYLOAD`](crate::busy::MAX_PAYLOAD)), it supports
/// reads without waiting ([`DirectRecv::recv_now`], probed with no buffers) and
/// polling it is worth it ([`DirectRecv::worth_polling`]).
fn busy_poll_for<R: DirectRecv>(
    reader: &R,
    payload_size: usize,
    budget: std::time::Duration,
) -> BusyPoll {
    let off = !reader.worth_polling()
        || payload_size > crate::busy::MAX_PAYLOAD
        || matches!(reader.recv_now(&mut []), Err(e) if e.kind() == io::ErrorKind::Unsupported);
    BusyPoll::new(if off {
        std::time::Duration::ZERO
    } else {
        budget
    })
}

/// One read without waiting, for busy polling: `None` if nothing is queued yet.
fn try_recv<R: DirectRecv>(reader: &R, buf: &mut [u8]) -> Option<io::Result<usize>> {
    match reader.recv_now(&mut [IoSliceMut::new(buf)]) {
        Ok(n) => Some(Ok(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
        Err(e) => Some(Err(e)),
    }
}

/// Polls `reader` within `busy`'s budget: the result of the read that found
/// bytes, or `None`. It yields to the runtime after the first attempt (the
/// tasks the last bytes woke, such as a sender the last acks let go, run
/// first) and then every 5 µs, spinning in between: a yield per attempt would
/// wake the runtime's idle workers every time (measured: 15-20 % fewer
/// samples/s with one client at 20 B). (`reader` is borrowed mutably only so
/// that the future is `Send` without `R: Sync`.)
async fn busy_recv<R: DirectRecv>(
    busy: &mut BusyPoll,
    reader: &mut R,
    buf: &mut [u8],
) -> Option<io::Result<usize>> {
    const YIELD_EVERY: std::time::Duration = std::time::Duration::from_micros(5);
    let poll = busy.start()?;
    let mut attempts = 0u32;
    let mut last_yield: Option<std::time::Instant> = None;
    let got = loop {
        attempts = attempts.saturating_add(1);
        if let Some(r) = try_recv(reader, buf) {
            break Some(r);
        }
        if !poll.more() {
            break None;
        }
        match last_yield {
            Some(t) if t.elapsed() < YIELD_EVERY => std::hint::spin_loop(),
            _ => {
                tokio::task::yield_now().await;
                last_yield = Some(std::time::Instant::now());
            }
        }
    };
    if got.is_some() {
        poll.found(attempts > 1);
    }
    got
}

/// Serves wire v1 on one stream: optional client hello, the handshake, then
/// payloads in, acks out, until EOF or `stop`/server shutdown.
///
/// Reads are amortised: after each read, whatever else the stream already has is
/// read too (until the receive buffer is full), every whole payload is queued in
/// one push, and their acks go out in one write.
pub async fn serve_stream<R, W>(
    reader: R,
    writer: W,
    conn: Connection,
    expect_hello: bool,
    stop: ShutdownSignal,
) -> Result<StreamEnd>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    serve_stream_direct(Plain(reader), writer, conn, expect_hello, stop).await
}

/// [`serve_stream`] for a stream that may support [`DirectRecv`]: payloads of at
/// least [`DIRECT_RECV_MIN`] bytes are then received straight into the store
/// whenever a whole one is already queued and the ring has room, and are
/// acknowledged once committed there; otherwise they take the buffered path.
pub async fn serve_stream_direct<R, W>(
    mut reader: R,
    mut writer: W,
    mut conn: Connection,
    expect_hello: bool,
    mut stop: ShutdownSignal,
) -> Result<StreamEnd>
where
    R: AsyncRead + DirectRecv + Unpin + Send,
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
    let mut acks = Acks {
        writer,
        failed: None,
    };
    // One stop future for the connection's lifetime: registering a waiter on the
    // shared shutdown channel per read (and dropping it) costs two contended locks.
    // Reads and ack writes are polled first; the stop future only when they wait
    // (Tokio's cooperative budget makes a busy stream wait now and then, and every
    // push sees a server shutdown at once).
    let stopped = server_stop.wait_or(&mut stop);
    tokio::pin!(stopped);
    let ps = conn.spec().payload_size();
    let mut low_water = 1;
    let direct = ps >= DIRECT_RECV_MIN && setup_direct(&reader, ps, conn.peer());
    if direct {
        low_water = ps;
    }
    let mut busy = busy_poll_for(&reader, ps, conn.limits().busy_poll);
    loop {
        if direct && sp.ready() == 0 && sp.partial_len() == 0 {
            if low_water != ps {
                reader.set_low_water(ps)?;
                low_water = ps;
            }
            // Wait, without reading, until a whole payload is queued. Readiness
            // seen first may be stale (this loop reads past the runtime's back);
            // readiness after a wake-up with less than a payload queued means the
            // kernel wants the bytes read (end of stream, an error, memory
            // pressure, a closing window): the buffered path below reads them.
            // So does part of a payload that stays queued for DIRECT_RECV_STALL
            // (a slow peer, or a window too small for the rest to come).
            let mut woke = false;
            let whole = loop {
                match reader.queued(ps, !woke) {
                    Ok(q) if q >= ps => break q / ps,
                    Ok(_) => break 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && !woke => {
                        let partial = reader.queued(0, false)? > 0;
                        let readable = reader.readable();
                        let wait = async move {
                            if partial {
                                timeout(DIRECT_RECV_STALL, readable).await.ok()
                            } else {
                                Some(readable.await)
                            }
                        };
                        let closed = tokio::select! {
                            biased;
                            r = wait => match r {
                                Some(r) => r?,
                                None => true,
                            },
                            _ = &mut stopped => return Ok(StreamEnd::Shutdown),
                        };
                        if closed {
                            break 0;
                        }
                        woke = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                    Err(e) => return Err(e.into()),
                }
            };
            if whole > 0 {
                match conn.try_recv_direct(whole, |res| recv_reserved(&reader, res)) {
                    Ok(Some(n)) => {
                        tokio::select! {
                            biased;
                            () = acks.send(n, conn.peer()) => {}
                            _ = &mut stopped => return Ok(StreamEnd::Shutdown),
                        }
                        continue;
                    }
                    // Payloads of this connection wait in its queue: they go first.
                    Ok(None) if conn.has_queued() => {}
                    Ok(None) => {
                        // The ring is full: wait for room with the payload left in
                        // the kernel's queue (which holds back the peer).
                        tokio::select! {
                            biased;
                            r = conn.store_room() => match r {
                                Ok(()) => {}
                                Err(Error::Shutdown) => return Ok(StreamEnd::Shutdown),
                                Err(e) => return Err(e),
                            },
                            _ = &mut stopped => return Ok(StreamEnd::Shutdown),
                        }
                        continue;
                    }
                    Err(Error::Shutdown) => return Ok(StreamEnd::Shutdown),
                    Err(e) => return Err(e),
                }
            }
        }
        if direct {
            // Wake up once the payload in the buffer can be completed.
            let want = ps - sp.partial_len();
            if low_water != want {
                reader.set_low_water(want)?;
                low_water = want;
            }
        }
        let asked = sp.spare().len();
        // A drained stream: poll it for a moment before parking.
        let spun = busy_recv(&mut busy, &mut reader, sp.spare()).await;
        let n = match spun {
            Some(r) => r?,
            None => tokio::select! {
                biased;
                r = reader.read(sp.spare()) => r?,
                _ = &mut stopped => return Ok(StreamEnd::Shutdown),
            },
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
            let n_acks = match conn.push(chunk).await {
                Ok(n) => n,
                Err(Error::Shutdown) => return Ok(StreamEnd::Shutdown),
                Err(e) => return Err(e),
            };
            tokio::select! {
                biased;
                () = acks.send(n_acks, conn.peer()) => {}
                _ = &mut stopped => return Ok(StreamEnd::Shutdown),
            }
        }
        if eof {
            let partial = sp.partial_len();
            if let Some(e) = acks.failed {
                return Err(e.into());
            }
            let _ = timeout(std::time::Duration::from_secs(1), acks.writer.shutdown()).await;
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
    type Reader: AsyncRead + DirectRecv + Unpin + Send + 'static;
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
                _ = server_stop.wait_or(&mut stop) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = acceptor.accept() => match accepted {
                    Ok((r, w, peer)) => match ingress.open(scheme, peer.clone()) {
                        Ok(conn) => {
                            let stop = conn_stop.clone();
                            tasks.spawn(async move {
                                match serve_stream_direct(r, w, conn, expect_hello, stop).await {
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
    /// Payloads handed over as `Bytes` (and earlier contents of `buf`), in
    /// stream order, all before `buf`.
    queue: VecDeque<Bytes>,
    /// Copies of borrowed payloads.
    buf: Vec<u8>,
    closing: bool,
}

impl OutState {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.buf.is_empty()
    }
}

/// Payloads of at least this many bytes handed to a buffered [`StreamClient`]
/// as `Bytes` ([`Client::send_bytes`]) are queued by reference instead of
/// copied into its outgoing buffer, and reach the writer as a write of their
/// own (smaller ones are copied, so that many of them still go out in one
/// write).
pub const OWNED_QUEUE_MIN: usize = 16 * 1024;

/// Payloads of at least this many bytes are written by [`StreamClient`] straight
/// from the caller's buffer, inside `send`; smaller ones are copied into an
/// outgoing buffer that a writer task flushes, many payloads per write.
pub const DIRECT_WRITE_MIN: usize = 64 * 1024;

type BoxWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// How payloads leave a [`StreamClient`].
enum Output {
    /// Copied into the outbox (or queued there, [`OWNED_QUEUE_MIN`]); a writer
    /// task flushes it.
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
/// (Payloads of [`OWNED_QUEUE_MIN`] bytes or more handed over as `Bytes` are
/// queued by reference instead of copied.) Payloads of [`DIRECT_WRITE_MIN`]
/// bytes or more are written from the caller's buffer inside `send`, saving a
/// copy. Either way at most `max_inflight` are unacknowledged.
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
        Self::connect_socket(Plain(reader), writer, spec, options, send_hello, peer).await
    }

    /// [`connect`](Self::connect) for a socket whose read half can be read
    /// without waiting ([`DirectRecv::recv_now`]): while payloads are in flight,
    /// the client polls it for acks for up to
    /// [`ClientOptions::busy_poll`](crate::ClientOptions) before parking.
    pub async fn connect_socket<R, W>(
        reader: R,
        writer: W,
        spec: &Spec,
        options: &ClientOptions,
        send_hello: bool,
        peer: String,
    ) -> Result<StreamClient>
    where
        R: AsyncRead + DirectRecv + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let direct = spec.payload_size() >= DIRECT_WRITE_MIN;
        Self::connect_with(reader, writer, spec, options, send_hello, peer, direct).await
    }

    /// [`connect`](Self::connect) that always puts payloads into the outbox
    /// (copied, or queued by reference, see [`OWNED_QUEUE_MIN`]; never written
    /// inside `send`), so `send` waits only for the in-flight
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
        Self::connect_with(
            Plain(reader),
            writer,
            spec,
            options,
            send_hello,
            peer,
            false,
        )
        .await
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
        R: AsyncRead + DirectRecv + Unpin + Send + 'static,
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
        let busy = busy_poll_for(&reader, spec.payload_size(), options.busy_poll);
        let reader = tokio::spawn(read_acks(reader, window.clone(), peer.clone(), busy));
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
        self.send_either(payload, None).await
    }

    /// [`Client::send_bytes`] without boxing the future: a buffered client
    /// queues payloads of [`OWNED_QUEUE_MIN`] bytes or more by reference; a
    /// direct one writes from `payload` as [`send_payload`](Self::send_payload)
    /// does.
    pub async fn send_payload_bytes(&mut self, payload: Bytes) -> Result<()> {
        self.send_either(&payload, Some(&payload)).await
    }

    /// `payload`, and the same bytes as `Bytes` when the caller handed them over.
    async fn send_either(&mut self, payload: &[u8], owned: Option<&Bytes>) -> Result<()> {
        crate::transport::check_send(self.closed, &self.peer, self.payload_size, payload)?;
        match &mut self.output {
            Output::Buffered { outbox, .. } => {
                self.window.acquire(1).await?;
                let was_empty = {
                    let mut st = outbox.state.lock().unwrap_or_else(|e| e.into_inner());
                    let was_empty = st.is_empty();
                    match owned {
                        Some(b) if b.len() >= OWNED_QUEUE_MIN => {
                            if !st.buf.is_empty() {
                                let earlier = Bytes::from(std::mem::take(&mut st.buf));
                                st.queue.push_back(earlier);
                            }
                            st.queue.push_back(b.clone());
                        }
                        _ => st.buf.extend_from_slice(payload),
                    }
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
                // A payload whose flush was cancelled is flushed with this one.
                settle_cancelled(pending, &self.window, &self.peer, self.payload_size)?;
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
                r.map_err(|e| lost(&self.window, &self.peer, e))
            }
        }
    }

    /// [`Client::wait`] without boxing the future.
    pub async fn wait_acked(&mut self) -> Result<()> {
        if let Output::Direct { writer, pending } = &mut self.output {
            if settle_cancelled(pending, &self.window, &self.peer, self.payload_size)? {
                if let Some(w) = writer.get_mut().unwrap_or_else(|e| e.into_inner()) {
                    // Cancelled again here, the payload still counts as sent and
                    // the next call flushes it.
                    *pending = Some(self.payload_size);
                    let r = w.flush().await;
                    *pending = None;
                    r.map_err(|e| lost(&self.window, &self.peer, e))?;
                }
            }
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
                // After a write cancelled half-way, just drop the stream (a
                // payload written whole is flushed by the shutdown).
                let in_step =
                    matches!(*pending, None | Some(0)) || *pending == Some(self.payload_size);
                if let (Some(mut w), true) = (w, in_step) {
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

/// A write or read on the connection to `peer` failed: closes `window` (so
/// every waiting and later call gets the reason) and returns that reason.
fn lost(window: &InflightWindow, peer: &str, e: io::Error) -> Error {
    let msg = format!("connection to {peer} lost: {e}");
    window.close(msg.clone());
    Error::closed(msg)
}

/// Deals with a direct `send` that was cancelled: one that wrote nothing gives its
/// window slot back; one that wrote its whole payload and was cancelled while
/// flushing counts as sent, and returns true (the writer still owes a flush,
/// which the next write's flush, `wait` or `close` gives it); one that wrote
/// part of a payload leaves the stream out of step, which closes the client.
fn settle_cancelled(
    pending: &mut Option<usize>,
    window: &InflightWindow,
    peer: &str,
    payload_size: usize,
) -> Result<bool> {
    match pending.take() {
        None => Ok(false),
        Some(0) => {
            window.unsend(1);
            Ok(false)
        }
        Some(done) if done == payload_size => Ok(true),
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

async fn read_acks<R: AsyncRead + DirectRecv + Unpin>(
    mut reader: R,
    window: Arc<InflightWindow>,
    peer: String,
    mut busy: BusyPoll,
) {
    let mut buf = [0u8; 4096];
    loop {
        // With payloads in flight, acks are due: poll for them for a moment
        // before parking.
        let polled = if window.inflight() > 0 {
            busy_recv(&mut busy, &mut reader, &mut buf).await
        } else {
            None
        };
        let r = match polled {
            Some(r) => r,
            None => reader.read(&mut buf).await,
        };
        match r {
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
                lost(&window, &peer, e);
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
    let mut queue = VecDeque::new();
    loop {
        outbox.notify.notified().await;
        let closing = {
            let mut st = outbox.state.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut st.buf, &mut local);
            std::mem::swap(&mut st.queue, &mut queue);
            st.closing
        };
        if !local.is_empty() || !queue.is_empty() {
            let r = async {
                // Queued bytes come first: they were all sent before `local`'s.
                while let Some(chunk) = queue.pop_front() {
                    writer.write_all(&chunk).await?;
                }
                writer.write_all(&local).await?;
                writer.flush().await
            }
            .await;
            if let Err(e) = r {
                lost(&window, &peer, e);
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

    async fn send_bytes(&mut self, payload: Bytes) -> Result<()> {
        self.send_payload_bytes(payload).await
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

#[cfg(test)]
mod tests {
    use std::task::{Poll, Waker};

    use tokio::io::DuplexStream;

    use super::*;
    use crate::testkit::{kit_sample, kit_spec, kit_verify};
    use crate::Server;

    /// What a mock socket's receive queue holds, and what was done with it.
    #[derive(Default)]
    struct Queue {
        bytes: Vec<u8>,
        pos: usize,
        closed: bool,
        fail_recv: bool,
        low_water: usize,
        /// Largest low-water mark the "kernel" accepts.
        cap: Option<usize>,
        /// Bytes read by `recv_now` (direct receives, and busy polling's reads).
        direct_bytes: usize,
        recv_now_calls: usize,
        buffered_bytes: usize,
        waker: Option<Waker>,
        /// Answer `false` to `worth_polling`.
        not_worth_polling: bool,
    }

    impl Queue {
        fn queued(&self) -> usize {
            self.bytes.len() - self.pos
        }
    }

    /// A read half with a receive queue the test fills, supporting direct receives.
    #[derive(Clone, Default)]
    struct Mock(Arc<Mutex<Queue>>);

    impl Mock {
        fn q(&self) -> std::sync::MutexGuard<'_, Queue> {
            self.0.lock().unwrap()
        }

        fn push(&self, bytes: &[u8]) {
            let mut q = self.q();
            q.bytes.extend_from_slice(bytes);
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        }

        fn close(&self) {
            let mut q = self.q();
            q.closed = true;
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        }
    }

    impl AsyncRead for Mock {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut q = self.q();
            let n = q.queued().min(buf.remaining());
            if n > 0 {
                let at = q.pos;
                buf.put_slice(&q.bytes[at..at + n]);
                q.pos += n;
                q.buffered_bytes += n;
                return Poll::Ready(Ok(()));
            }
            if q.closed {
                return Poll::Ready(Ok(()));
            }
            q.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl DirectRecv for Mock {
        fn set_low_water(&self, bytes: usize) -> io::Result<Option<usize>> {
            let mut q = self.q();
            q.low_water = bytes.min(q.cap.unwrap_or(usize::MAX));
            Ok(Some(q.low_water))
        }

        fn queued(&self, min: usize, forget: bool) -> io::Result<usize> {
            let n = self.q().queued();
            if forget && n < min {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }

        fn recv_now(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            let mut q = self.q();
            if q.fail_recv {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            if bufs.is_empty() {
                return Ok(0);
            }
            q.recv_now_calls += 1;
            // Like a non-blocking socket: nothing queued is WouldBlock, not EOF.
            if q.queued() == 0 && !q.closed {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut total = 0;
            for b in bufs.iter_mut() {
                let n = q.queued().min(b.len());
                let at = q.pos;
                b[..n].copy_from_slice(&q.bytes[at..at + n]);
                q.pos += n;
                total += n;
            }
            q.direct_bytes += total;
            Ok(total)
        }

        fn worth_polling(&self) -> bool {
            !self.q().not_worth_polling
        }

        fn readable(&self) -> impl Future<Output = io::Result<bool>> + Send {
            let m = self.clone();
            std::future::poll_fn(move |cx| {
                let mut q = m.q();
                if q.closed {
                    Poll::Ready(Ok(true))
                } else if q.queued() >= q.low_water.max(1) {
                    Poll::Ready(Ok(false))
                } else {
                    q.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        }
    }

    struct Served {
        server: Server,
        mock: Mock,
        peer: DuplexStream,
        task: JoinHandle<Result<StreamEnd>>,
        spec: Spec,
    }

    /// Serves a mock stream for payloads of 64 KiB (three leaves) in batches of
    /// `batch`, and reads the handshake off the peer's end.
    async fn serve(batch: usize, mock: Mock) -> Served {
        serve_spec(
            kit_spec(DIRECT_RECV_MIN),
            batch,
            mock,
            std::time::Duration::ZERO,
        )
        .await
    }

    /// [`serve`] for any spec, with `busy_poll` (these tests are single-threaded,
    /// where a poll would only spin: it is off but in the test of polling).
    async fn serve_spec(
        spec: Spec,
        batch: usize,
        mock: Mock,
        busy_poll: std::time::Duration,
    ) -> Served {
        let server = Server::builder(spec.clone())
            .batch_size(batch)
            .limits(crate::Limits {
                busy_poll,
                ..crate::Limits::default()
            })
            .build()
            .unwrap();
        let conn = server.ingress().open("mock", "mock-peer").unwrap();
        let (w, mut peer) = tokio::io::duplex(1 << 16);
        let stop = Stopper::default();
        let signal = stop.signal();
        let reader = mock.clone();
        let task = tokio::spawn(async move {
            let _stop = stop;
            serve_stream_direct(reader, w, conn, false, signal).await
        });
        let hs = wire::handshake_bytes(&spec.wire());
        let mut got = vec![0u8; hs.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hs);
        Served {
            server,
            mock,
            peer,
            task,
            spec,
        }
    }

    fn sample(spec: &Spec, seq: u32) -> Vec<u8> {
        let mut p = Vec::new();
        kit_sample(spec, 7, seq, &mut p);
        p
    }

    async fn read_acks(peer: &mut DuplexStream, n: usize) {
        let mut acks = vec![0u8; n];
        peer.read_exact(&mut acks).await.unwrap();
        assert!(acks.iter().all(|&b| b == wire::ACK), "{acks:?}");
    }

    /// The `(client, seq)` of every sample of the next batch.
    async fn next_ids(server: &Server) -> Option<Vec<(u32, u32)>> {
        let spec = server.spec().clone();
        let b = server.next_batch().await?;
        let (mut p, mut s) = (Vec::new(), Vec::new());
        Some(
            (0..b.len())
                .map(|k| {
                    b.copy_sample(k, &mut p);
                    kit_verify(&spec, &p, &mut s).unwrap()
                })
                .collect(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_whole_payloads_are_received_in_place_and_acked_once_stored() {
        let mock = Mock::default();
        let spec = kit_spec(DIRECT_RECV_MIN);
        let three: Vec<u8> = (0..3).flat_map(|i| sample(&spec, i)).collect();
        mock.push(&three);
        let mut s = serve(4, mock).await;
        read_acks(&mut s.peer, 3).await;
        assert_eq!(s.mock.q().low_water, s.spec.payload_size());
        s.mock.push(&sample(&s.spec, 3));
        read_acks(&mut s.peer, 1).await;
        assert_eq!(
            next_ids(&s.server).await.unwrap(),
            [(7, 0), (7, 1), (7, 2), (7, 3)]
        );
        let counts = {
            let q = s.mock.q();
            (q.direct_bytes, q.buffered_bytes)
        };
        assert_eq!(
            counts,
            (4 * s.spec.payload_size(), 0),
            "every payload went straight into the store"
        );
        s.mock.close();
        assert_eq!(s.task.await.unwrap().unwrap(), StreamEnd::Eof);
        let mut rest = Vec::new();
        s.peer.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "one ack per payload, nothing else: {rest:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_arriving_in_pieces_reserves_nothing_until_it_is_whole() {
        let mut s = serve(1, Mock::default()).await;
        let p = sample(&s.spec, 0);
        let third = p.len() / 3;
        s.mock.push(&p[..third]);
        // Give the server every chance to (wrongly) reserve a slot meanwhile.
        tokio::time::sleep(DIRECT_RECV_STALL * 3).await;
        assert_eq!(
            s.server.metrics().store_size,
            0,
            "no slot held for a partial payload"
        );
        s.mock.push(&p[third..2 * third]);
        tokio::time::sleep(DIRECT_RECV_STALL * 3).await;
        assert_eq!(s.server.metrics().store_size, 0);
        s.mock.push(&p[2 * third..]);
        read_acks(&mut s.peer, 1).await;
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 0)]);
        // The next payload arrives whole: straight into the store.
        let before = s.mock.q().direct_bytes;
        s.mock.push(&sample(&s.spec, 1));
        read_acks(&mut s.peer, 1).await;
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 1)]);
        assert_eq!(s.mock.q().direct_bytes - before, p.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_of_stream_mid_payload_stores_nothing_partial() {
        let mut s = serve(1, Mock::default()).await;
        let p0 = sample(&s.spec, 0);
        let p1 = sample(&s.spec, 1);
        let half = p1.len() / 2;
        s.mock.push(&[&p0[..], &p1[..half]].concat());
        s.mock.close();
        assert_eq!(
            s.task.await.unwrap().unwrap(),
            StreamEnd::EofMidPayload { discarded: half }
        );
        read_acks(&mut s.peer, 1).await;
        s.server.shutdown().await.unwrap();
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 0)]);
        assert_eq!(next_ids(&s.server).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_direct_read_ends_the_store_instead_of_leaving_a_hole() {
        let mut s = serve(1, Mock::default()).await;
        s.mock.push(&sample(&s.spec, 0));
        read_acks(&mut s.peer, 1).await;
        // The "kernel" reported the next payload queued, then failed to hand it over.
        s.mock.q().fail_recv = true;
        s.mock.push(&sample(&s.spec, 1));
        let e = s.task.await.unwrap().unwrap_err();
        assert!(
            e.to_string().contains("store ends before their batch"),
            "{e}"
        );
        // The acknowledged payload is still delivered; the broken batch is not,
        // and nothing after it.
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 0)]);
        assert_eq!(next_ids(&s.server).await, None);
        let e = s.server.shutdown().await.unwrap_err();
        assert!(
            e.to_string().contains("mock-peer: receiving 1 payload(s)"),
            "{e}"
        );
        let mut rest = Vec::new();
        s.peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the failed payload was not acknowledged");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_payloads_still_queued_when_acks_fail_are_delivered() {
        // Batches of one: a reservation never crosses a batch, so the two
        // payloads queued together are received (and acked) one at a time.
        let mut s = serve(1, Mock::default()).await;
        s.mock.push(&sample(&s.spec, 0));
        read_acks(&mut s.peer, 1).await;
        // The peer goes away (as after a reset): the next ack write fails with
        // a whole payload still queued behind the one being acked, and part of
        // a third.
        drop(s.peer);
        let p3 = sample(&s.spec, 3);
        s.mock.push(
            &[
                sample(&s.spec, 1),
                sample(&s.spec, 2),
                p3[..p3.len() / 2].to_vec(),
            ]
            .concat(),
        );
        s.mock.close();
        let e = s.task.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::BrokenPipe),
            "the ack failure is reported: {e}"
        );
        s.server.shutdown().await.unwrap();
        let mut ids = Vec::new();
        while let Some(b) = next_ids(&s.server).await {
            ids.extend(b);
        }
        assert_eq!(
            ids,
            [(7, 0), (7, 1), (7, 2)],
            "every whole payload, nothing partial"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receive_buffer_too_small_for_two_payloads_means_buffered_reads() {
        let mock = Mock::default();
        let spec = kit_spec(DIRECT_RECV_MIN);
        mock.q().cap = Some(spec.payload_size() * 2 - 1);
        let mut s = serve(2, mock).await;
        let two: Vec<u8> = (0..2).flat_map(|i| sample(&spec, i)).collect();
        s.mock.push(&two);
        read_acks(&mut s.peer, 2).await;
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 0), (7, 1)]);
        let q = s.mock.q();
        assert_eq!((q.direct_bytes, q.buffered_bytes), (0, two.len()));
        assert_eq!(q.low_water, 1, "mark reset for buffered reads");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_stream_is_polled_for_its_next_bytes_before_it_parks() {
        let spec = kit_spec(64);
        let mock = Mock::default();
        let mut s = serve_spec(spec.clone(), 2, mock, std::time::Duration::from_secs(2)).await;
        let first = sample(&spec, 0);
        s.mock.push(&first);
        read_acks(&mut s.peer, 1).await;
        // The server drained the stream; wait until it is seen polling.
        let polls = || s.mock.q().recv_now_calls;
        let before = polls();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while polls() < before + 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the drained stream is not polled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Bytes that come now without a wake-up: only a poll can find them (a
        // parked read would wait forever).
        let second = sample(&spec, 1);
        {
            let mut q = s.mock.q();
            q.bytes.extend_from_slice(&second);
            q.waker = None;
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            read_acks(&mut s.peer, 1),
        )
        .await
        .expect("bytes that came without a wake-up were found by polling");
        assert_eq!(next_ids(&s.server).await.unwrap(), [(7, 0), (7, 1)]);
        let (direct, buffered) = {
            let q = s.mock.q();
            (q.direct_bytes, q.buffered_bytes)
        };
        assert_eq!(buffered + direct, first.len() + second.len());
    }

    #[test]
    fn streams_not_worth_polling_get_no_budget() {
        let second = std::time::Duration::from_secs(1);
        let mock = Mock::default();
        assert_eq!(busy_poll_for(&mock, 64, second).budget(), second);
        assert!(busy_poll_for(&mock, 64 * 1024, second).budget().is_zero());
        mock.q().not_worth_polling = true;
        assert!(busy_poll_for(&mock, 64, second).budget().is_zero());
    }
    /// A client half over an in-memory pipe whose peer has already sent the
    /// handshake for `spec`: the client's reader and writer, and the peer.
    async fn handshaken(
        spec: &Spec,
        capacity: usize,
    ) -> (
        tokio::io::ReadHalf<DuplexStream>,
        tokio::io::WriteHalf<DuplexStream>,
        DuplexStream,
    ) {
        let (ours, mut peer) = tokio::io::duplex(capacity);
        peer.write_all(&wire::handshake_bytes(&spec.wire()))
            .await
            .unwrap();
        let (r, w) = tokio::io::split(ours);
        (r, w, peer)
    }

    /// The peer's side: reads `n` payloads of `len` bytes, acknowledging each,
    /// and returns them (and itself, so that the pipe stays open).
    fn read_and_ack(
        mut peer: DuplexStream,
        n: usize,
        len: usize,
    ) -> tokio::task::JoinHandle<(Vec<Vec<u8>>, DuplexStream)> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let mut p = vec![0u8; len];
                peer.read_exact(&mut p).await.unwrap();
                got.push(p);
                peer.write_all(&[wire::ACK]).await.unwrap();
            }
            (got, peer)
        })
    }

    /// A buffered client fed payloads both ways: what the peer reads is every
    /// payload, whole and in order, whether it was copied into the outgoing
    /// buffer (borrowed, or owned and small) or queued by reference.
    async fn buffered_sends_case(size: usize) {
        let spec = kit_spec(size);
        let (r, w, peer) = handshaken(&spec, 1 << 16).await;
        let opts = ClientOptions {
            max_inflight: 4,
            ..ClientOptions::default()
        };
        let mut client = StreamClient::connect_buffered(r, w, &spec, &opts, false, "p".into())
            .await
            .unwrap();
        let n = 24u32;
        let want: Vec<Vec<u8>> = (0..n).map(|i| sample(&spec, i)).collect();
        let len = spec.payload_size();
        let reader = read_and_ack(peer, n as usize, len);
        for (i, p) in want.iter().enumerate() {
            // Runs of each kind, so that queued payloads follow copied ones
            // and the other way round.
            if i % 5 < 2 {
                client.send_payload(p).await.unwrap();
            } else {
                client
                    .send_payload_bytes(Bytes::from(p.clone()))
                    .await
                    .unwrap();
            }
        }
        client.wait_acked().await.unwrap();
        let (got, _peer) = reader.await.unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "payload {i} of {len} B differs");
        }
        client.close_stream().await.unwrap();
    }

    #[tokio::test]
    async fn buffered_clients_keep_owned_and_borrowed_payloads_in_order() {
        buffered_sends_case(64).await;
        buffered_sends_case(OWNED_QUEUE_MIN).await;
        buffered_sends_case(3 * OWNED_QUEUE_MIN + 4).await;
    }

    /// A writer whose flush stays pending while `hold` is set (and which keeps
    /// what it is given until flushed: wrap a `BufWriter`).
    struct FlushGate<W> {
        inner: W,
        hold: Arc<std::sync::atomic::AtomicBool>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for FlushGate<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A direct send cancelled while flushing a payload it wrote whole: the
    /// payload counts as sent, and the client goes on (`then_wait`: the next
    /// call is `wait`, which flushes it; otherwise another send).
    async fn cancelled_flush_case(then_wait: bool) {
        let spec = kit_spec(DIRECT_WRITE_MIN);
        let (r, w, peer) = handshaken(&spec, 4 * DIRECT_WRITE_MIN).await;
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let w = FlushGate {
            inner: tokio::io::BufWriter::with_capacity(1 << 20, w),
            hold: hold.clone(),
        };
        let mut client =
            StreamClient::connect(r, w, &spec, &ClientOptions::default(), false, "p".into())
                .await
                .unwrap();
        let first = sample(&spec, 0);
        let cancelled = timeout(
            std::time::Duration::from_millis(50),
            client.send_payload(&first),
        )
        .await;
        assert!(cancelled.is_err(), "the flush was held");
        hold.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut want = vec![first];
        if !then_wait {
            let second = sample(&spec, 1);
            client.send_payload(&second).await.unwrap();
            want.push(second);
        }
        let n = want.len();
        let reader = read_and_ack(peer, n, spec.payload_size());
        timeout(std::time::Duration::from_secs(10), client.wait_acked())
            .await
            .expect("every payload flushed and acknowledged")
            .unwrap();
        assert_eq!(client.stats().acked, n as u64);
        let (got, _peer) = reader.await.unwrap();
        assert!(got == want, "payloads differ");
        client.close_stream().await.unwrap();
    }

    #[tokio::test]
    async fn a_send_cancelled_while_flushing_a_whole_payload_counts_as_sent() {
        cancelled_flush_case(false).await;
        cancelled_flush_case(true).await;
    }
}

//! The server's QUIC endpoint: quinn's protocol state machine (quinn-proto)
//! driven by our own driver instead of quinn's I/O layer.
//!
//! quinn's endpoint task receives each datagram into a buffer of its own,
//! copies it into a fresh allocation, and hands it through a channel to the
//! connection's task, which decrypts it and wakes the stream's task: three
//! tasks, often on different threads, and one copy per datagram before the
//! stream driver sees a byte. Here one thread per listener runs a
//! single-threaded Tokio runtime with the driver task and the listener's
//! stream tasks. The driver owns the socket and the endpoint, receives each
//! datagram (or batch of them, with receive offload) straight into the
//! buffer it stays in, and processes it in its connection at once
//! (decryption included); a stream's task is woken only once what it waits
//! for has arrived (a whole payload when it receives directly into the
//! store), and runs on the same core, where the decrypted bytes still are.
//! What the stream tasks' reads and writes produce (acknowledgements,
//! flow-control credit) the driver sends as soon as they yield, together with
//! whatever else their connection has to say. BENCHMARKS.md ("QUIC") has the
//! measurements.
//!
//! Connections stay quinn-proto's: handshakes, loss recovery, congestion
//! control, flow control, path-MTU discovery and timers are its, unchanged;
//! this module only moves datagrams and wakes tasks. Not done here (quinn's
//! I/O layer does them): ECN (received codepoints are not passed on, so peers
//! stop marking), and answering from the local address a peer wrote to on a
//! server bound to an unspecified address with several (the kernel picks the
//! source address by its routes).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use echo_core::ingress::ShutdownSignal;
use echo_core::metrics::TransportCounters;
use echo_core::stream::{serve_stream_direct, StreamEnd};
use echo_core::Ingress;
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, Incoming, ReadError,
    ReadableError, ServerConfig, StreamEvent, StreamId, Transmit, VarInt, WriteError,
};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;

use crate::config::Peer;
use crate::recv::{ChunkQueue, StreamReader};
use crate::server::{CODE_REFUSED, CODE_SHUTDOWN};
use crate::udp;

/// Datagrams taken off the socket before the connections are driven (and
/// send what they have to say, acknowledgements among it).
const RECV_BATCH: usize = 32;
/// The smallest connection flow-control window [`Windows`] shrinks to.
const MIN_CONN_WINDOW: u64 = 256 * 1024;
/// Receives shorter than this are copied out of the receive buffer into an
/// allocation of their own size, so the buffer is reused; longer ones keep it
/// (no copy), and the next receive gets a new one. quinn-proto counts what
/// out-of-order stream data costs by the packets' sizes, so without this a
/// small datagram could pin a 64 KiB buffer it does not know of; at this size
/// a buffer is at least a quarter used (receive offload fills it with
/// datagrams of one sender).
const COPY_BELOW: usize = 16 * 1024;
/// Bytes the driver takes out of a stream ahead of its reader when the
/// reader's low-water mark is lower (it takes up to the larger of the two).
/// Taking bytes out returns their flow-control credit to the peer, so this
/// and the mark bound what a stream holds here.
const AHEAD: usize = 64 * 1024;
/// How long the driver keeps going after closing its connections at shutdown
/// (for the close frames to go out, and answer the peers' last packets).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the driver and the stream tasks share: the socket, and the driver's
/// wake-up.
pub(crate) struct Shared {
    socket: UdpSocket,
    /// quinn-udp's view of the socket: it sends each datagram from the
    /// address its connection's peer sent to (packet info), which a socket
    /// bound to a wildcard address must say, or the system picks one, and a
    /// peer that reached the host at another of its addresses drops the
    /// answer.
    state: quinn::udp::UdpSocketState,
    wake: Notify,
    /// Connections the stream tasks worked on since the driver last looked:
    /// it drives them next (sends what they queued, and sees their timers).
    touched: Mutex<Vec<ConnectionHandle>>,
}

/// Where a datagram goes, from which of the host's addresses, and with
/// which ECN mark.
#[derive(Debug, Clone, Copy)]
struct Dest {
    to: SocketAddr,
    from: Option<IpAddr>,
    ecn: Option<quinn::udp::EcnCodepoint>,
}

impl Dest {
    fn of(t: &Transmit) -> Dest {
        Dest {
            to: t.destination,
            from: t.src_ip,
            ecn: t
                .ecn
                .and_then(|e| quinn::udp::EcnCodepoint::from_bits(e as u8)),
        }
    }
}

impl Shared {
    /// Sends one datagram; `false` if the socket has no room for it now.
    /// Other errors lose the datagram, as a lossy path would.
    fn send(&self, data: &[u8], dest: Dest) -> bool {
        let transmit = quinn::udp::Transmit {
            destination: dest.to,
            ecn: dest.ecn,
            contents: data,
            segment_size: None,
            src_ip: dest.from,
        };
        // quinn-udp's `send` passes on only WouldBlock (which clears the
        // socket's readiness here) and logs other errors, at most once a
        // minute, as quinn's own endpoint does.
        let sent = self.socket.try_io(Interest::WRITABLE, || {
            self.state.send((&self.socket).into(), &transmit)
        });
        match sent {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::debug!("quic: a datagram to {} was not sent: {e}", dest.to);
                true
            }
        }
    }
}

/// One connection: quinn-proto's state and our streams', behind one lock
/// (held only for protocol work and queue updates, never across the copy of
/// a payload into the store or an await, though chunks under 16 KiB are
/// copied together under it; the driver and the stream tasks share one
/// thread, so it is never contended, but the tasks must be `Send`).
pub(crate) struct Conn {
    shared: Arc<Shared>,
    handle: ConnectionHandle,
    state: Mutex<ConnState>,
}

impl Conn {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Every update under the lock is whole: a panic elsewhere cannot leave
        // it half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a stream task's read or write: the driver sends what it queued
    /// (acknowledgements, flow-control credit) the next time it runs, which
    /// on this thread is as soon as the task yields, together with whatever
    /// else the connection has to say (fewer, fuller packets than sending
    /// from each task), and sees its timers.
    pub(crate) fn settle(&self) {
        self.shared
            .touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.handle);
        self.shared.wake.notify_one();
    }
}

/// A connection's state (see [`Conn`]).
pub(crate) struct ConnState {
    pub(crate) conn: quinn_proto::Connection,
    pub(crate) streams: HashMap<StreamId, Slot>,
    /// Why the connection ended, once it has.
    lost: Option<ConnectionError>,
    /// A datagram the socket had no room for; it goes before any other.
    stash: Option<(Vec<u8>, Dest)>,
    /// A pull took bytes that earn the peer flow-control credit the driver
    /// has yet to send (see [`StreamReader`]'s reads).
    pub(crate) credit_due: bool,
}

/// A served stream's receive queue and waiting tasks.
pub(crate) struct Slot {
    /// Bytes taken out of quinn-proto and not read yet.
    pub(crate) queue: ChunkQueue,
    /// The reader's low-water mark (at least 1).
    pub(crate) low_water: usize,
    /// Queued bytes the waiting reader needs before it is woken.
    want: usize,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The peer finished the stream and every byte is queued.
    pub(crate) eof: bool,
    /// The stream failed (reset by the peer, or its connection was lost); not
    /// yet passed on to the reader.
    failed: Option<io::Error>,
    /// Reader and writer handles still alive.
    handles: u8,
}

impl Slot {
    fn new() -> Self {
        Slot {
            queue: ChunkQueue::default(),
            low_water: 1,
            want: 1,
            reader: None,
            writer: None,
            eof: false,
            failed: None,
            handles: 2,
        }
    }

    pub(crate) fn ended(&self) -> bool {
        self.eof || self.failed.is_some()
    }

    /// How much the stream's queue is filled up to: its reader's mark, or
    /// [`AHEAD`] if that is more.
    pub(crate) fn target(&self) -> usize {
        self.low_water.max(AHEAD)
    }

    /// What a read finds once the queue is empty: the end (0), the error,
    /// or `WouldBlock`.
    pub(crate) fn after_queue(&mut self) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            self.eof = true;
            return Err(e);
        }
        if self.eof {
            return Ok(0);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Registers the reader to be woken once `want` bytes are queued (or the
    /// stream ended).
    pub(crate) fn wait(&mut self, cx: &Context<'_>, want: usize) {
        self.want = want.max(1);
        match &mut self.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
    }

    fn wake_reader(&mut self) {
        if self.queue.len() >= self.want || self.ended() {
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn fail(&mut self, e: io::Error) {
        if !self.ended() {
            self.failed = Some(e);
        }
        self.wake_reader();
        self.wake_writer();
    }
}

impl ConnState {
    /// Sends everything the connection has to send, building each datagram
    /// in `tx`; `true` if the socket filled up first (the rest waits in
    /// `stash` and in quinn-proto).
    fn flush(&mut self, shared: &Shared, now: Instant, tx: &mut Vec<u8>) -> bool {
        if let Some((data, dest)) = &self.stash {
            if !shared.send(data, *dest) {
                return true;
            }
            self.stash = None;
        }
        loop {
            tx.clear();
            let Some(t) = self.conn.poll_transmit(now, 1, tx) else {
                return false;
            };
            let (data, dest) = (&tx[..t.size], Dest::of(&t));
            if !shared.send(data, dest) {
                self.stash = Some((data.to_vec(), dest));
                return true;
            }
        }
    }

    /// Takes bytes of stream `id` out of quinn-proto into its queue until it
    /// holds `want` (or the stream has no more for now, or ended).
    pub(crate) fn pull(&mut self, id: StreamId, want: usize) {
        let Some(slot) = self.streams.get_mut(&id) else {
            return;
        };
        if slot.ended() || slot.queue.len() >= want {
            return;
        }
        let mut stream = self.conn.recv_stream(id);
        let mut chunks = match stream.read(true) {
            Ok(chunks) => chunks,
            Err(ReadableError::ClosedStream) | Err(ReadableError::IllegalOrderedRead) => {
                // Only a lost connection closes a stream we have not seen end.
                slot.failed = Some(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the stream's connection closed",
                ));
                return;
            }
        };
        while slot.queue.len() < want {
            match chunks.next(want - slot.queue.len()) {
                Ok(Some(chunk)) => slot.queue.push(chunk.bytes),
                Ok(None) => {
                    slot.eof = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(code)) => {
                    slot.failed = Some(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("the peer reset the stream (code {code})"),
                    ));
                    break;
                }
            }
        }
        if chunks.finalize().should_transmit() {
            self.credit_due = true;
        }
    }

    /// The error a stream operation gets once the connection is gone.
    pub(crate) fn lost_error(&self) -> Option<io::Error> {
        self.lost.as_ref().map(lost_io)
    }

    /// A stream handle is gone; the slot goes with the last one.
    pub(crate) fn release(&mut self, id: StreamId) {
        if let Some(slot) = self.streams.get_mut(&id) {
            slot.handles -= 1;
            if slot.handles == 0 {
                self.streams.remove(&id);
            }
        }
    }
}

/// The write half of a served stream (acknowledgements and the handshake).
/// Dropping it finishes the stream.
pub(crate) struct StreamWriter {
    conn: Arc<Conn>,
    id: StreamId,
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.conn.lock();
        if let Some(e) = st.lost_error() {
            return Poll::Ready(Err(e));
        }
        let written = st.conn.send_stream(self.id).write(buf);
        match written {
            Ok(n) => {
                self.conn.settle();
                Poll::Ready(Ok(n))
            }
            Err(WriteError::Blocked) => {
                if let Some(slot) = st.streams.get_mut(&self.id) {
                    slot.writer = Some(cx.waker().clone());
                }
                // quinn-proto queued a (STREAM_)DATA_BLOCKED frame.
                self.conn.settle();
                Poll::Pending
            }
            Err(WriteError::Stopped(code)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the peer stopped reading the stream (code {code})"),
            ))),
            Err(WriteError::ClosedStream) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the stream is closed",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The driver sends what was written as soon as this task yields.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.conn.lock();
        let _ = st.conn.send_stream(self.id).finish();
        self.conn.settle();
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        let mut st = self.conn.lock();
        // Already finished, reset or stopped: nothing to do.
        let _ = st.conn.send_stream(self.id).finish();
        st.release(self.id);
        self.conn.settle();
    }
}

/// The configs connections are accepted with, one per connection
/// flow-control window the driver may give them, largest first, and the
/// receive buffer those windows share.
///
/// A connection's window (`conn_window`) is the most it can have in flight
/// towards the server; all of the listener's connections share one UDP
/// socket, whose receive buffer drops what does not fit while the driver is
/// descheduled (four clients of four streams with 4 MiB each dropped about
/// 3,000 datagrams per 2 s run into an 8 MiB buffer, and the losses cost a
/// sixth of the throughput). So the driver divides the buffer: with `n`
/// established connections each gets the largest window that is at most
/// `budget / n` (halving from `conn_window` down to 256 KiB, the least it
/// gives), to a new connection through its transport parameters (its share
/// once it is established) and to open ones by shrinking or growing the
/// window quinn-proto grants credit from. A connection that got more credit
/// before a shrink keeps it until it has read that much; handshakes under
/// way count only for themselves.
pub(crate) struct Windows {
    /// Bytes of datagrams the socket's receive buffer can hold.
    budget: u64,
    /// (window, config for loopback peers, config for other peers).
    steps: Vec<(u64, Arc<ServerConfig>, Arc<ServerConfig>)>,
}

impl Windows {
    /// Windows from `max` down (halving, to [`MIN_CONN_WINDOW`]) that share
    /// `budget` bytes, each with the configs `config(peer, window)` builds.
    pub(crate) fn new(budget: u64, max: u64, config: impl Fn(Peer, u64) -> ServerConfig) -> Self {
        let mut steps = Vec::new();
        let mut w = max;
        loop {
            steps.push((
                w,
                Arc::new(config(Peer::Loopback, w)),
                Arc::new(config(Peer::Remote, w)),
            ));
            if w / 2 < MIN_CONN_WINDOW {
                break;
            }
            w /= 2;
        }
        Windows { budget, steps }
    }

    /// One config for every peer and every number of connections.
    #[cfg(test)]
    pub(crate) fn fixed(config: Arc<ServerConfig>) -> Self {
        Windows {
            budget: u64::MAX,
            steps: vec![(u64::MAX, config.clone(), config)],
        }
    }

    /// The config with the largest window for peers not on loopback: the
    /// endpoint's own (quinn-proto answers no connection without one, though
    /// the driver accepts each with a config of its choice).
    pub(crate) fn default_config(&self) -> Arc<ServerConfig> {
        self.steps[0].2.clone()
    }

    /// The window a single connection gets.
    pub(crate) fn for_one(&self) -> u64 {
        self.steps[self.step(1)].0
    }

    /// The step for `conns` connections: the first window within their
    /// share of the budget, or the smallest.
    fn step(&self, conns: usize) -> usize {
        let share = self.budget / conns.max(1) as u64;
        self.steps
            .iter()
            .position(|s| s.0 <= share)
            .unwrap_or(self.steps.len() - 1)
    }
}

/// The server's endpoint driver (see the module docs).
pub(crate) struct Driver {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    conns: HashMap<ConnectionHandle, Entry>,
    /// Connections with something to do (datagrams, a timer, a stream task's
    /// work), each once: only these are driven, not every connection.
    dirty: Vec<ConnectionHandle>,
    /// When connections' timers (or handshake deadlines) fire, earliest
    /// first: one entry per connection that has a timer, moved whenever it
    /// moves (so the set never holds more entries than connections).
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    /// Connections whose datagrams wait for room in the socket.
    blocked: Vec<ConnectionHandle>,
    windows: Windows,
    /// The step of [`windows`](Self::windows) open connections have.
    step: usize,
    /// A connection was established or lost: windows to share again.
    reshare: bool,
    ingress: Ingress,
    counters: Arc<TransportCounters>,
    stop: ShutdownSignal,
    max_conns: usize,
    stopping: bool,
    streams: JoinSet<()>,
    out: Vec<u8>,
    /// Where connections' datagrams are built before they are sent.
    tx: Vec<u8>,
    /// Tests only: where opened streams go instead of being served.
    #[cfg_attr(not(test), allow(dead_code))]
    tap: Option<Tap>,
}

/// A connection as the driver keeps it.
struct Entry {
    conn: Arc<Conn>,
    /// In [`Driver::dirty`].
    dirty: bool,
    /// Its entry in [`Driver::timers`].
    scheduled: Option<Instant>,
    /// While its handshake is under way: when it must be done.
    handshake_deadline: Option<Instant>,
    /// Its handshake is done and it is not lost: it shares the receive
    /// buffer ([`Windows`]).
    established: bool,
}

/// Where a tapped driver hands its streams (tests of the stream handles).
#[cfg(test)]
pub(crate) type Tap = tokio::sync::mpsc::UnboundedSender<(StreamReader, StreamWriter)>;
/// Outside tests no driver is tapped.
#[cfg(not(test))]
pub(crate) type Tap = std::convert::Infallible;

impl Driver {
    /// Starts a driver for `endpoint` on `socket`, which quinn-udp's `state`
    /// was made for (receive offload on or off: receives are split by the
    /// segment size the kernel reports),
    /// accepting connections with `windows`' configs, on a thread of its own with
    /// a single-threaded Tokio runtime that also runs its stream tasks. The
    /// returned receiver completes once it has stopped (see [`run`](Self::run)).
    ///
    /// One thread: a datagram is decrypted, and its stream's bytes copied out
    /// into the store, by the same core, and waking a stream task is a queue
    /// push instead of a wake-up of another worker (with four connections on
    /// a two-core host's shared runtime, 10,500 context switches per second
    /// instead of 2,800, and 15-35 % more CPU per MiB; BENCHMARKS.md "QUIC").
    /// The runtime is built, and the socket registered with it, on that
    /// thread (a runtime may not be dropped inside another one's tasks, which
    /// an error here would otherwise do).
    ///
    /// `tap` is for tests of the stream handles only (outside tests there is
    /// no value to give): every stream opened is handed to it (with a slot,
    /// but no ingress session and no task) instead of being served. Its
    /// receiver must stay open: handles it cannot take are dropped where
    /// they were made, under their connection's lock, which they take.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        socket: std::net::UdpSocket,
        state: quinn::udp::UdpSocketState,
        endpoint: Endpoint,
        windows: Windows,
        ingress: Ingress,
        stop: ShutdownSignal,
        max_conns: usize,
        tap: Option<Tap>,
    ) -> io::Result<oneshot::Receiver<()>> {
        socket.set_nonblocking(true)?;
        let (ready, started) = oneshot::channel::<io::Result<()>>();
        let (done, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("echo-quic".into())
            .spawn(move || {
                let setup = || -> io::Result<(tokio::runtime::Runtime, UdpSocket)> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let socket = {
                        let _entered = rt.enter();
                        UdpSocket::from_std(socket)?
                    };
                    Ok((rt, socket))
                };
                let (rt, socket) = match setup() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let driver = Driver {
                    shared: Arc::new(Shared {
                        socket,
                        state,
                        wake: Notify::new(),
                        touched: Mutex::new(Vec::new()),
                    }),
                    endpoint,
                    conns: HashMap::new(),
                    dirty: Vec::new(),
                    timers: BTreeSet::new(),
                    blocked: Vec::new(),
                    step: windows.step(0),
                    windows,
                    reshare: false,
                    counters: ingress.counters("quic"),
                    ingress,
                    stop,
                    max_conns,
                    stopping: false,
                    streams: JoinSet::new(),
                    out: Vec::new(),
                    tx: Vec::new(),
                    tap,
                };
                let _ = ready.send(Ok(()));
                rt.block_on(driver.run());
                drop(rt);
                let _ = done.send(());
            })?;
        started
            .await
            .map_err(|_| io::Error::other("the QUIC driver's thread ended while starting"))??;
        Ok(stopped)
    }

    /// Runs until the transport or the server stops: then waits for the
    /// stream tasks, closes every connection and lingers for the close frames.
    pub(crate) async fn run(mut self) {
        let mut server_stop = self.ingress.shutdown_signal();
        let mut stop = self.stop.clone();
        let mut rx = BytesMut::new();
        let mut closed_at: Option<Instant> = None;
        loop {
            self.receive(&mut rx);
            let now = Instant::now();
            let next = self.drive(now);
            let blocked = !self.blocked.is_empty();
            if self.stopping && self.streams.is_empty() {
                match closed_at {
                    None => {
                        self.close_all(now);
                        closed_at = Some(now);
                        continue;
                    }
                    Some(t) if self.conns.is_empty() || now >= t + CLOSE_LINGER => break,
                    Some(_) => {}
                }
            }
            let next = match closed_at {
                Some(t) => Some(next.map_or(t + CLOSE_LINGER, |n| n.min(t + CLOSE_LINGER))),
                None => next,
            };
            // With no timer at all, an hour (any wake-up recomputes it).
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            tokio::select! {
                _ = server_stop.wait_or(&mut stop), if !self.stopping => {
                    self.stopping = true;
                }
                Some(_) = self.streams.join_next(), if !self.streams.is_empty() => {}
                _ = self.shared.socket.readable() => {}
                _ = self.shared.wake.notified() => {}
                _ = self.shared.socket.writable(), if blocked => {}
                _ = sleep => {}
            }
        }
    }

    /// Takes up to [`RECV_BATCH`] receives' worth of datagrams off the socket
    /// and hands each datagram to the endpoint and its connection.
    fn receive(&mut self, rx: &mut BytesMut) {
        for _ in 0..RECV_BATCH {
            let got = match udp::try_recv(&self.shared.socket, rx) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::trace!("quic: receive failed: {e}");
                    rx.clear();
                    continue;
                }
            };

            let mut data = if got.len < COPY_BELOW {
                let small = BytesMut::from(&rx[..]);
                rx.clear();
                small
            } else {
                rx.split()
            };
            let now = Instant::now();
            while !data.is_empty() {
                let datagram = if data.len() > got.stride {
                    data.split_to(got.stride)
                } else {
                    std::mem::take(&mut data)
                };
                self.datagram(now, got, datagram);
            }
        }
    }

    /// One datagram to the endpoint, and on to its connection.
    fn datagram(&mut self, now: Instant, got: udp::Received, data: BytesMut) {
        self.out.clear();
        match self
            .endpoint
            .handle(now, got.from, got.local, got.ecn, data, &mut self.out)
        {
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(incoming, now),
            Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                if let Some(e) = self.conns.get(&h) {
                    e.conn.lock().conn.handle_event(ev);
                    self.mark(h);
                }
            }
            Some(DatagramEvent::Response(t)) => {
                self.shared.send(&self.out[..t.size], Dest::of(&t));
            }
            None => {}
        }
    }

    /// A peer's first packet: accepted, or refused over a limit.
    fn incoming(&mut self, incoming: Incoming, now: Instant) {
        let remote = incoming.remote_address();
        if self.stopping || self.conns.len() >= self.max_conns {
            self.counters.connections_refused.fetch_add(1, Relaxed);
            if !self.stopping {
                tracing::warn!(
                    "quic: refused {remote}: {} connections open (max_conns)",
                    self.max_conns
                );
            }
            self.out.clear();
            let t = self.endpoint.refuse(incoming, &mut self.out);
            self.shared.send(&self.out[..t.size], Dest::of(&t));
            return;
        }
        // Its share of the receive buffer once it is established.
        let step = self.windows.step(self.sharers() + 1);
        let (_, loopback, other) = &self.windows.steps[step];
        let config = if Peer::of(remote.ip()) == Peer::Loopback {
            loopback.clone()
        } else {
            other.clone()
        };
        self.out.clear();
        match self
            .endpoint
            .accept(incoming, now, &mut self.out, Some(config))
        {
            Ok((h, conn)) => {
                let conn = Arc::new(Conn {
                    shared: self.shared.clone(),
                    handle: h,
                    state: Mutex::new(ConnState {
                        conn,
                        streams: HashMap::new(),
                        lost: None,
                        stash: None,
                        credit_due: false,
                    }),
                });
                self.conns.insert(
                    h,
                    Entry {
                        conn,
                        dirty: false,
                        scheduled: None,
                        handshake_deadline: Some(now + self.ingress.limits().handshake_timeout),
                        established: false,
                    },
                );
                // Its first flight goes out with the next drive.
                self.mark(h);
            }
            Err(e) => {
                self.counters.connections_refused.fetch_add(1, Relaxed);
                tracing::info!("quic {remote}: handshake failed: {}", e.cause);
                if let Some(t) = e.response {
                    self.shared.send(&self.out[..t.size], Dest::of(&t));
                }
            }
        }
    }

    /// Connections sharing the receive buffer: established and not lost
    /// (handshakes a peer leaves unfinished do not shrink the others).
    fn sharers(&self) -> usize {
        self.conns.values().filter(|e| e.established).count()
    }

    /// Gives every connection its share of the receive buffer (see
    /// [`Windows`]) if the number of established connections changed it;
    /// connections whose window grew are driven, to send the new credit.
    fn share_windows(&mut self) {
        let step = self.windows.step(self.sharers());
        if step == self.step {
            return;
        }
        let grew = step < self.step;
        self.step = step;
        let window = VarInt::from_u64(self.windows.steps[step].0).unwrap_or(VarInt::MAX);
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for h in handles {
            if let Some(e) = self.conns.get(&h) {
                e.conn.lock().conn.set_receive_window(window);
                if grew {
                    self.mark(h);
                }
            }
        }
    }

    /// Marks connection `h` to be driven (once).
    fn mark(&mut self, h: ConnectionHandle) {
        if let Some(e) = self.conns.get_mut(&h) {
            if !e.dirty {
                e.dirty = true;
                self.dirty.push(h);
            }
        }
    }

    /// Drives the connections that have something to do: timers, handshake
    /// deadlines, endpoint and application events, sending. Returns when the
    /// next timer fires.
    fn drive(&mut self, now: Instant) -> Option<Instant> {
        let touched = std::mem::take(
            &mut *self
                .shared
                .touched
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for h in touched {
            self.mark(h);
        }
        for h in std::mem::take(&mut self.blocked) {
            self.mark(h);
        }
        while let Some(&(t, h)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(e) = self.conns.get_mut(&h) {
                e.scheduled = None;
            }
            self.mark(h);
        }
        // Connections marked while others are driven (their windows grew
        // when one was closed) are driven too before the driver waits.
        while !self.dirty.is_empty() {
            for h in std::mem::take(&mut self.dirty) {
                let Some(e) = self.conns.get_mut(&h) else {
                    continue;
                };
                e.dirty = false;
                let c = e.conn.clone();
                let mut st = c.lock();
                if st.conn.poll_timeout().is_some_and(|t| t <= now) {
                    st.conn.handle_timeout(now);
                }
                if e.handshake_deadline.is_some_and(|d| d <= now) {
                    e.handshake_deadline = None;
                    self.counters.connections_refused.fetch_add(1, Relaxed);
                    tracing::info!(
                        "quic {}: no QUIC handshake within {:?}",
                        st.conn.remote_address(),
                        self.ingress.limits().handshake_timeout
                    );
                    st.conn.close(
                        now,
                        VarInt::from_u32(CODE_REFUSED),
                        "handshake timeout".into(),
                    );
                }
                self.events(h, &c, &mut st);
                st.credit_due = false;
                if st.flush(&self.shared, now, &mut self.tx) {
                    self.blocked.push(h);
                }
                self.endpoint_events(h, &mut st);
                if st.conn.is_drained() {
                    if let Some(t) = self.conns.remove(&h).and_then(|e| e.scheduled) {
                        self.timers.remove(&(t, h));
                    }
                    drop(st);
                    self.reshare = false;
                    self.share_windows();
                    continue;
                }
                let timeout = st.conn.poll_timeout();
                drop(st);
                if std::mem::take(&mut self.reshare) {
                    self.share_windows();
                }
                if let Some(e) = self.conns.get_mut(&h) {
                    let next = match (timeout, e.handshake_deadline) {
                        (Some(t), Some(d)) => Some(t.min(d)),
                        (t, d) => t.or(d),
                    };
                    if e.scheduled != next {
                        if let Some(old) = e.scheduled {
                            self.timers.remove(&(old, h));
                        }
                        if let Some(t) = next {
                            self.timers.insert((t, h));
                        }
                        e.scheduled = next;
                    }
                }
            }
        }
        // One entry per connection at most (checked in every debug test run).
        debug_assert!(self.timers.len() <= self.conns.len());
        self.timers.first().map(|&(t, _)| t)
    }

    fn endpoint_events(&mut self, h: ConnectionHandle, st: &mut ConnState) {
        while let Some(ev) = st.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(h, ev) {
                st.conn.handle_event(back);
            }
        }
    }

    /// A connection's application events: handshakes done, connections lost,
    /// streams opened, readable and writable.
    fn events(&mut self, h: ConnectionHandle, c: &Arc<Conn>, st: &mut ConnState) {
        self.endpoint_events(h, st);
        while let Some(ev) = st.conn.poll() {
            match ev {
                Event::Connected => {
                    if let Some(e) = self.conns.get_mut(&h) {
                        e.handshake_deadline = None;
                        e.established = true;
                        self.reshare = true;
                    }
                    tracing::debug!("quic {}: connected", st.conn.remote_address());
                }
                Event::ConnectionLost { reason } => {
                    let remote = st.conn.remote_address();
                    let handshaking = match self.conns.get_mut(&h) {
                        Some(e) => {
                            if std::mem::take(&mut e.established) {
                                self.reshare = true;
                            }
                            e.handshake_deadline.take().is_some()
                        }
                        None => false,
                    };
                    if handshaking {
                        self.counters.connections_refused.fetch_add(1, Relaxed);
                        tracing::info!(
                            "quic {remote}: handshake failed: {}",
                            crate::describe_connection_error(&reason)
                        );
                    } else {
                        tracing::debug!(
                            "quic {remote}: {}",
                            crate::describe_connection_error(&reason)
                        );
                    }
                    for slot in st.streams.values_mut() {
                        slot.fail(lost_io(&reason));
                    }
                    st.lost = Some(reason);
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = st.conn.streams().accept(Dir::Bi) {
                        self.open_stream(c, st, id);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    if let Some(want) = st.streams.get(&id).map(Slot::target) {
                        st.pull(id, want);
                        if let Some(slot) = st.streams.get_mut(&id) {
                            slot.wake_reader();
                        }
                    }
                }
                Event::Stream(
                    StreamEvent::Writable { id }
                    | StreamEvent::Finished { id }
                    | StreamEvent::Stopped { id, .. },
                ) => {
                    if let Some(slot) = st.streams.get_mut(&id) {
                        slot.wake_writer();
                    }
                }
                _ => {}
            }
        }
    }

    /// A client opened stream `id`: served by core's stream driver in a task
    /// of its own, or refused (a limit, or shutdown).
    fn open_stream(&mut self, c: &Arc<Conn>, st: &mut ConnState, id: StreamId) {
        #[cfg(test)]
        if let Some(tap) = &self.tap {
            let _ = tap.send(stream_handles(c, st, id));
            return;
        }
        let remote = st.conn.remote_address();
        let peer = format!("{remote} stream {id}");
        let opened = if self.stopping {
            Err(echo_core::Error::Shutdown)
        } else {
            self.ingress.open("quic", peer.clone())
        };
        let session = match opened {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!("quic: refused {peer}: {e}");
                let code = if self.stopping {
                    CODE_SHUTDOWN
                } else {
                    CODE_REFUSED
                };
                let _ = st.conn.send_stream(id).reset(code.into());
                let _ = st.conn.recv_stream(id).stop(code.into());
                return;
            }
        };
        let (reader, writer) = stream_handles(c, st, id);
        let stop = self.stop.clone();
        self.streams.spawn(async move {
            match serve_stream_direct(reader, writer, session, true, stop).await {
                Ok(StreamEnd::EofMidPayload { discarded }) => {
                    tracing::debug!("quic {peer}: closed mid-payload, {discarded} bytes discarded")
                }
                Ok(_) => tracing::debug!("quic {peer}: closed"),
                Err(e) => tracing::info!("quic {peer}: {e}"),
            }
        });
    }

    /// Closes every connection (shutdown); their close frames go out with
    /// the drive that follows.
    fn close_all(&mut self, now: Instant) {
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for h in handles {
            if let Some(e) = self.conns.get(&h) {
                e.conn.lock().conn.close(
                    now,
                    VarInt::from_u32(CODE_SHUTDOWN),
                    "server shutting down".into(),
                );
            }
            self.mark(h);
        }
    }
}

/// What a stream's reader or writer gets once its connection was lost.
fn lost_io(e: &ConnectionError) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("connection lost: {}", crate::describe_connection_error(e)),
    )
}

/// A slot for a newly opened stream `id` and its reader and writer.
fn stream_handles(c: &Arc<Conn>, st: &mut ConnState, id: StreamId) -> (StreamReader, StreamWriter) {
    let slot = Slot::new();
    let target = slot.target();
    st.streams.insert(id, slot);
    // The stream's first bytes came with its opening.
    st.pull(id, target);
    let reader = StreamReader::new(c.clone(), id);
    let writer = StreamWriter {
        conn: c.clone(),
        id,
    };
    (reader, writer)
}

/// A tapped driver for tests of the stream handles and the driver.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use echo_core::stream::Stopper;
    use quinn::crypto::rustls::QuicClientConfig;
    use quinn_proto::crypto::rustls::QuicServerConfig;

    /// A driver on 127.0.0.1 that hands every stream opened to `tapped`, and
    /// what its tests need of it.
    pub(crate) struct Tapped {
        pub(crate) addr: SocketAddr,
        /// A quinn client config that trusts the driver's certificate.
        pub(crate) client: quinn::ClientConfig,
        /// Kept open: a tapped driver must never drop the handles it could
        /// not hand over, which would lock the connection it holds locked.
        pub(crate) tapped: tokio::sync::mpsc::UnboundedReceiver<(StreamReader, StreamWriter)>,
        /// Kept alive: the driver's ingress.
        pub(crate) _server: echo_core::Server,
        pub(crate) stopper: Stopper,
        pub(crate) stopped: oneshot::Receiver<()>,
    }

    /// Starts a tapped driver with the windows `windows` makes from the TLS
    /// config of a fresh certificate.
    pub(crate) async fn tapped_driver(
        windows: impl FnOnce(Arc<QuicServerConfig>) -> Windows,
    ) -> Tapped {
        let cert = crate::tls::self_signed(vec!["localhost".into()]).unwrap();
        let tls = crate::tls::server_config(vec![cert.cert.clone()], cert.key).unwrap();
        let windows = windows(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
        let endpoint = Endpoint::new(
            Default::default(),
            Some(windows.default_config()),
            false,
            None,
        );
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
        let addr = socket.local_addr().unwrap();
        let server = echo_core::Server::builder(echo_core::testkit::kit_spec(64))
            .build()
            .unwrap();
        let stopper = Stopper::default();
        let (tap, tapped) = tokio::sync::mpsc::unbounded_channel();
        let stopped = Driver::start(
            socket,
            state,
            endpoint,
            windows,
            server.ingress(),
            stopper.signal(),
            16,
            Some(tap),
        )
        .await
        .unwrap();
        let (client_tls, _) =
            crate::tls::client_config(vec![cert.cert], std::path::Path::new("test")).unwrap();
        let client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).unwrap()));
        Tapped {
            addr,
            client,
            tapped,
            _server: server,
            stopper,
            stopped,
        }
    }

    /// A quinn client's connection to `t`.
    pub(crate) async fn connect(t: &Tapped) -> (quinn::Endpoint, quinn::Connection) {
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = client
            .connect_with(t.client.clone(), t.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        (client, conn)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{connect, tapped_driver};
    use super::*;
    use quinn_proto::TransportConfig;
    use tokio::time::{sleep, timeout};

    const MIB: u64 = 1 << 20;

    fn windows(budget: u64, max: u64) -> Windows {
        Windows::new(budget, max, |_, _| {
            let cert = crate::tls::self_signed(vec!["localhost".into()]).unwrap();
            let tls = crate::tls::server_config(vec![cert.cert], cert.key).unwrap();
            ServerConfig::with_crypto(Arc::new(
                quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
            ))
        })
    }

    /// Each connection gets the largest window within its share of the
    /// budget, halving from the configured one down to 256 KiB.
    #[test]
    fn windows_halve_to_fit_the_share_of_each_connection() {
        let w = windows(8 * MIB, 4 * MIB);
        let sizes: Vec<u64> = w.steps.iter().map(|s| s.0).collect();
        assert_eq!(sizes, [4 * MIB, 2 * MIB, MIB, MIB / 2, MIB / 4]);
        let window = |n| w.steps[w.step(n)].0;
        assert_eq!(window(0), 4 * MIB);
        assert_eq!(window(1), 4 * MIB);
        assert_eq!(window(2), 4 * MIB);
        assert_eq!(window(3), 2 * MIB);
        assert_eq!(window(5), MIB);
        assert_eq!(window(32), MIB / 4);
        assert_eq!(window(10_000), MIB / 4, "never below the smallest");
        // A configured window below 256 KiB is the only one.
        assert_eq!(windows(MIB, 100_000).steps.len(), 1);
    }

    /// With three connections established on a listener whose receive
    /// buffer takes 1 MiB, the third can have no more than its 256 KiB share
    /// in flight: a stream its server does not read stops there, where the
    /// configured 1 MiB window would let it send four times as much.
    #[tokio::test]
    async fn connections_share_the_receive_buffer() {
        let mut t = tapped_driver(|crypto| {
            let config = |_, window: u64| {
                let mut t = TransportConfig::default();
                t.stream_receive_window(VarInt::from_u64(16 * MIB).unwrap())
                    .receive_window(VarInt::from_u64(window).unwrap());
                let mut c = ServerConfig::with_crypto(crypto.clone());
                c.transport_config(Arc::new(t));
                c
            };
            Windows::new(MIB, MIB, config)
        })
        .await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(connect(&t).await);
        }
        let conn = &clients[2].1;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let sending = tokio::spawn(async move {
            let _ = send.write_all(&vec![7u8; 4 * MIB as usize]).await;
            send
        });
        // The stream reaches the tap (whose reader never reads).
        let handles = timeout(Duration::from_secs(10), t.tapped.recv())
            .await
            .unwrap()
            .unwrap();
        // Sent until flow control stops it: no change for 300 ms. (Bytes
        // declared lost, if the socket dropped any, were sent again.)
        let sent = || {
            let s = conn.stats();
            s.udp_tx.bytes.saturating_sub(s.path.lost_bytes)
        };
        let mut last = 0;
        let mut still = 0;
        while still < 6 {
            sleep(Duration::from_millis(50)).await;
            let now = sent();
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        // Its window, the 64 KiB the driver takes out ahead of a reader,
        // the handshake and packet overhead: under 2.5 times the share.
        assert!(
            (MIB / 4..MIB * 5 / 8).contains(&last),
            "the third connection sent {last} bytes; its share is 256 KiB"
        );
        drop(handles);
        sending.abort();
        t.stopper.stop();
        for (_, conn) in &clients {
            conn.close(0u32.into(), b"done");
        }
        drop(t.tapped);
        let _ = timeout(Duration::from_secs(10), t.stopped).await;
    }
}

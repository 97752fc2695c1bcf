//! The `quic://` client: one QUIC connection, one or more bidirectional streams,
//! each running wire v1 through core's [`StreamClient`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use echo_core::stream::{StreamClient, OWNED_QUEUE_MIN};
use echo_core::transport::query_param;
use echo_core::{
    Client, ClientFactory, ClientOptions, ClientStats, Error, LatencyHistogram, Result, Spec, Url,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, Endpoint, TransportErrorCode};
use tokio::time::timeout;

use crate::config::{Peer, Tuning};
use crate::send::{FinishingSend, Lent, PiecePool};
use crate::server::{resolve, CODE_REFUSED};
use crate::tls;

/// Most streams one client may open.
pub const MAX_CLIENT_STREAMS: usize = 256;

/// Default for `linger`: how long `close` waits for the server to take what was sent.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);

/// Connects `quic://host:port` clients.
///
/// Query parameters:
/// * `ca=PATH` (required): PEM certificates to trust: the file a server that
///   generated its certificate printed, or the CA that signed the server's;
///   nothing else is trusted, and there is no unverified mode;
/// * `server_name` (default: the URL's host): the name checked against the
///   server's certificate;
/// * `streams` (default 1, or the factory's [`with_streams`](Self::with_streams)):
///   streams opened on the connection; samples go to the stream with the most
///   room, so a stalled stream does not hold up the others (with several
///   streams `send` copies each payload into its stream's outgoing buffer, or
///   with `send_bytes` queues one of 16 KiB or more there by reference, and
///   never waits on a stream's flow control). Per-client order is kept only
///   with one stream;
/// * `linger` (seconds, default 10): how long `close` waits for every sent
///   payload to be acknowledged before closing the connection anyway;
/// * the [`Tuning`] parameters.
///
/// `max_inflight` is the client's total: it is split over the streams (stream
/// *i* of *n* gets `max_inflight / n`, one more for the first `max_inflight % n`),
/// so `streams` may not exceed it.
#[derive(Debug, Clone, Copy)]
pub struct QuicClientFactory {
    default_streams: usize,
}

impl Default for QuicClientFactory {
    fn default() -> Self {
        QuicClientFactory { default_streams: 1 }
    }
}

impl QuicClientFactory {
    /// A factory whose clients open `streams` streams unless the URL says otherwise.
    pub fn with_streams(streams: usize) -> Self {
        QuicClientFactory {
            default_streams: streams,
        }
    }
}

/// A `quic://` client.
#[derive(Debug)]
pub struct QuicClient {
    peer: String,
    payload_size: usize,
    endpoint: Endpoint,
    conn: quinn::Connection,
    streams: Vec<StreamClient>,
    /// Per stream: where `send_bytes` lends its payload to the stream's writer.
    lent: Vec<Arc<Lent>>,
    caps: Vec<usize>,
    next: usize,
    linger: Duration,
    closed: bool,
}

fn url_err(url: &Url, reason: impl Into<String>) -> Error {
    Error::Url {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Per-stream windows: `total` split over `n` streams (n <= total).
fn split_window(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect()
}

/// What the client needs to connect, parsed from the URL.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    server_name: String,
    ca: PathBuf,
    streams: usize,
    tuning: Tuning,
    linger: Duration,
}

impl Target {
    async fn parse(url: &Url, default_streams: usize, options: &ClientOptions) -> Result<Target> {
        let ca = url
            .query_pairs()
            .find(|(k, _)| k == "ca")
            .map(|(_, v)| PathBuf::from(v.into_owned()))
            .ok_or_else(|| {
                url_err(
                    url,
                    "quic:// clients need ?ca=PATH: the PEM certificate the server printed \
                     at startup (or the CA that signed the server's certificate); \
                     there is no unverified mode",
                )
            })?;
        let host = url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name: String = query_param(url, "server_name", host.to_string())?;
        rustls::pki_types::ServerName::try_from(server_name.as_str()).map_err(|e| {
            url_err(
                url,
                format!("server_name {server_name:?} is not a DNS name or IP address: {e}"),
            )
        })?;
        let streams: usize = query_param(url, "streams", default_streams)?;
        if streams == 0 || streams > MAX_CLIENT_STREAMS {
            return Err(url_err(
                url,
                format!("streams must be between 1 and {MAX_CLIENT_STREAMS}, got {streams}"),
            ));
        }
        if streams > options.max_inflight {
            return Err(Error::Config(format!(
                "streams={streams} needs max_inflight of at least {streams} (each stream \
                 carries at least one payload), got {}",
                options.max_inflight
            )));
        }
        let linger = Duration::from_secs(query_param(url, "linger", DEFAULT_LINGER.as_secs())?);
        Ok(Target {
            addr: resolve(url).await?,
            server_name,
            ca,
            streams,
            tuning: Tuning::from_url(url)?,
            linger,
        })
    }
}

/// Turns a failed QUIC handshake into an error that says what went wrong.
fn handshake_error(
    e: ConnectionError,
    rejection: &tls::Rejection,
    peer: &str,
    target: &Target,
) -> Error {
    if let Some(r) = rejection.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return tls::explain_rejection(&r, peer, &target.server_name, &target.ca);
    }
    // TLS alert 120, no_application_protocol, carried as a QUIC crypto error.
    let no_alpn = TransportErrorCode::crypto(120);
    match &e {
        ConnectionError::ConnectionClosed(c) if c.error_code == no_alpn => Error::Tls(format!(
            "{peer}: ALPN mismatch: the server does not accept protocol {:?} (it is not an \
             echo quic:// server, or speaks another version)",
            String::from_utf8_lossy(tls::ALPN)
        )),
        ConnectionError::TransportError(t) if t.code == no_alpn => Error::Tls(format!(
            "{peer}: ALPN mismatch: the server did not select protocol {:?} ({t})",
            String::from_utf8_lossy(tls::ALPN)
        )),
        ConnectionError::ConnectionClosed(c)
            if c.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            Error::closed(format!(
                "{peer} refused the connection (it is at its connection limit, max_conns)"
            ))
        }
        ConnectionError::ConnectionClosed(c) => {
            Error::Tls(format!("{peer} aborted the QUIC/TLS handshake: {c}"))
        }
        ConnectionError::TransportError(t) => {
            Error::Tls(format!("QUIC/TLS handshake with {peer} failed: {t}"))
        }
        ConnectionError::TimedOut => Error::Timeout(format!(
            "no answer from {peer} to the QUIC handshake (is a quic:// server listening there?)"
        )),
        _ => Error::closed(format!("QUIC connection to {peer}: {e}")),
    }
}

/// Opens a QUIC connection to `url` (`ca`, `server_name` and tuning parameters
/// apply) without opening any stream: below the wire protocol, for tests and
/// tools that need to misbehave. Keep the endpoint alive as long as the connection.
pub async fn raw_connection(
    url: &str,
    connect_timeout: Duration,
) -> Result<(Endpoint, quinn::Connection)> {
    let url = echo_core::registry::parse_url(url)?;
    let target = Target::parse(&url, 1, &ClientOptions::default()).await?;
    let peer = format!("{}", target.addr);
    let endpoint_conn = connect_quic(&target, &peer);
    match timeout(connect_timeout, endpoint_conn).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(format!(
            "no QUIC handshake with {peer} within {connect_timeout:?}"
        ))),
    }
}

async fn connect_quic(target: &Target, peer: &str) -> Result<(Endpoint, quinn::Connection)> {
    let roots = tls::load_certs(&target.ca)?;
    let (rustls_cfg, rejection) = tls::client_config(roots, &target.ca)?;
    let crypto = QuicClientConfig::try_from(rustls_cfg)
        .map_err(|e| Error::Tls(format!("QUIC cannot use this TLS config: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let peer_kind = Peer::of(target.addr.ip());
    cfg.transport_config(Arc::new(target.tuning.transport(0, true, peer_kind)));
    let local: SocketAddr = if target.addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = target.tuning.client_socket(local, &*runtime)?;
    let endpoint =
        Endpoint::new_with_abstract_socket(target.tuning.client_endpoint(), None, socket, runtime)?;
    let connecting = endpoint
        .connect_with(cfg, target.addr, &target.server_name)
        .map_err(|e| Error::Config(format!("cannot connect to {peer}: {e}")))?;
    let conn = connecting
        .await
        .map_err(|e| handshake_error(e, &rejection, peer, target))?;
    Ok((endpoint, conn))
}

fn stream_error(e: Error, peer: &str, i: usize) -> Error {
    match e {
        Error::Io(io) if io.kind() == io::ErrorKind::ConnectionReset => Error::closed(format!(
            "{peer} refused stream {i} ({io}; error {CODE_REFUSED} means it is at its \
             max_connections limit)"
        )),
        other => other,
    }
}

/// Closes `conn` because connecting failed with `e` (returned), before the
/// streams opened so far are dropped: a stream dropped first queues its end
/// (FIN, RESET_STREAM, STOP_SENDING), and quinn-proto 0.11.19 sends no
/// CONNECTION_CLOSE while congestion control holds back such queued frames
/// (quinn issue 2785), so the server would keep the connection, and its
/// `max_conns` slot, until its idle timeout. Closed first, they queue nothing
/// more. (The loopback initial window in [`Tuning`] keeps the one case this
/// cannot cover, a stream that failed inside its own handshake, from being
/// held back early in a connection.)
fn give_up(conn: &quinn::Connection, e: Error) -> Error {
    conn.close(0u32.into(), b"client gave up connecting");
    e
}

/// Opens the client's streams on `conn`, each with its share of the window
/// (`caps`), and handshakes on each; on failure `conn` is closed first (see
/// [`give_up`]).
async fn open_streams(
    conn: &quinn::Connection,
    caps: &[usize],
    target: &Target,
    spec: &Spec,
    options: &ClientOptions,
    peer: &str,
) -> Result<(Vec<StreamClient>, Vec<Arc<Lent>>)> {
    let mut streams = Vec::with_capacity(caps.len());
    let mut lent = Vec::with_capacity(caps.len());
    let pool = Arc::new(PiecePool::new(target.tuning.send_window));
    for (i, &cap) in caps.iter().enumerate() {
        let (send, recv) = conn.open_bi().await.map_err(|e| {
            give_up(
                conn,
                Error::closed(format!("{peer}: cannot open stream {i}: {e}")),
            )
        })?;
        let opts = ClientOptions {
            max_inflight: cap,
            ..options.clone()
        };
        lent.push(Arc::new(Lent::default()));
        let writer = FinishingSend::new(send, pool.clone(), lent[i].clone(), target.linger);
        // One stream: large payloads are written straight from the caller's
        // buffer. Several: always through each stream's outbox, so `send`
        // never waits on a stream whose flow control stalled.
        let stream = if caps.len() == 1 {
            StreamClient::connect(recv, writer, spec, &opts, true, peer.to_string()).await
        } else {
            StreamClient::connect_buffered(recv, writer, spec, &opts, true, peer.to_string()).await
        }
        .map_err(|e| give_up(conn, stream_error(e, peer, i)))?;
        streams.push(stream);
    }
    Ok((streams, lent))
}

#[async_trait]
impl ClientFactory for QuicClientFactory {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        options.validate()?;
        let target = Target::parse(url, self.default_streams, options).await?;
        let peer = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => target.addr.to_string(),
        };
        let caps = split_window(options.max_inflight, target.streams);
        let started = tokio::time::Instant::now();
        let timed_out = || {
            Error::Timeout(format!(
                "connecting to {peer} with {} stream(s) took over {:?} (is a quic:// \
                 server listening there, and does its max_streams allow {0}?)",
                target.streams, options.connect_timeout
            ))
        };
        let (endpoint, conn) = timeout(options.connect_timeout, connect_quic(&target, &peer))
            .await
            .map_err(|_| timed_out())??;
        let (streams, lent) = {
            let open = open_streams(&conn, &caps, &target, spec, options, &peer);
            tokio::pin!(open);
            let left = options.connect_timeout.saturating_sub(started.elapsed());
            match timeout(left, &mut open).await {
                Ok(r) => r,
                // Closed while the streams being set up are still alive (see
                // `give_up`); they are dropped after it, with `open`.
                Err(_) => Err(give_up(&conn, timed_out())),
            }
        }?;
        Ok(Box::new(QuicClient {
            peer,
            payload_size: spec.payload_size(),
            endpoint,
            conn,
            streams,
            lent,
            caps,
            next: 0,
            linger: target.linger,
            closed: false,
        }))
    }
}

impl QuicClient {
    /// quinn's statistics for this client's connection (RTT, congestion window,
    /// losses, path MTU).
    pub fn connection_stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Streams this client sends on.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The index of an open stream with room, the one with the most, ties going
    /// round-robin; `None` when every open stream is full.
    fn pick(&self) -> Option<usize> {
        let n = self.streams.len();
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            let w = self.streams[i].window();
            if w.is_closed() {
                continue;
            }
            let room = self.caps[i].saturating_sub(w.inflight());
            if room > 0 && best.is_none_or(|(_, r)| room > r) {
                best = Some((i, room));
            }
        }
        best.map(|(i, _)| i)
    }

    /// After `send`'s checks, the stream `payload` goes to (waiting for room).
    async fn stream_for(&mut self, payload: &[u8]) -> Result<usize> {
        echo_core::check_send(self.closed, &self.peer, self.payload_size, payload)?;
        let i = match self.pick() {
            Some(i) => i,
            None => self.wait_for_room().await?,
        };
        self.next = (i + 1) % self.streams.len();
        Ok(i)
    }

    /// Waits until some stream has room; fails once every stream is closed.
    async fn wait_for_room(&self) -> Result<usize> {
        loop {
            let open: Vec<usize> = (0..self.streams.len())
                .filter(|&i| !self.streams[i].window().is_closed())
                .collect();
            if open.is_empty() {
                self.streams[0].window().check_open()?;
                return Err(Error::closed(format!("connection to {} closed", self.peer)));
            }
            // At most one of these acquires (the first to complete ends the race);
            // its slot is handed back and taken again by `StreamClient::send`.
            let waits = open
                .iter()
                .map(|&i| Box::pin(async move { (i, self.streams[i].window().acquire(1).await) }));
            let ((i, r), _, _) = futures::future::select_all(waits).await;
            if r.is_ok() {
                self.streams[i].window().unsend(1);
                return Ok(i);
            }
        }
    }
}

#[async_trait]
impl Client for QuicClient {
    fn payload_size(&self) -> usize {
        self.payload_size
    }

    async fn send(&mut self, payload: &[u8]) -> Result<()> {
        let i = self.stream_for(payload).await?;
        self.streams[i].send_payload(payload).await
    }

    async fn send_bytes(&mut self, payload: Bytes) -> Result<()> {
        let i = self.stream_for(&payload).await?;
        // The stream writes the payload from `payload` itself (one stream, large
        // payloads) or queues it by reference (an outbox): either way its
        // writer sees these very bytes, and hands quinn slices of them. Smaller
        // payloads are copied into an outbox, so lending them would gain nothing.
        if payload.len() >= OWNED_QUEUE_MIN {
            self.lent[i].lend(payload.clone());
        }
        self.streams[i].send_payload_bytes(payload).await
    }

    async fn wait(&mut self) -> Result<()> {
        for s in &mut self.streams {
            s.wait_acked().await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // QUIC drops whatever the server has not read yet when the connection
        // closes, so first let the server take (and acknowledge) what was sent.
        let linger = self.linger;
        let _ = timeout(linger, async {
            for s in &mut self.streams {
                if s.wait_acked().await.is_err() {
                    break;
                }
            }
        })
        .await;
        for s in &mut self.streams {
            if timeout(linger, s.close_stream()).await.is_err() {
                tracing::debug!(
                    "quic: closing a stream to {} took over {linger:?}",
                    self.peer
                );
            }
        }
        let st = self.conn.stats();
        tracing::debug!(
            "quic {}: closing; rtt {:?} (min {:?}), cwnd {} B, mtu {}, {} packets sent, \
             {} lost ({} congestion events), {} UDP datagrams in {} sends, MTU probes {} \
             sent {} lost, {} black holes",
            self.peer,
            st.path.rtt,
            st.path.min_rtt,
            st.path.cwnd,
            st.path.current_mtu,
            st.path.sent_packets,
            st.path.lost_packets,
            st.path.congestion_events,
            st.udp_tx.datagrams,
            st.udp_tx.ios,
            st.path.sent_plpmtud_probes,
            st.path.lost_plpmtud_probes,
            st.path.black_holes_detected,
        );
        self.conn.close(0u32.into(), b"client closed");
        // Give the close frame a moment to leave; the endpoint driver keeps
        // running on its own after that.
        let _ = timeout(Duration::from_millis(100), self.endpoint.wait_idle()).await;
        Ok(())
    }

    fn stats(&self) -> ClientStats {
        let mut stats = ClientStats::default();
        for s in &self.streams {
            let st = s.window().stats();
            stats.sent += st.sent;
            stats.acked += st.acked;
        }
        stats.ack_latency = self.latency_histogram().summary();
        stats
    }

    fn latency_histogram(&self) -> LatencyHistogram {
        let mut latency = LatencyHistogram::default();
        for s in &self.streams {
            latency.merge(&s.window().latency());
        }
        latency
    }
}

#[cfg(test)]
mod tests {
    use super::split_window;

    #[test]
    fn window_split_adds_up() {
        assert_eq!(split_window(32, 4), vec![8, 8, 8, 8]);
        assert_eq!(split_window(30, 4), vec![8, 8, 7, 7]);
        assert_eq!(split_window(4, 4), vec![1, 1, 1, 1]);
        assert_eq!(split_window(5, 1), vec![5]);
    }
}

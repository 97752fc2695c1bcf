//! The extension points: [`Transport`] (server side), [`Client`], and the
//! factories the [`Registry`](crate::Registry) holds for each URL scheme.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use url::Url;

use crate::ingress::Ingress;
use crate::metrics::{LatencyHistogram, LatencySummary};
use crate::spec::Spec;
use crate::{Error, Result};

/// A bound server-side transport: it accepts peers, runs its own handshake and
/// pushes every received payload into the [`Ingress`] it was bound with.
#[async_trait]
pub trait Transport: Send + Sync + Debug {
    /// The URL clients connect to, with the actual bound address (port 0 resolved).
    fn local_url(&self) -> Url;

    /// Extra facts about the listener worth printing (e.g. a certificate path).
    fn details(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Stops accepting, closes this transport's connections (what they queued is
    /// still delivered) and returns once its tasks have ended.
    async fn shutdown(&self) -> Result<()>;
}

/// Binds transports for one or more URL schemes.
#[async_trait]
pub trait TransportFactory: Send + Sync + Debug {
    /// Binds a listener at `url` feeding `ingress`.
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>>;
}

/// Options every client honours.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Most payloads sent and not yet acknowledged; `send` waits beyond (default 32).
    pub max_inflight: usize,
    /// Limit for connecting and receiving the server's handshake (default 10 s).
    pub connect_timeout: Duration,
    /// How long a client waiting for acks polls its socket before it parks
    /// (default 50 µs; zero turns it off). TCP and Unix clients use it, for
    /// payloads of at most [`busy::MAX_PAYLOAD`](crate::busy::MAX_PAYLOAD) bytes
    /// and in processes with few such streams open; capped at
    /// [`busy::MAX_BUDGET`](crate::busy::MAX_BUDGET); see [`busy`](crate::busy).
    pub busy_poll: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_inflight: 32,
            connect_timeout: Duration::from_secs(10),
            busy_poll: crate::busy::DEFAULT_BUSY_POLL,
        }
    }
}

impl ClientOptions {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_inflight == 0 {
            return Err(Error::Config(
                "max_inflight must be at least 1, got 0".into(),
            ));
        }
        Ok(())
    }
}

/// Connects clients for one or more URL schemes.
#[async_trait]
pub trait ClientFactory: Send + Sync + Debug {
    /// Connects to `url`, checking that the server's spec is `spec`.
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>>;
}

/// What a client has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientStats {
    /// Payloads sent.
    pub sent: u64,
    /// Payloads acknowledged.
    pub acked: u64,
    /// Time from `send` to its ack.
    pub ack_latency: LatencySummary,
}

/// A connection that sends samples to a server.
#[async_trait]
pub trait Client: Send + Sync + Debug {
    /// Bytes per payload.
    fn payload_size(&self) -> usize;

    /// Sends one payload (the leaves' bytes concatenated in wire order), waiting
    /// while `max_inflight` are unacknowledged. After `close`, or once the peer
    /// left, this is [`Error::ConnectionClosed`].
    async fn send(&mut self, payload: &[u8]) -> Result<()>;

    /// [`send`](Self::send) for a payload the caller hands over. A client that
    /// must keep a payload's bytes until the server has them (QUIC keeps
    /// unacknowledged data for retransmission) can then hold a reference to
    /// `payload` instead of copying it; `Bytes::from(vec)` gives one without a
    /// copy. The default sends `&payload`.
    async fn send_bytes(&mut self, payload: Bytes) -> Result<()> {
        self.send(&payload).await
    }

    /// Waits until every payload sent has been acknowledged.
    async fn wait(&mut self) -> Result<()>;

    /// Closes the connection; payloads already handed to `send` are flushed first.
    /// Idempotent.
    async fn close(&mut self) -> Result<()>;

    /// Counters and ack latency.
    fn stats(&self) -> ClientStats;

    /// The full ack-latency histogram, to merge several clients' (clients built on
    /// [`InflightWindow`](crate::InflightWindow) return `window.latency()`; the
    /// default is an empty histogram).
    fn latency_histogram(&self) -> LatencyHistogram {
        LatencyHistogram::default()
    }
}

/// The checks every [`Client::send`] starts with, so that every client (ours and
/// downstream ones) refuses the same things with the same errors: a client that
/// is `closed` (after [`Client::close`], or once the peer left) gets
/// [`Error::ConnectionClosed`] naming `peer`; a payload that is not
/// `payload_size` bytes gets [`Error::PayloadSize`].
pub fn check_send(closed: bool, peer: &str, payload_size: usize, payload: &[u8]) -> Result<()> {
    if closed {
        return Err(Error::closed(format!("client for {peer} is closed")));
    }
    if payload.len() != payload_size {
        return Err(Error::PayloadSize {
            expected: payload_size,
            got: payload.len(),
        });
    }
    Ok(())
}

/// A URL's query parameter parsed as `T`, or `default` when absent.
pub fn query_param<T: std::str::FromStr>(url: &Url, key: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match url.query_pairs().find(|(k, _)| k == key) {
        None => Ok(default),
        Some((_, v)) => v.parse().map_err(|e| Error::Url {
            url: without_query(url),
            reason: format!("query parameter {key}={v:?}: {e}"),
        }),
    }
}

/// The URL without its query, for error messages: queries may hold secrets
/// (tokens), which must not end up in logs.
pub fn without_query(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// A URL's `host:port`, with a clear error when either is missing.
pub fn host_port(url: &Url) -> Result<(String, u16)> {
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::Url {
            url: url.to_string(),
            reason: "expected a host, as in scheme://127.0.0.1:port".into(),
        })?;
    let port = url.port().ok_or_else(|| Error::Url {
        url: url.to_string(),
        reason: "expected a port (0 binds an ephemeral one)".into(),
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port))
}

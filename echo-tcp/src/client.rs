//! The client side: [`TcpClient`], over TCP or a Unix socket.

use std::io;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use echo_core::metrics::LatencyHistogram;
use echo_core::stream::StreamClient;
use echo_core::transport::host_port;
use echo_core::window::InflightWindow;
use echo_core::{Client, ClientFactory, ClientOptions, ClientStats, Error, Result, Spec, Url};
use tokio::net::{TcpStream, UnixStream};

use crate::listener::SocketReader;
use crate::transport::{check_params, unix_path, LISTENER_PARAMS};

/// A wire v1 client over TCP or a Unix socket, byte-compatible with id-echo's
/// Python `TcpClient`: it checks the server's magic, version and spec, then
/// pipelines payloads with at most `max_inflight` unacknowledged.
///
/// Small payloads handed to [`send`](Self::send) while a write is under way are
/// coalesced into the next write, so many small samples cost few syscalls;
/// payloads of [`DIRECT_WRITE_MIN`](echo_core::stream::DIRECT_WRITE_MIN) bytes or
/// more are written straight from the caller's buffer. TCP_NODELAY is on.
///
/// Use the inherent [`send`](Self::send), [`wait`](Self::wait) and
/// [`close`](Self::close) on a `TcpClient`; the [`Client`] trait's methods do the
/// same behind a boxed future, for `Box<dyn Client>`.
#[derive(Debug)]
pub struct TcpClient {
    inner: StreamClient,
    url: Url,
}

fn parse_addr(addr: &str) -> Result<Url> {
    let text = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("tcp://{addr}")
    };
    echo_core::registry::parse_url(&text)
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn timed_out(url: &Url, limit: Duration) -> Error {
    Error::Timeout(format!(
        "connecting to {url}: no connection within {limit:?}"
    ))
}

fn connect_error(url: &Url, e: io::Error) -> Error {
    Error::Io(io::Error::new(
        e.kind(),
        format!("connecting to {url}: {e}"),
    ))
}

impl TcpClient {
    /// Connects to `addr` (`tcp://host:port`, `unix:///path`, or a bare
    /// `host:port`) and checks that the server's spec is `spec`.
    ///
    /// `options.connect_timeout` bounds connecting and receiving the handshake
    /// together. A server with another spec is [`Error::SpecMismatch`], in the
    /// Python client's words; a peer that is not an echo server is an
    /// [`Error::Wire`] naming the bytes it sent.
    pub async fn connect(addr: &str, spec: &Spec, options: &ClientOptions) -> Result<TcpClient> {
        TcpClient::connect_url(&parse_addr(addr)?, spec, options).await
    }

    /// [`connect`](Self::connect) with a parsed URL.
    pub async fn connect_url(url: &Url, spec: &Spec, options: &ClientOptions) -> Result<TcpClient> {
        options.validate()?;
        // Listener options (e.g. max_connections) may ride along; they mean nothing here.
        check_params(url, LISTENER_PARAMS)?;
        let limit = options.connect_timeout;
        let deadline = Instant::now() + limit;
        let mut rest = options.clone();
        let name = url.to_string();
        let inner = match url.scheme() {
            "tcp" => {
                let (host, port) = host_port(url)?;
                let stream = tokio::time::timeout(limit, TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| timed_out(url, limit))?
                    .map_err(|e| connect_error(url, e))?;
                stream
                    .set_nodelay(true)
                    .map_err(|e| connect_error(url, e))?;
                rest.connect_timeout = left(deadline);
                let (r, w) = stream.into_split();
                StreamClient::connect_socket(SocketReader::client(r), w, spec, &rest, false, name)
                    .await?
            }
            "unix" => {
                let path = unix_path(url)?;
                let stream = tokio::time::timeout(limit, UnixStream::connect(&path))
                    .await
                    .map_err(|_| timed_out(url, limit))?
                    .map_err(|e| connect_error(url, e))?;
                rest.connect_timeout = left(deadline);
                let (r, w) = stream.into_split();
                StreamClient::connect_socket(SocketReader::client(r), w, spec, &rest, false, name)
                    .await?
            }
            other => {
                return Err(Error::Url {
                    url: url.to_string(),
                    reason: format!("TcpClient connects to tcp:// and unix://, not {other}://"),
                })
            }
        };
        Ok(TcpClient {
            inner,
            url: url.clone(),
        })
    }

    /// The URL this client is connected to.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Payloads sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inner.window().inflight()
    }

    /// The in-flight window (for merging latency histograms of several clients).
    pub fn window(&self) -> &InflightWindow {
        self.inner.window()
    }

    /// [`Client::send`], without boxing the future: sends one payload (the
    /// leaves' bytes concatenated in wire order), waiting while `max_inflight`
    /// are unacknowledged. After [`close`](Self::close), or once the server left,
    /// this is [`Error::ConnectionClosed`].
    pub async fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.inner.send_payload(payload).await
    }

    /// [`Client::wait`], without boxing the future: waits until every payload
    /// sent has been acknowledged.
    pub async fn wait(&mut self) -> Result<()> {
        self.inner.wait_acked().await
    }

    /// [`Client::close`], without boxing the future; idempotent.
    pub async fn close(&mut self) -> Result<()> {
        self.inner.close_stream().await
    }
}

#[async_trait]
impl Client for TcpClient {
    fn payload_size(&self) -> usize {
        self.inner.payload_size()
    }

    async fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.inner.send_payload(payload).await
    }

    async fn wait(&mut self) -> Result<()> {
        self.inner.wait_acked().await
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close_stream().await
    }

    fn stats(&self) -> ClientStats {
        self.inner.stats()
    }

    fn latency_histogram(&self) -> LatencyHistogram {
        self.inner.window().latency()
    }
}

/// Connects [`TcpClient`]s for `tcp://` and `unix://` URLs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpClientFactory;

#[async_trait]
impl ClientFactory for TcpClientFactory {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        Ok(Box::new(TcpClient::connect_url(url, spec, options).await?))
    }
}

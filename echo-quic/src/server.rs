//! The `quic://` server: a QUIC endpoint (quinn-proto, driven by our own
//! [`Driver`]) whose client-opened bidirectional streams each carry wire v1
//! (client hello first), served by core's stream driver.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use echo_core::stream::Stopper;
use echo_core::transport::{host_port, query_param};
use echo_core::{Error, Ingress, Result, Transport, TransportFactory, Url};
use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::VarInt;
use tokio::sync::oneshot;

use crate::config::{Peer, Tuning};
use crate::endpoint::{Driver, Windows};
use crate::tls;

/// Application error code: a stream or connection the server refused (a limit).
pub const CODE_REFUSED: u32 = 1;
/// Application error code: the server is shutting down.
pub const CODE_SHUTDOWN: u32 = 2;

/// Default for `max_streams`: concurrent client streams per connection.
pub const DEFAULT_MAX_STREAMS: u32 = 16;

/// Binds `quic://host:port` listeners.
///
/// Query parameters:
/// * `cert=PATH&key=PATH`: serve this PEM certificate (chain) and private key;
/// * otherwise a self-signed certificate is generated for `names` (comma-separated
///   DNS names or IPs; default `localhost,127.0.0.1,::1` plus the bound IP) and
///   written to `cert_out=PATH` (default: `echo-quic-<ip>-<port>.pem` in the temp
///   directory, removed again at shutdown), which clients pass as `?ca=PATH`;
/// * `max_streams` (default 16): concurrent streams per connection;
/// * `max_conns` (default: the server's `max_connections`): QUIC connections;
/// * the [`Tuning`] parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuicTransportFactory;

/// A bound `quic://` listener.
#[derive(Debug)]
pub struct QuicTransport {
    url: Url,
    cert_path: PathBuf,
    /// A generated certificate written to the default path, removed at shutdown.
    remove_cert: bool,
    stopper: Stopper,
    /// Completes once the endpoint's driver has stopped.
    stopped: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

fn url_err(url: &Url, reason: impl Into<String>) -> Error {
    Error::Url {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Resolves `host:port` of `url` to one socket address.
pub(crate) async fn resolve(url: &Url) -> Result<SocketAddr> {
    let (host, port) = host_port(url)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| url_err(url, format!("cannot resolve {host}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| url_err(url, format!("{host} resolves to no address")))
}

fn path_param(url: &Url, key: &str) -> Option<PathBuf> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| PathBuf::from(v.into_owned()))
}

fn default_names(addr: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let ip = addr.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

fn default_cert_path(addr: SocketAddr) -> PathBuf {
    let ip: String = addr
        .ip()
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::env::temp_dir().join(format!("echo-quic-{ip}-{}.pem", addr.port()))
}

#[async_trait]
impl TransportFactory for QuicTransportFactory {
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>> {
        let addr = resolve(url).await?;
        let tuning = Tuning::from_url(url)?;
        let max_streams: u32 = query_param(url, "max_streams", DEFAULT_MAX_STREAMS)?;
        if max_streams == 0 || max_streams > 1024 {
            return Err(url_err(
                url,
                format!("max_streams must be between 1 and 1024, got {max_streams}"),
            ));
        }
        let max_conns: usize = query_param(url, "max_conns", ingress.limits().max_connections)?;
        if max_conns == 0 {
            return Err(url_err(url, "max_conns must be at least 1, got 0"));
        }
        let cert = path_param(url, "cert");
        let key = path_param(url, "key");
        let cert_out = path_param(url, "cert_out");
        let names: Option<Vec<String>> =
            url.query_pairs().find(|(k, _)| k == "names").map(|(_, v)| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            });

        let (socket, udp_state) = tuning.server_socket(addr)?;
        let may_fragment = udp_state.may_fragment();
        let recv_buffer = udp_state.recv_buffer_size((&socket).into()).ok();
        let bound = socket.local_addr()?;
        let mut remove_cert = false;
        // A generated certificate is written once the endpoint is up, so a bind
        // that fails leaves no file behind.
        let mut pem_to_write = None;
        let (chain, key, cert_path) = match (cert, key) {
            (Some(cert), Some(key)) => {
                if cert_out.is_some() || names.is_some() {
                    return Err(url_err(
                        url,
                        "cert_out and names apply to a generated certificate; \
                         drop them when giving cert= and key=",
                    ));
                }
                (tls::load_certs(&cert)?, tls::load_key(&key)?, cert)
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(url_err(
                    url,
                    "give both cert=PATH and key=PATH, or neither (a self-signed \
                     certificate is then generated)",
                ))
            }
            (None, None) => {
                let names = names.unwrap_or_else(|| default_names(bound));
                if names.is_empty() {
                    return Err(url_err(url, "names= lists no name"));
                }
                let ss = tls::self_signed(names)?;
                remove_cert = cert_out.is_none();
                let path = cert_out.unwrap_or_else(|| default_cert_path(bound));
                pem_to_write = Some(ss.pem);
                (vec![ss.cert], ss.key, path)
            }
        };
        let crypto = QuicServerConfig::try_from(tls::server_config(chain, key)?)
            .map_err(|e| Error::Tls(format!("QUIC cannot use this TLS config: {e}")))?;
        let crypto = Arc::new(crypto);
        let server_config = |peer, conn_window: u64| {
            let mut c = quinn_proto::ServerConfig::with_crypto(crypto.clone());
            let mut t = tuning.transport(max_streams, false, peer);
            t.receive_window(VarInt::from_u64(conn_window).unwrap_or(VarInt::MAX));
            c.transport_config(Arc::new(t));
            // No connection migration: peers are on a LAN, and it keeps peer names stable.
            c.migration(false);
            c
        };
        // Loopback peers get their own packet sizes (`loopback_mtu`).
        let endpoint_peers = if bound.ip().is_unspecified() {
            Peer::Any
        } else {
            Peer::of(bound.ip())
        };
        // The connections' windows share the receive buffer: the kernel
        // counts what a datagram's buffers take, more than its bytes, against
        // it (`recv_buffer` is that limit), so they get half of it.
        let windows = Windows::new(
            recv_buffer.map_or(u64::MAX, |b| b as u64 / 2),
            tuning.conn_window,
            server_config,
        );
        if windows.for_one() < tuning.conn_window {
            tracing::warn!(
                "quic {bound}: the UDP receive buffer is {} bytes (asked for {}; the \
                 system caps it at net.core.rmem_max), so even a single connection's \
                 window is {} bytes instead of conn_window={}; raise rmem_max for \
                 full speed",
                recv_buffer.unwrap_or_default(),
                tuning.udp_buffer,
                windows.for_one(),
                tuning.conn_window
            );
        }
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(tuning.endpoint(endpoint_peers)),
            Some(windows.default_config()),
            // Path-MTU discovery only where oversized datagrams are dropped,
            // not fragmented.
            !may_fragment,
            None,
        );
        let mut local = Url::parse(&format!("quic://{bound}"))
            .map_err(|e| url_err(url, format!("bound address {bound}: {e}")))?;
        {
            let mut q = local.query_pairs_mut();
            q.append_pair("ca", &cert_path.to_string_lossy());
            if bound.ip().is_unspecified() {
                q.append_pair("server_name", "localhost");
            }
        }
        let stopper = Stopper::default();
        let stopped = Driver::start(
            socket,
            udp_state,
            endpoint,
            windows,
            ingress,
            stopper.signal(),
            max_conns,
            None,
        )
        .await?;
        if let Some(pem) = pem_to_write {
            if let Err(e) = tls::write_cert(&cert_path, &pem) {
                // No client could trust this listener: take it down again.
                stopper.stop();
                let _ = stopped.await;
                return Err(e);
            }
        }
        tracing::info!(
            "quic: listening on {bound} (certificate {})",
            cert_path.display()
        );
        Ok(Box::new(QuicTransport {
            url: local,
            cert_path,
            remove_cert,
            stopper,
            stopped: tokio::sync::Mutex::new(Some(stopped)),
        }))
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn local_url(&self) -> Url {
        self.url.clone()
    }

    fn details(&self) -> Vec<(String, String)> {
        vec![(
            "cert".to_string(),
            self.cert_path.to_string_lossy().into_owned(),
        )]
    }

    async fn shutdown(&self) -> Result<()> {
        // The driver waits for its streams, then closes every connection and
        // lets the close frames go out.
        self.stopper.stop();
        if let Some(stopped) = self.stopped.lock().await.take() {
            // An error only means the driver's thread is gone too.
            let _ = stopped.await;
        }
        if self.remove_cert {
            // Its key died with this listener; a restarted server writes a new one.
            let _ = std::fs::remove_file(&self.cert_path);
        }
        Ok(())
    }
}

//! The server side: `tcp://host:port` and `unix:///path` listeners.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use echo_core::stream::{spawn_acceptor, AcceptorHandle};
use echo_core::transport::{host_port, query_param};
use echo_core::{Error, Ingress, Result, Transport, TransportFactory, Url};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::listener::{Slots, TcpAccept, UnixAccept};

/// Query parameters a listener URL may carry.
pub(crate) const LISTENER_PARAMS: &[&str] = &["max_connections"];

/// Binds `tcp://host:port` and `unix:///path` listeners serving wire v1.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransportFactory;

/// A bound TCP or Unix-socket listener.
#[derive(Debug)]
pub struct TcpTransport {
    url: Url,
    acceptor: AcceptorHandle,
    max_connections: usize,
    /// For Unix sockets: the socket file and its identity, removed on shutdown.
    socket_file: Mutex<Option<SocketFile>>,
}

#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file if it is still the socket this transport created.
    fn remove(self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("unix: removing {}: {e}", self.path.display());
                }
            }
            _ => {} // gone, or replaced by someone else's: leave it
        }
    }
}

pub(crate) fn check_params(url: &Url, allowed: &[&str]) -> Result<()> {
    for (k, _) in url.query_pairs() {
        if !allowed.contains(&k.as_ref()) {
            return Err(Error::Url {
                url: url.to_string(),
                reason: format!(
                    "unknown query parameter {k:?}; expected {}",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                ),
            });
        }
    }
    Ok(())
}

/// The socket path of a `unix:///path` URL.
pub(crate) fn unix_path(url: &Url) -> Result<PathBuf> {
    let bad = |reason: &str| Error::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if url.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(bad(
            "expected an absolute path and no host, as in unix:///run/echo.sock",
        ));
    }
    let path = url
        .to_file_path()
        .map_err(|_| bad("expected an absolute path, as in unix:///run/echo.sock"))?;
    if path.as_os_str().is_empty() || path == Path::new("/") {
        return Err(bad("expected a socket path, as in unix:///run/echo.sock"));
    }
    Ok(path)
}

fn io_context(e: io::Error, what: String) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Makes room for a Unix socket at `path`: a stale socket file (nothing accepts on
/// it) is removed; a live one, or anything that is not a socket, is an error.
async fn clear_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_context(e, format!("checking {}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )));
    }
    let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
    match probe {
        Err(_) | Ok(Ok(_)) => Err(Error::Io(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        ))),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("unix: removing stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_context(
                    e,
                    format!("removing stale socket {}", path.display()),
                )),
            }
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(io_context(e, format!("probing {}", path.display()))),
    }
}

#[async_trait]
impl TransportFactory for TcpTransportFactory {
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>> {
        check_params(url, LISTENER_PARAMS)?;
        let max_connections = query_param(url, "max_connections", usize::MAX)?;
        if max_connections == 0 {
            return Err(Error::Url {
                url: url.to_string(),
                reason: "max_connections must be at least 1, got 0".into(),
            });
        }
        let transport = match url.scheme() {
            "tcp" => {
                let (host, port) = host_port(url)?;
                let listener = TcpListener::bind((host.as_str(), port))
                    .await
                    .map_err(|e| io_context(e, format!("binding {url}")))?;
                let local = listener
                    .local_addr()
                    .map_err(|e| io_context(e, format!("address of {url}")))?;
                let local_url = Url::parse(&format!("tcp://{local}")).map_err(|e| Error::Url {
                    url: local.to_string(),
                    reason: e.to_string(),
                })?;
                let slots = Slots::new(max_connections, ingress.counters("tcp"));
                let acceptor = spawn_acceptor("tcp", TcpAccept { listener, slots }, ingress, false);
                TcpTransport {
                    url: local_url,
                    acceptor,
                    max_connections,
                    socket_file: Mutex::new(None),
                }
            }
            "unix" => {
                let path = unix_path(url)?;
                clear_stale_socket(&path).await?;
                let listener = UnixListener::bind(&path)
                    .map_err(|e| io_context(e, format!("binding {}", path.display())))?;
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(|e| io_context(e, format!("checking {}", path.display())))?;
                let socket_file = SocketFile {
                    path: path.clone(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                };
                let mut local_url = url.clone();
                local_url.set_query(None);
                let slots = Slots::new(max_connections, ingress.counters("unix"));
                let accept = UnixAccept {
                    listener,
                    path,
                    slots,
                    count: AtomicU64::new(0),
                };
                let acceptor = spawn_acceptor("unix", accept, ingress, false);
                TcpTransport {
                    url: local_url,
                    acceptor,
                    max_connections,
                    socket_file: Mutex::new(Some(socket_file)),
                }
            }
            other => {
                return Err(Error::Url {
                    url: url.to_string(),
                    reason: format!("echo-tcp serves tcp:// and unix://, not {other}://"),
                })
            }
        };
        tracing::info!("{} listening (wire v1, no authentication)", transport.url);
        Ok(Box::new(transport))
    }
}

impl TcpTransport {
    fn remove_socket_file(&self) {
        let file = self
            .socket_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = file {
            f.remove();
        }
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn local_url(&self) -> Url {
        self.url.clone()
    }

    fn details(&self) -> Vec<(String, String)> {
        // Values without spaces, so that echo-server's `listening URL KEY=VALUE...`
        // line splits on spaces.
        let mut d = vec![
            ("wire".to_string(), "v1".to_string()),
            ("auth".to_string(), "none".to_string()),
        ];
        if self.max_connections != usize::MAX {
            d.push((
                "max_connections".to_string(),
                self.max_connections.to_string(),
            ));
        }
        d
    }

    async fn shutdown(&self) -> Result<()> {
        self.acceptor.shutdown().await;
        self.remove_socket_file();
        Ok(())
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.remove_socket_file();
    }
}

//! The in-memory transport, `mem://NAME`: wire v1 over in-process pipes.
//!
//! It runs the same stream driver as TCP, so core's own tests, the examples and
//! the conformance kit exercise the real protocol without sockets.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use url::Url;

use crate::ingress::Ingress;
use crate::registry::Registry;
use crate::spec::Spec;
use crate::stream::{spawn_acceptor, Accept, AcceptorHandle, DirectRecv, StreamClient};
use crate::transport::{Client, ClientFactory, ClientOptions, Transport, TransportFactory};
use crate::{Error, Result};

const PIPE_BYTES: usize = 256 * 1024;

type Listeners = Mutex<HashMap<String, mpsc::Sender<DuplexStream>>>;

fn listeners() -> &'static Listeners {
    static L: OnceLock<Listeners> = OnceLock::new();
    L.get_or_init(Default::default)
}

fn name_of(url: &Url) -> Result<String> {
    let name = format!("{}{}", url.host_str().unwrap_or(""), url.path());
    if name.is_empty() || name == "/" {
        return Err(Error::Url {
            url: url.to_string(),
            reason: "expected a name, as in mem://learner".into(),
        });
    }
    Ok(name)
}

/// Registers `mem` in `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        "mem",
        Arc::new(MemTransportFactory),
        Arc::new(MemClientFactory),
    )
}

/// Binds `mem://NAME` listeners.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemTransportFactory;

/// Connects `mem://NAME` clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemClientFactory;

/// In-process pipes have no kernel receive queue to receive from directly.
impl DirectRecv for ReadHalf<DuplexStream> {}

struct MemAccept {
    rx: mpsc::Receiver<DuplexStream>,
    count: u64,
}

#[async_trait]
impl Accept for MemAccept {
    type Reader = ReadHalf<DuplexStream>;
    type Writer = WriteHalf<DuplexStream>;

    async fn accept(&mut self) -> io::Result<(Self::Reader, Self::Writer, String)> {
        match self.rx.recv().await {
            Some(s) => {
                self.count += 1;
                let (r, w) = tokio::io::split(s);
                Ok((r, w, format!("mem-peer-{}", self.count)))
            }
            None => std::future::pending().await,
        }
    }
}

/// A bound `mem://NAME` listener.
#[derive(Debug)]
pub struct MemTransport {
    url: Url,
    name: String,
    acceptor: AcceptorHandle,
}

#[async_trait]
impl TransportFactory for MemTransportFactory {
    async fn bind(&self, url: &Url, ingress: Ingress) -> Result<Box<dyn Transport>> {
        let name = name_of(url)?;
        let (tx, rx) = mpsc::channel(64);
        {
            let mut l = listeners().lock().unwrap_or_else(|e| e.into_inner());
            if l.get(&name).is_some_and(|s| !s.is_closed()) {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("mem://{name} is already bound"),
                )));
            }
            l.insert(name.clone(), tx);
        }
        let acceptor = spawn_acceptor("mem", MemAccept { rx, count: 0 }, ingress, false);
        Ok(Box::new(MemTransport {
            url: url.clone(),
            name,
            acceptor,
        }))
    }
}

#[async_trait]
impl Transport for MemTransport {
    fn local_url(&self) -> Url {
        self.url.clone()
    }

    async fn shutdown(&self) -> Result<()> {
        listeners()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        self.acceptor.shutdown().await;
        Ok(())
    }
}

/// Opens a raw in-memory byte stream to a `mem://NAME` listener (below the wire
/// protocol; for tests that need to misbehave).
pub async fn raw_connect(url: &str) -> Result<(ReadHalf<DuplexStream>, WriteHalf<DuplexStream>)> {
    let url = crate::registry::parse_url(url)?;
    let name = name_of(&url)?;
    let tx = listeners()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .cloned()
        .ok_or_else(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on mem://{name}"),
            ))
        })?;
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tx.send(theirs).await.map_err(|_| {
        Error::Io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("mem://{name} stopped listening"),
        ))
    })?;
    Ok(tokio::io::split(ours))
}

#[async_trait]
impl ClientFactory for MemClientFactory {
    async fn connect(
        &self,
        url: &Url,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        let (r, w) = raw_connect(url.as_str()).await?;
        let client = StreamClient::connect(r, w, spec, options, false, url.to_string()).await?;
        Ok(Box::new(client))
    }
}

//! Listeners implementing [`Accept`]: TCP (with `TCP_NODELAY`) and Unix sockets,
//! each with an optional per-listener connection limit.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use echo_core::metrics::TransportCounters;
use echo_core::stream::Accept;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, UnixListener};

/// Connection slots of one listener.
#[derive(Debug)]
pub(crate) struct Slots {
    open: Arc<AtomicUsize>,
    max: usize,
    counters: Arc<TransportCounters>,
}

impl Slots {
    pub(crate) fn new(max: usize, counters: Arc<TransportCounters>) -> Self {
        Slots {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            counters,
        }
    }

    /// Takes a slot, or `None` (counted as refused) when all are in use.
    fn take(&self, scheme: &str, peer: &str) -> Option<Slot> {
        let max = self.max;
        match self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => Some(Slot(self.open.clone())),
            Err(_) => {
                self.counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "{scheme}: refused {peer}: listener connection limit reached ({max} open)"
                );
                None
            }
        }
    }
}

/// One open connection's slot, freed on drop.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A read half that holds its listener slot for as long as the connection is served.
#[derive(Debug)]
pub(crate) struct SlotReader<R> {
    inner: R,
    _slot: Slot,
}

impl<R: AsyncRead + Unpin> AsyncRead for SlotReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

pub(crate) struct TcpAccept {
    pub(crate) listener: TcpListener,
    pub(crate) slots: Slots,
}

#[async_trait]
impl Accept for TcpAccept {
    type Reader = SlotReader<tcp::OwnedReadHalf>;
    type Writer = tcp::OwnedWriteHalf;

    async fn accept(&mut self) -> io::Result<(Self::Reader, Self::Writer, String)> {
        loop {
            // Cancel-safe: nothing is held across this await.
            let (stream, addr) = self.listener.accept().await?;
            let peer = addr.to_string();
            let Some(slot) = self.slots.take("tcp", &peer) else {
                drop(stream); // closed before the handshake: the peer sees EOF at once
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!("tcp {peer}: TCP_NODELAY: {e}");
            }
            let (r, w) = stream.into_split();
            return Ok((
                SlotReader {
                    inner: r,
                    _slot: slot,
                },
                w,
                peer,
            ));
        }
    }
}

pub(crate) struct UnixAccept {
    pub(crate) listener: UnixListener,
    pub(crate) path: PathBuf,
    pub(crate) slots: Slots,
    pub(crate) count: AtomicU64,
}

#[async_trait]
impl Accept for UnixAccept {
    type Reader = SlotReader<unix::OwnedReadHalf>;
    type Writer = unix::OwnedWriteHalf;

    async fn accept(&mut self) -> io::Result<(Self::Reader, Self::Writer, String)> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            let peer = format!("{}#{n}", self.path.display());
            let Some(slot) = self.slots.take("unix", &peer) else {
                drop(stream);
                continue;
            };
            let (r, w) = stream.into_split();
            return Ok((
                SlotReader {
                    inner: r,
                    _slot: slot,
                },
                w,
                peer,
            ));
        }
    }
}

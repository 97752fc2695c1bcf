//! The listener side of `grpc://`: accepted TCP connections, each holding one of
//! a bounded number of permits, so that connections which never open a Push
//! stream (or never even send the HTTP/2 preface) are bounded too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use echo_core::metrics::TransportCounters;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection; its permit goes back when tonic drops it.
pub(crate) struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// Accepted connections, at most `max` open at once: one more is closed as soon
/// as it is accepted (the client sees the connection reset, `UNAVAILABLE`), and
/// counted as refused.
pub(crate) fn incoming(
    listener: TcpListener,
    max: usize,
    counters: Arc<TransportCounters>,
) -> impl Stream<Item = io::Result<Counted>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    futures::stream::unfold(
        (listener, permits, counters),
        move |(listener, permits, counters)| async move {
            loop {
                let (io, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: tonic logs and
                        // goes on; pause so the accept loop does not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return Some((Err(e), (listener, permits, counters)));
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    counters
                        .connections_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        "grpc: refusing a connection from {peer}: {max} TCP connections are open (max_connections)"
                    );
                    continue;
                };
                let _ = io.set_nodelay(true);
                let conn = Counted {
                    io,
                    _permit: permit,
                };
                return Some((Ok(conn), (listener, permits, counters)));
            }
        },
    )
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

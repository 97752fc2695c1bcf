//! Listeners implementing [`Accept`]: TCP (with `TCP_NODELAY`) and Unix sockets,
//! each with an optional per-listener connection limit.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};

use async_trait::async_trait;
use echo_core::metrics::TransportCounters;
use echo_core::stream::{Accept, DirectRecv};
use tokio::io::{AsyncRead, Interest, ReadBuf};
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

/// A socket's read half: on a server it holds its listener slot for as long as
/// the connection is served; on either side it can be read without waiting
/// (for direct receives and busy polling, [`DirectRecv`]).
#[derive(Debug)]
pub(crate) struct SocketReader<R> {
    inner: R,
    _slot: Option<Slot>,
}

impl<R> SocketReader<R> {
    /// A client's read half (no listener slot).
    pub(crate) fn client(inner: R) -> Self {
        SocketReader { inner, _slot: None }
    }

    fn served(inner: R, slot: Slot) -> Self {
        SocketReader {
            inner,
            _slot: Some(slot),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SocketReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// A vectored read from a socket Tokio keeps non-blocking: never waits, and
/// bypasses (without disturbing) the runtime's readiness tracking.
fn recv_now(fd: RawFd, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    let count = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: IoSliceMut is ABI-compatible with iovec on Unix, and every one
    // points at writable memory borrowed for this call; `fd` is the caller's
    // open socket.
    let n = unsafe { libc::readv(fd, bufs.as_mut_ptr().cast::<libc::iovec>(), count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Bytes in a socket's receive queue (`FIONREAD`, i.e. `SIOCINQ`).
fn queued_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid; `fd`
    // is the open socket of the read half borrowed by the caller.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// TCP receives large payloads straight into the store: `SO_RCVLOWAT` keeps the
/// socket unreadable until a whole payload is queued (Linux also grows the
/// receive buffer so that it fits), `FIONREAD` confirms it, `readv` moves it.
/// Bytes in the receive queue stay readable until read, even after the peer
/// resets the connection (then the read after them fails), so a payload seen
/// whole in the queue can always be read whole.
///
/// Unix sockets do not: their readiness ignores the low-water mark, and the
/// peer's send buffer, not ours, bounds what can be queued, which may be less
/// than a payload.
impl DirectRecv for SocketReader<tcp::OwnedReadHalf> {
    fn set_low_water(&self, bytes: usize) -> io::Result<Option<usize>> {
        let fd = self.inner.as_ref().as_raw_fd();
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_RCVLOWAT takes a c_int; the pointer and length describe `want`.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&want as *const libc::c_int).cast(),
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got: libc::c_int = 0;
        let mut got_len = len;
        // SAFETY: as above, for reading the value back (the kernel caps it).
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut got as *mut libc::c_int).cast(),
                &mut got_len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(got.max(0) as usize))
    }

    fn queued(&self, min: usize, forget: bool) -> io::Result<usize> {
        let stream = self.inner.as_ref();
        let fd = stream.as_raw_fd();
        if !forget {
            return queued_bytes(fd);
        }
        // Inside `try_io`, a `WouldBlock` clears the runtime's cached readiness,
        // but only if no new event arrived since this call began.
        stream.try_io(Interest::READABLE, || {
            let q = queued_bytes(fd)?;
            if q < min {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(q)
        })
    }

    fn recv_now(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        recv_now(self.inner.as_ref().as_raw_fd(), bufs)
    }

    async fn readable(&self) -> io::Result<bool> {
        let ready = self.inner.ready(Interest::READABLE).await?;
        Ok(ready.is_read_closed() || ready.is_error())
    }
}

/// Unix sockets are only read without waiting for busy polling; see the TCP
/// implementation for why they receive nothing directly.
impl DirectRecv for SocketReader<unix::OwnedReadHalf> {
    fn recv_now(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        recv_now(self.inner.as_ref().as_raw_fd(), bufs)
    }
}

pub(crate) struct TcpAccept {
    pub(crate) listener: TcpListener,
    pub(crate) slots: Slots,
}

#[async_trait]
impl Accept for TcpAccept {
    type Reader = SocketReader<tcp::OwnedReadHalf>;
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
            return Ok((SocketReader::served(r, slot), w, peer));
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
    type Reader = SocketReader<unix::OwnedReadHalf>;
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
            return Ok((SocketReader::served(r, slot), w, peer));
        }
    }
}

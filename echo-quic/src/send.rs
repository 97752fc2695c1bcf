//! The client's QUIC send half: writes large payloads through reusable buffers
//! handed to quinn as [`Bytes`], and finishes the stream gracefully on shutdown.
//!
//! quinn's `&[u8]` write copies every write into a fresh allocation, which it
//! frees once the peer has acknowledged the data. At a gigabyte per second that
//! is a steady churn of 64 KiB blocks through the allocator, and glibc returns
//! freed heap tops to the kernel, so most of those blocks come back as fresh
//! pages, each one faulted in and zeroed by the kernel before the copy (at
//! 1 MiB payloads about a quarter of the client's page faults and a large part
//! of its CPU time; BENCHMARKS.md "QUIC"). Here each large write is copied once
//! into a buffer from a small per-connection pool, quinn gets it as `Bytes`
//! without copying, and the buffer returns to the pool when quinn drops it.
//! A payload the caller handed over as `Bytes` ([`Client::send_bytes`]) is not
//! copied at all: it is [`Lent`] to the stream's writer until written (inside
//! `send_bytes` with one stream, later from the outbox with several), and the
//! writer gives quinn slices of it.
//!
//! [`Client::send_bytes`]: echo_core::Client::send_bytes

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quinn::SendStream;
use tokio::io::AsyncWrite;
use tokio::time::timeout;

/// Bytes per pooled buffer: the most one write call takes.
pub(crate) const PIECE: usize = 64 * 1024;
/// Writes shorter than this use quinn's own copy (a pooled 64 KiB buffer would
/// hold them wastefully until acknowledged).
const POOLED_MIN: usize = 16 * 1024;

/// Reusable write buffers, shared by the streams of one connection.
#[derive(Debug)]
pub(crate) struct PiecePool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Free buffers kept; more are given back to the allocator.
    keep: usize,
}

impl PiecePool {
    /// A pool keeping up to `send_window` bytes of free buffers, at most
    /// 4 MiB: enough that a burst of acknowledgements returns buffers here
    /// instead of to the allocator, little enough to leave with an idle client.
    pub(crate) fn new(send_window: u64) -> Self {
        PiecePool {
            free: Mutex::new(Vec::new()),
            keep: (send_window.min(4 << 20) / PIECE as u64).max(1) as usize,
        }
    }

    /// `data` (at most [`PIECE`] bytes) copied into a pooled buffer.
    fn piece(self: &Arc<Self>, data: &[u8]) -> Bytes {
        debug_assert!(data.len() <= PIECE);
        let buf = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = buf.unwrap_or_else(|| vec![0; PIECE]);
        buf[..data.len()].copy_from_slice(data);
        Bytes::from_owner(Piece {
            buf,
            len: data.len(),
            pool: self.clone(),
        })
    }

    /// Free buffers held (for tests).
    #[cfg(test)]
    fn free_len(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

/// A pooled buffer's first `len` bytes; goes back to the pool when dropped.
struct Piece {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<PiecePool>,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.keep {
            free.push(buf);
        }
    }
}

/// Payloads a `send_bytes` call handed to a stream's writer, oldest first:
/// writes whose bytes lie inside one of them reach quinn as slices of it
/// (reference-counted, kept by quinn until acknowledged) instead of copies.
/// A payload is written whole and in order, so once a write ends where a lent
/// payload ends, it and everything lent before it are done with. Writes from
/// anywhere else (an outbox's copies, a borrowed payload) are copied as usual.
/// A payload whose send failed before it was written stays lent until a later
/// one is written or the client is dropped: at most [`MAX_LENT`] per stream.
#[derive(Debug, Default)]
pub(crate) struct Lent(Mutex<VecDeque<Bytes>>);

/// Most payloads a stream keeps lent; older ones are let go (and copied if
/// they are written after all).
const MAX_LENT: usize = 256;

impl Lent {
    /// Lends `payload` to the writer.
    pub(crate) fn lend(&self, payload: Bytes) {
        let mut lent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lent.len() == MAX_LENT {
            lent.pop_front();
        }
        lent.push_back(payload);
    }

    /// `buf` as a slice of a lent payload, if it lies inside one.
    fn slice_of(&self, buf: &[u8]) -> Option<Bytes> {
        if buf.is_empty() {
            return None;
        }
        let mut lent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let at = buf.as_ptr() as usize;
        let end = at + buf.len();
        let i = lent.iter().position(|whole| {
            let start = whole.as_ptr() as usize;
            at >= start && end <= start + whole.len()
        })?;
        let whole = &lent[i];
        let slice = whole.slice_ref(buf);
        if end == whole.as_ptr() as usize + whole.len() {
            lent.drain(..=i);
        }
        Some(slice)
    }

    /// Payloads lent and not yet written (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A QUIC send stream for [`StreamClient`](echo_core::stream::StreamClient).
///
/// A large write is accepted whole, as a slice of a [`Lent`] payload or else
/// copied into a pooled buffer, and handed to quinn as far as its flow control
/// allows; the rest waits in `stash` and goes first on the next write or
/// flush, so at most one write's bytes are held here (a pooled buffer, or a
/// reference to a payload the caller handed over; the stream client flushes
/// after every payload, or every batch of them from an outbox). `shutdown` finishes
/// the stream and then waits (up to `linger`) until the peer has acknowledged
/// all of it, so that closing the connection afterwards loses nothing.
pub(crate) struct FinishingSend {
    send: Option<SendStream>,
    pool: Arc<PiecePool>,
    lent: Arc<Lent>,
    stash: Option<Bytes>,
    linger: Duration,
    finishing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl FinishingSend {
    pub(crate) fn new(
        send: SendStream,
        pool: Arc<PiecePool>,
        lent: Arc<Lent>,
        linger: Duration,
    ) -> Self {
        FinishingSend {
            send: Some(send),
            pool,
            lent,
            stash: None,
            linger,
            finishing: None,
        }
    }
}

fn finished() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "QUIC stream already finished")
}

/// Hands `stash` to quinn; ready once all of it is taken.
fn push_stash(
    send: &mut SendStream,
    stash: &mut Option<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while let Some(bytes) = stash.as_mut() {
        if bytes.is_empty() {
            *stash = None;
            break;
        }
        // `write_chunks` takes what flow control allows (splitting the chunk if
        // need be) and, when it cannot take anything, registers the waker and
        // takes nothing: dropping it after one poll is fine.
        let write = send.write_chunks(std::slice::from_mut(bytes));
        let mut write = std::pin::pin!(write);
        ready!(write.as_mut().poll(cx)).map_err(io::Error::from)?;
    }
    Poll::Ready(Ok(()))
}

impl AsyncWrite for FinishingSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let Some(send) = this.send.as_mut() else {
            return Poll::Ready(Err(finished()));
        };
        ready!(push_stash(send, &mut this.stash, cx))?;
        let (n, piece) = match this.lent.slice_of(buf) {
            Some(whole) => (buf.len(), whole),
            None if buf.len() < POOLED_MIN => {
                return AsyncWrite::poll_write(Pin::new(send), cx, buf);
            }
            None => {
                let n = buf.len().min(PIECE);
                (n, this.pool.piece(&buf[..n]))
            }
        };
        this.stash = Some(piece);
        // Accepted either way; what quinn cannot take yet goes out first later.
        match push_stash(send, &mut this.stash, cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(n)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.send.as_mut() {
            Some(s) => {
                ready!(push_stash(s, &mut this.stash, cx))?;
                AsyncWrite::poll_flush(Pin::new(s), cx)
            }
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finishing.is_none() {
            let this = &mut *self;
            let Some(send) = this.send.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if ready!(push_stash(send, &mut this.stash, cx)).is_err() {
                // Reset or stopped: nothing left to deliver.
                this.send = None;
                return Poll::Ready(Ok(()));
            }
            let Some(mut send) = this.send.take() else {
                return Poll::Ready(Ok(()));
            };
            if send.finish().is_err() {
                // Already reset or stopped: nothing left to deliver.
                return Poll::Ready(Ok(()));
            }
            let stopped = send.stopped();
            let linger = self.linger;
            self.finishing = Some(Box::pin(async move {
                let _ = timeout(linger, stopped).await;
                drop(send);
            }));
        }
        match self.finishing.as_mut().map(|f| f.as_mut().poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => {
                self.finishing = None;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl std::fmt::Debug for FinishingSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinishingSend")
            .field("stream", &self.send.as_ref().map(|s| s.id()))
            .field("stashed", &self.stash.as_ref().map_or(0, Bytes::len))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_return_to_the_pool_when_dropped() {
        let pool = Arc::new(PiecePool::new(1 << 20));
        let data: Vec<u8> = (0..PIECE).map(|i| i as u8).collect();
        let a = pool.piece(&data[..20_000]);
        let b = pool.piece(&data);
        assert_eq!(&a[..], &data[..20_000]);
        assert_eq!(&b[..], &data[..]);
        assert_eq!(pool.free_len(), 0);
        let tail = b.slice(100..);
        drop(b);
        assert_eq!(pool.free_len(), 0, "a slice still holds the buffer");
        drop(tail);
        drop(a);
        assert_eq!(pool.free_len(), 2);
        // Reused buffers carry only the new bytes.
        let c = pool.piece(&data[5..17_000]);
        assert_eq!(&c[..], &data[5..17_000]);
        assert_eq!(pool.free_len(), 1);
    }

    #[test]
    fn lent_payloads_are_sliced_not_copied() {
        let lent = Lent::default();
        let whole = Bytes::from((0..2000).map(|i| i as u8).collect::<Vec<u8>>());
        let payload = whole.slice(0..1000);
        assert!(
            lent.slice_of(&payload[10..20]).is_none(),
            "nothing lent yet"
        );
        lent.lend(payload.clone());
        let s = lent.slice_of(&payload[10..200]).unwrap();
        assert_eq!(s.as_ptr(), payload[10..].as_ptr(), "the same memory");
        assert_eq!(&s[..], &payload[10..200]);
        // Bytes outside the lent payload, or only partly inside it, are not its.
        assert!(lent.slice_of(&whole[1000..1100]).is_none());
        assert!(lent.slice_of(&whole[500..1500]).is_none());
        let copy: Vec<u8> = payload.to_vec();
        assert!(lent.slice_of(&copy).is_none(), "equal bytes elsewhere");
        assert!(lent.slice_of(&payload[..0]).is_none());
        assert_eq!(lent.len(), 1, "not written to its end yet");
        let rest = lent.slice_of(&payload[200..]).unwrap();
        assert_eq!((rest.as_ptr(), rest.len()), (payload[200..].as_ptr(), 800));
        assert_eq!(lent.len(), 0, "written to its end: let go");
        assert!(lent.slice_of(&payload[10..20]).is_none());
        drop((s, rest, whole));
        assert!(payload.is_unique(), "nothing else holds it");
    }

    #[test]
    fn lent_payloads_are_let_go_in_order() {
        let lent = Lent::default();
        let a = Bytes::from(vec![1u8; 100]);
        let b = Bytes::from(vec![2u8; 100]);
        let c = Bytes::from(vec![3u8; 100]);
        // The same payload twice (a client may send one Bytes repeatedly).
        for p in [&a, &b, &a, &c] {
            lent.lend(p.clone());
        }
        // Writing `a` whole lets go of the first `a`; writing it again lets go
        // of the second and of `b` before it (a `b` never written: a send
        // that failed, say).
        assert!(lent.slice_of(&a).is_some());
        assert_eq!(lent.len(), 3, "the first a");
        assert!(lent.slice_of(&a).is_some());
        assert_eq!(lent.len(), 1, "b was lent before the second a: gone too");
        assert!(lent.slice_of(&b).is_none());
        assert_eq!(&lent.slice_of(&c).unwrap()[..], &c[..]);
        assert_eq!(lent.len(), 0);
        // Bounded.
        for _ in 0..MAX_LENT + 10 {
            lent.lend(a.clone());
        }
        assert_eq!(lent.len(), MAX_LENT);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        let pool = Arc::new(PiecePool::new(4 * PIECE as u64));
        let data = vec![1u8; PIECE];
        let pieces: Vec<Bytes> = (0..9).map(|_| pool.piece(&data)).collect();
        drop(pieces);
        assert_eq!(pool.free_len(), 4);
    }
}

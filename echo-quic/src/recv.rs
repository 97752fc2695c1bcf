//! The read half of a served stream: quinn's receive stream with a queue of the
//! chunks it has already handed over, so that core's stream driver can receive
//! large payloads straight into the store ([`DirectRecv`]) the way it does from
//! a TCP socket: wait until a whole payload is queued, reserve slots, copy the
//! decrypted chunks into them. Without it every payload is copied twice on the
//! server after decryption: out of quinn into the connection's receive buffer,
//! then into the store. Only paths with large packets look ahead (loopback by
//! default, see [`worth_looking_ahead`]).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use echo_core::stream::DirectRecv;
use quinn::RecvStream;
use tokio::io::{AsyncRead, ReadBuf};

/// Chunks shorter than this are copied into a shared buffer instead of being
/// kept: a kept chunk pins the whole buffer quinn received it in (one receive
/// call's worth, about 64 KiB at most on loopback and with receive offload),
/// so a peer sending tiny stream frames could otherwise make a small queue
/// hold a great deal of memory. At this size a kept chunk pins a few times
/// its length at most.
const KEEP_MIN: usize = 16 * 1024;

/// Whether streams on a path whose packets may grow to `max_packet` bytes
/// look ahead: only where most chunks can be kept. With smaller packets every
/// chunk would be copied together first, which is the same number of copies
/// as reading into the connection's buffer, plus allocations (measured with
/// 6.5 KB packets: 13 % more server CPU per MiB than without the look-ahead).
pub(crate) fn worth_looking_ahead(max_packet: u16) -> bool {
    usize::from(max_packet) >= 2 * KEEP_MIN
}

/// A quinn receive stream that [`DirectRecv`] can look ahead into (or, made
/// with `look_ahead` off, just quinn's stream).
///
/// The queue only grows while the stream driver waits for a whole payload,
/// and only up to its low-water mark (one payload): taking bytes out of quinn
/// hands their flow-control credit back to the peer, so the queue is bounded
/// by the mark, not by quinn's stream window.
pub(crate) struct QuicReader {
    inner: Mutex<Inner>,
    look_ahead: bool,
}

struct Inner {
    stream: RecvStream,
    queue: ChunkQueue,
    low_water: usize,
    /// quinn reported the end of the stream.
    eof: bool,
    /// quinn reported an error, not yet passed on.
    failed: Option<io::Error>,
}

/// Bytes taken out of quinn and not read yet, in order: kept chunks, then a
/// buffer of small ones copied together (see [`KEEP_MIN`]).
#[derive(Default)]
struct ChunkQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    kept: usize,
    small: BytesMut,
}

impl ChunkQueue {
    fn len(&self) -> usize {
        self.kept + self.small.len()
    }

    fn push(&mut self, bytes: Bytes) {
        if bytes.len() < KEEP_MIN || !self.small.is_empty() {
            // Once small chunks wait, later ones join them (order).
            self.small.extend_from_slice(&bytes);
            if self.small.len() >= KEEP_MIN {
                self.keep_small();
            }
        } else {
            self.kept += bytes.len();
            self.chunks.push_back(bytes);
        }
    }

    fn keep_small(&mut self) {
        let whole = self.small.split().freeze();
        self.kept += whole.len();
        self.chunks.push_back(whole);
    }

    /// Copies queued bytes into `bufs`, in order; 0 if nothing is queued.
    fn copy_out(&mut self, bufs: &mut [IoSliceMut<'_>]) -> usize {
        let mut copied = 0;
        for buf in bufs.iter_mut() {
            let mut at = 0;
            while at < buf.len() {
                if self.chunks.is_empty() && !self.small.is_empty() {
                    self.keep_small();
                }
                let Some(src) = self.chunks.front_mut() else {
                    return copied;
                };
                let n = src.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&src[..n]);
                src.advance(n);
                if src.is_empty() {
                    self.chunks.pop_front();
                }
                self.kept -= n;
                at += n;
                copied += n;
            }
        }
        copied
    }
}

impl QuicReader {
    pub(crate) fn new(stream: RecvStream, look_ahead: bool) -> Self {
        QuicReader {
            look_ahead,
            inner: Mutex::new(Inner {
                stream,
                queue: ChunkQueue::default(),
                low_water: 1,
                eof: false,
                failed: None,
            }),
        }
    }

    /// The state; only the stream's own task uses it, so this never waits
    /// (a panic elsewhere cannot leave it inconsistent: every update is whole).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn ended(&self) -> bool {
        self.eof || self.failed.is_some()
    }

    /// One attempt to take the next chunk out of quinn, but no more than the
    /// queue needs to hold `want` bytes: `Ready` once something changed (a
    /// chunk, the end, an error). quinn may hand out one chunk of everything
    /// it buffered (it merges small chunks when they pile up): asking for
    /// only what is missing leaves the rest in quinn, inside its flow-control
    /// window, so the queue never holds more than `want`.
    fn poll_chunk(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<()> {
        if self.ended() {
            return Poll::Ready(());
        }
        let max = want.saturating_sub(self.queue.len()).max(1);
        let polled = {
            let read = self.stream.read_chunk(max, true);
            std::pin::pin!(read).poll(cx)
        };
        match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => self.queue.push(chunk.bytes),
            Poll::Ready(Ok(None)) => self.eof = true,
            Poll::Ready(Err(e)) => self.failed = Some(e.into()),
        }
        Poll::Ready(())
    }

    /// Takes chunks out of quinn until `want` bytes are queued or the stream
    /// ended: `Pending` (with `cx` registered) while quinn has nothing more.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<()> {
        while self.queue.len() < want && !self.ended() {
            ready!(self.poll_chunk(cx, want));
        }
        Poll::Ready(())
    }

    /// [`poll_fill`](Self::poll_fill) without waiting.
    fn fill_now(&mut self, want: usize) {
        let waker = futures::task::noop_waker();
        let _ = self.poll_fill(&mut Context::from_waker(&waker), want);
    }

    /// What a read finds once the queue is empty: the end (0), the error, or
    /// `WouldBlock`.
    fn after_queue(&mut self) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            self.eof = true;
            return Err(e);
        }
        if self.eof {
            return Ok(0);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl AsyncRead for QuicReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let inner = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if inner.queue.len() > 0 {
            let n = inner
                .queue
                .copy_out(&mut [IoSliceMut::new(buf.initialize_unfilled())]);
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        if inner.ended() {
            return Poll::Ready(inner.after_queue().map(|_| ()));
        }
        Pin::new(&mut inner.stream).poll_read(cx, buf)
    }
}

impl DirectRecv for QuicReader {
    /// Any mark is honoured (the queue is ours, not the kernel's), unless
    /// the reader does not look ahead: then there is no mark, and no direct
    /// receives.
    fn set_low_water(&self, bytes: usize) -> io::Result<Option<usize>> {
        if !self.look_ahead {
            return Ok(None);
        }
        self.lock().low_water = bytes.max(1);
        Ok(Some(bytes))
    }

    fn queued(&self, min: usize, forget: bool) -> io::Result<usize> {
        let mut inner = self.lock();
        inner.fill_now(min.max(1));
        let q = inner.queue.len();
        if forget && q < min {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(q)
    }

    fn recv_now(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut inner = self.lock();
        if inner.queue.len() == 0 {
            inner.fill_now(bufs.iter().map(|b| b.len()).sum());
        }
        match inner.queue.copy_out(bufs) {
            0 => inner.after_queue(),
            n => Ok(n),
        }
    }

    /// The bytes arrive through quinn's connection task, in this process: a
    /// spinning reader only delays it (measured: at 20 B with one client, three
    /// times the server CPU per sample and fewer samples per second).
    fn worth_polling(&self) -> bool {
        false
    }

    fn readable(&self) -> impl Future<Output = io::Result<bool>> + Send {
        poll_fn(move |cx| {
            let mut inner = self.lock();
            let mark = inner.low_water;
            ready!(inner.poll_fill(cx, mark));
            // Short of the mark only once the stream ended.
            Poll::Ready(Ok(inner.queue.len() < mark))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use quinn::{Endpoint, SendStream};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::time::timeout;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    proptest! {
        /// Whatever the chunk sizes (kept or copied together) and however the
        /// bytes are read out, they come out whole and in order.
        #[test]
        fn chunks_come_out_in_order(
            sizes in proptest::collection::vec(
                prop_oneof![1usize..2000, 15_000usize..40_000], 1..24),
            reads in proptest::collection::vec(
                proptest::collection::vec(0usize..30_000, 1..4), 1..8),
        ) {
            let total: usize = sizes.iter().sum();
            let data = pattern(total);
            let mut q = ChunkQueue::default();
            let mut at = 0;
            for s in &sizes {
                q.push(Bytes::copy_from_slice(&data[at..at + s]));
                at += s;
            }
            prop_assert_eq!(q.len(), total);
            let mut out = Vec::new();
            let mut r = 0;
            while q.len() > 0 {
                let lens = &reads[r % reads.len()];
                r += 1;
                let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l + 1]).collect();
                let before = q.len();
                let n = {
                    let mut io: Vec<IoSliceMut<'_>> =
                        bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    q.copy_out(&mut io)
                };
                prop_assert_eq!(before - q.len(), n);
                let want: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(before);
                prop_assert_eq!(n, want);
                let mut left = n;
                for b in &bufs {
                    let k = b.len().min(left);
                    out.extend_from_slice(&b[..k]);
                    left -= k;
                }
            }
            prop_assert!(out == data, "bytes reordered or lost");
            // Small chunks are held in few buffers, not one per chunk.
            let mut q = ChunkQueue::default();
            for _ in 0..1000 {
                q.push(Bytes::from_static(&[1u8; 10]));
            }
            prop_assert!(q.chunks.is_empty() && q.small.len() == 10_000);
        }
    }

    #[test]
    fn only_paths_with_large_packets_look_ahead() {
        assert!(worth_looking_ahead(32_768));
        assert!(worth_looking_ahead(65_527));
        assert!(!worth_looking_ahead(6_500));
        assert!(!worth_looking_ahead(1_452));
        assert!(!worth_looking_ahead(2 * KEEP_MIN as u16 - 1));
    }

    proptest! {
        /// Pushes and reads interleaved, as the stream driver does them.
        #[test]
        fn interleaved_pushes_and_reads_keep_order(
            steps in proptest::collection::vec(
                (prop_oneof![1usize..3000, 15_000usize..40_000], 0usize..50_000), 1..40),
        ) {
            let total: usize = steps.iter().map(|s| s.0).sum();
            let data = pattern(total);
            let (mut q, mut at, mut out) = (ChunkQueue::default(), 0, Vec::new());
            for (push, read) in steps {
                q.push(Bytes::copy_from_slice(&data[at..at + push]));
                at += push;
                let mut buf = vec![0u8; read];
                let n = q.copy_out(&mut [IoSliceMut::new(&mut buf)]);
                out.extend_from_slice(&buf[..n]);
                prop_assert_eq!(out.len() + q.len(), at);
            }
            let mut rest = vec![0u8; q.len()];
            q.copy_out(&mut [IoSliceMut::new(&mut rest)]);
            out.extend_from_slice(&rest);
            prop_assert!(out == data, "bytes reordered or lost");
        }
    }

    /// A connected pair: the client's send stream and the server's receive
    /// stream of one bidirectional stream (with its endpoints and connections).
    async fn stream_pair() -> (SendStream, QuicReader, impl Drop) {
        let cert = crate::tls::self_signed(vec!["localhost".into()]).unwrap();
        let server_tls = crate::tls::server_config(vec![cert.cert.clone()], cert.key).unwrap();
        let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).unwrap(),
        ));
        let server = Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (client_tls, _) =
            crate::tls::client_config(vec![cert.cert], std::path::Path::new("test")).unwrap();
        let client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls).unwrap()));
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let connecting = client.connect_with(client_cfg, addr, "localhost").unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (c, s) = (c.unwrap(), s.unwrap());
        let (mut send, _recv) = c.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let (_ssend, mut srecv) = s.accept_bi().await.unwrap();
        let mut one = [0u8; 1];
        srecv.read_exact(&mut one).await.unwrap();
        struct Keep(#[allow(dead_code)] Vec<Box<dyn std::any::Any>>);
        impl Drop for Keep {
            fn drop(&mut self) {}
        }
        let keep = Keep(vec![
            Box::new(server),
            Box::new(client),
            Box::new(c),
            Box::new(s),
            Box::new(_recv),
            Box::new(_ssend),
        ]);
        (send, QuicReader::new(srecv, true), keep)
    }

    /// Reads `n` bytes with `recv_now`, waking on any byte (mark 1).
    async fn recv_all(r: &QuicReader, n: usize) -> Vec<u8> {
        r.set_low_water(1).unwrap();
        let mut out = vec![0u8; n];
        let mut at = 0;
        while at < n {
            match r.recv_now(&mut [IoSliceMut::new(&mut out[at..])]) {
                Ok(0) => panic!("end of stream after {at} of {n} bytes"),
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    timeout(Duration::from_secs(10), r.readable())
                        .await
                        .expect("readable in time")
                        .unwrap();
                }
                Err(e) => panic!("read failed after {at} bytes: {e}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn readable_waits_for_the_low_water_mark_then_a_payload_reads_whole() {
        let (mut send, reader, _keep) = stream_pair().await;
        const P: usize = 100_000;
        let data = pattern(2 * P);
        assert_eq!(reader.set_low_water(P).unwrap(), Some(P));
        assert_eq!(
            reader.queued(P, true).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        send.write_all(&data[..P / 2]).await.unwrap();
        // Half a payload is not enough to wake the reader.
        assert!(
            timeout(Duration::from_millis(300), reader.readable())
                .await
                .is_err(),
            "woke with half a payload"
        );
        send.write_all(&data[P / 2..]).await.unwrap();
        let closed = timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("woke once a payload was queued")
            .unwrap();
        assert!(!closed);
        let q = reader.queued(P, true).unwrap();
        assert!(q >= P, "{q} queued");
        // The payload is read whole without waiting, from the queue.
        let mut got = vec![0u8; P];
        let n = reader.recv_now(&mut [IoSliceMut::new(&mut got)]).unwrap();
        assert_eq!(n, P);
        assert!(got == data[..P]);
        // The rest, then the end of the stream.
        send.finish().unwrap();
        let rest = recv_all(&reader, P).await;
        assert!(rest == data[P..]);
        assert!(timeout(Duration::from_secs(10), reader.readable())
            .await
            .unwrap()
            .unwrap());
        assert_eq!(
            reader.recv_now(&mut [IoSliceMut::new(&mut got)]).unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn the_look_ahead_takes_no_more_than_its_mark() {
        let (mut send, reader, _keep) = stream_pair().await;
        // Within quinn's default stream window, so all of it can arrive.
        let data = pattern(1_000_000);
        send.write_all(&data).await.unwrap();
        for mark in [300_001, 500_003] {
            reader.set_low_water(mark).unwrap();
            timeout(Duration::from_secs(10), reader.readable())
                .await
                .expect("woke at the mark")
                .unwrap();
            // Exactly the mark: the rest stays in quinn, inside its window.
            assert_eq!(reader.queued(0, false).unwrap(), mark);
        }
        // `queued` fills to its minimum the same way, once enough has come.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let q = loop {
            match reader.queued(700_000, true) {
                Ok(q) => break q,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "700,000 bytes in time"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(q, 700_000);
        let got = recv_all(&reader, data.len()).await;
        assert!(got == data);
    }

    #[tokio::test]
    async fn buffered_reads_see_queued_bytes_first_and_a_reset_after_them() {
        let (mut send, mut reader, _keep) = stream_pair().await;
        let data = pattern(50_000);
        send.write_all(&data).await.unwrap();
        reader.set_low_water(40_000).unwrap();
        timeout(Duration::from_secs(10), reader.readable())
            .await
            .unwrap()
            .unwrap();
        // Queued by the look-ahead; an ordinary read continues from there.
        let mut got = vec![0u8; 10_000];
        reader.read_exact(&mut got).await.unwrap();
        assert!(got == data[..10_000]);
        // A reset: what the look-ahead had taken is still delivered (a prefix of
        // what was sent, at least the mark), then the error, once, then the end.
        let q = reader.queued(0, false).unwrap();
        assert!(q >= 30_000, "{q} queued");
        send.reset(7u32.into()).unwrap();
        reader.set_low_water(1 << 20).unwrap();
        let closed = timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("the reset wakes the reader")
            .unwrap();
        assert!(closed);
        let q = reader.queued(0, false).unwrap();
        let rest = recv_all(&reader, q).await;
        assert!(rest == data[10_000..10_000 + q]);
        let mut buf = [0u8; 16];
        let err = reader
            .recv_now(&mut [IoSliceMut::new(&mut buf)])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(
            reader.recv_now(&mut [IoSliceMut::new(&mut buf)]).unwrap(),
            0
        );
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    }
}

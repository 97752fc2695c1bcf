//! The read half of a served stream: the bytes the endpoint driver took out
//! of quinn-proto for it, queued as the decrypted chunks they arrived in, so
//! that core's stream driver can receive large payloads straight into the
//! store ([`DirectRecv`]) the way it does from a TCP socket: wait until a
//! whole payload is queued, reserve slots, copy the chunks into them. Without
//! it every payload is copied twice on the server after decryption: into the
//! connection's receive buffer, then into the store.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use echo_core::stream::DirectRecv;
use quinn_proto::StreamId;
use tokio::io::{AsyncRead, ReadBuf};

use crate::endpoint::{Conn, ConnState, Slot};

/// Chunks shorter than this are copied into a shared buffer instead of being
/// kept: a kept chunk pins the whole buffer its datagram was received in (up to
/// 64 KiB on loopback),
/// so a peer sending tiny stream frames could otherwise make a small queue
/// hold a great deal of memory. At this size a kept chunk pins a few times
/// its length at most.
const KEEP_MIN: usize = 16 * 1024;

/// Bytes taken out of quinn-proto and not read yet, in order: kept chunks, then a
/// buffer of small ones copied together (see [`KEEP_MIN`]).
#[derive(Default)]
pub(crate) struct ChunkQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    kept: usize,
    small: BytesMut,
}

impl ChunkQueue {
    pub(crate) fn len(&self) -> usize {
        self.kept + self.small.len()
    }

    pub(crate) fn push(&mut self, bytes: Bytes) {
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

    /// Moves the first `n` bytes (or all, if fewer are queued) into a queue
    /// of their own, without copying kept chunks.
    pub(crate) fn take(&mut self, n: usize) -> ChunkQueue {
        if self.len() <= n {
            return std::mem::take(self);
        }
        let mut out = ChunkQueue::default();
        while out.kept < n {
            if self.chunks.is_empty() {
                self.keep_small();
            }
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = front.len().min(n - out.kept);
            let piece = if k == front.len() {
                self.chunks.pop_front().unwrap_or_default()
            } else {
                front.split_to(k)
            };
            self.kept -= k;
            out.kept += k;
            out.chunks.push_back(piece);
        }
        out
    }

    /// Copies queued bytes into `bufs`, in order; 0 if nothing is queued.
    pub(crate) fn copy_out(&mut self, bufs: &mut [IoSliceMut<'_>]) -> usize {
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

/// A served stream's read half, over its [`Slot`] in the connection.
///
/// The queue only grows up to [`Slot::target`], the larger of the low-water
/// mark (one payload while the stream driver waits for a whole one) and
/// 64 KiB: taking bytes out of
/// quinn-proto hands their flow-control credit back to the peer, so the queue
/// is bounded by what is taken, not by the stream's window.
pub(crate) struct StreamReader {
    conn: Arc<Conn>,
    id: StreamId,
}

impl StreamReader {
    pub(crate) fn new(conn: Arc<Conn>, id: StreamId) -> Self {
        StreamReader { conn, id }
    }

    /// Runs `f` on the connection and this stream's slot (an error if the
    /// slot is gone, which only happens once the reader is), then, if `f`
    /// pulled bytes that earn the peer credit, has the driver send it (a
    /// read that changed nothing in quinn-proto does not wake the driver).
    fn with_slot<T>(
        &self,
        f: impl FnOnce(&mut ConnState, StreamId) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.conn.lock();
        if !st.streams.contains_key(&self.id) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the stream is closed",
            ));
        }
        let r = f(&mut st, self.id);
        if std::mem::take(&mut st.credit_due) {
            self.conn.settle();
        }
        r
    }

    /// Takes up to `n` queued bytes out (topping the queue up from
    /// quinn-proto first), to be copied out after the lock is released:
    /// `Ok(None)` when nothing is queued and the stream has not ended (with
    /// `cx` registered to be woken when something is), an empty queue at
    /// the end.
    fn take(&self, n: usize, cx: Option<&Context<'_>>) -> io::Result<Option<ChunkQueue>> {
        self.with_slot(|st, id| {
            st.pull(id, n.max(1));
            let slot = slot(st, id);
            if slot.queue.len() == 0 {
                return match slot.after_queue() {
                    Ok(_) => Ok(Some(ChunkQueue::default())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Some(cx) = cx {
                            slot.wait(cx, 1);
                        }
                        Ok(None)
                    }
                    Err(e) => Err(e),
                };
            }
            let taken = slot.queue.take(n);
            let target = slot.target();
            // The next payload's bytes, and their credit back to the peer.
            st.pull(id, target);
            Ok(Some(taken))
        })
    }
}

/// The slot of a stream known to have one (checked by `with_slot`).
fn slot(st: &mut ConnState, id: StreamId) -> &mut Slot {
    st.streams.get_mut(&id).expect("checked by with_slot")
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        match self.take(want, Some(cx)) {
            Ok(Some(mut q)) => {
                let n = q.len();
                let copied = q.copy_out(&mut [IoSliceMut::new(buf.initialize_unfilled_to(n))]);
                buf.advance(copied);
                Poll::Ready(Ok(()))
            }
            Ok(None) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl DirectRecv for StreamReader {
    /// Any mark is honoured (the queue is ours, not the kernel's).
    fn set_low_water(&self, bytes: usize) -> io::Result<Option<usize>> {
        self.with_slot(|st, id| {
            slot(st, id).low_water = bytes.max(1);
            Ok(Some(bytes))
        })
    }

    fn queued(&self, min: usize, forget: bool) -> io::Result<usize> {
        self.with_slot(|st, id| {
            st.pull(id, min.max(1));
            let q = slot(st, id).queue.len();
            if forget && q < min {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(q)
        })
    }

    fn recv_now(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        match self.take(total, None)? {
            Some(mut q) => Ok(q.copy_out(bufs)),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// The bytes arrive through the endpoint driver's task, in this process:
    /// a spinning reader only delays it (measured with quinn's tasks: at 20 B
    /// with one client, three times the server CPU per sample and fewer
    /// samples per second).
    fn worth_polling(&self) -> bool {
        false
    }

    fn readable(&self) -> impl Future<Output = io::Result<bool>> + Send {
        poll_fn(move |cx| {
            let r = self.with_slot(|st, id| {
                let (mark, target) = {
                    let slot = slot(st, id);
                    (slot.low_water, slot.target())
                };
                st.pull(id, target);
                let slot = slot(st, id);
                if slot.queue.len() >= mark || slot.ended() {
                    // Short of the mark only once the stream ended.
                    return Ok(Some(slot.queue.len() < mark));
                }
                slot.wait(cx, mark);
                Ok(None)
            });
            match r {
                Ok(Some(ended)) => Poll::Ready(Ok(ended)),
                Ok(None) => Poll::Pending,
                // The slot is gone: the stream is over.
                Err(_) => Poll::Ready(Ok(true)),
            }
        })
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        let mut st = self.conn.lock();
        if st.streams.get(&self.id).is_some_and(|s| !s.eof) {
            // Not read to its end: the peer may stop sending.
            let _ = st.conn.recv_stream(self.id).stop(0u32.into());
        }
        st.release(self.id);
        self.conn.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::testing::{connect, tapped_driver, Tapped};
    use crate::endpoint::{StreamWriter, Windows};
    use proptest::prelude::*;
    use quinn::SendStream;
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
                // Odd reads take their bytes out first (as the stream reader
                // does, to copy them without the connection's lock).
                let n = if read % 2 == 1 {
                    let before = q.len();
                    let mut taken = q.take(read);
                    prop_assert_eq!(taken.len(), read.min(before));
                    prop_assert_eq!(q.len(), before - taken.len());
                    taken.copy_out(&mut [IoSliceMut::new(&mut buf)])
                } else {
                    q.copy_out(&mut [IoSliceMut::new(&mut buf)])
                };
                out.extend_from_slice(&buf[..n]);
                prop_assert_eq!(out.len() + q.len(), at);
            }
            let mut rest = vec![0u8; q.len()];
            q.copy_out(&mut [IoSliceMut::new(&mut rest)]);
            out.extend_from_slice(&rest);
            prop_assert!(out == data, "bytes reordered or lost");
        }
    }

    /// What a stream pair needs kept alive: the client's endpoint and
    /// connection, the server (its ingress) and the served stream's writer;
    /// dropping it stops the driver.
    struct Keep {
        _client: (quinn::Endpoint, quinn::Connection, quinn::RecvStream),
        _driver: Tapped,
        _writer: StreamWriter,
    }

    /// A quinn client's stream to a tapped driver, and the driver's reader of
    /// it (one byte already read through it).
    async fn stream_pair() -> (SendStream, StreamReader, Keep) {
        let mut t = tapped_driver(|crypto| {
            Windows::fixed(Arc::new(quinn_proto::ServerConfig::with_crypto(crypto)))
        })
        .await;
        let (client, conn) = connect(&t).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let (mut reader, writer) = timeout(Duration::from_secs(10), t.tapped.recv())
            .await
            .unwrap()
            .unwrap();
        let mut one = [0u8; 1];
        reader.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        let keep = Keep {
            _client: (client, conn, recv),
            _driver: t,
            _writer: writer,
        };
        (send, reader, keep)
    }

    /// Reads `n` bytes with `recv_now`, waking on any byte (mark 1).
    async fn recv_all(r: &StreamReader, n: usize) -> Vec<u8> {
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
            // Exactly the mark: the rest stays in quinn-proto, inside its window.
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
        // what was sent), then the error, once, then the end.
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

//! Hostile peers against a `tcp://` server while well-behaved clients keep sending:
//! garbage or HTTP as the first bytes, a flood of connections that never send, a
//! per-listener connection limit under a flood, a peer sending one byte at a time,
//! and peers that reset their connection mid-payload. In each case every
//! acknowledged sample of the well-behaved clients arrives exactly once and
//! byte-exact, and the server keeps serving.
#![cfg(feature = "tcp")]

mod hardening;

use std::collections::HashMap;
use std::time::Duration;

use echo::{Server, Spec};
use echo_core::testkit::{kit_sample, kit_spec, kit_verify};
use hardening::{join_good, opts, rss_kib, spawn_good, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Samples whose first four bytes (the kit's client id) are below this are the
/// kit's and must verify; anything else came from a hostile peer's bytes.
const KIT_IDS: u32 = 100_000;

fn server(spec: &Spec, batch: usize) -> Server {
    Server::builder(spec.clone())
        .batch_size(batch)
        .registry(echo::registry())
        .build()
        .unwrap()
}

fn addr(url: &str) -> &str {
    url.strip_prefix("tcp://").expect("a tcp:// URL")
}

/// What the consumer received.
#[derive(Debug, Default)]
struct Tally {
    /// Kit samples: client id -> sequence numbers in arrival order.
    kit: HashMap<u32, Vec<u32>>,
    /// Samples that are not the kit's, as received.
    foreign: Vec<Vec<u8>>,
}

impl Tally {
    /// Client `id`'s samples are exactly `0..n`, in order.
    fn assert_exactly(&self, id: u32, n: u32) {
        let got = self.kit.get(&id).map(Vec::as_slice).unwrap_or_default();
        let want: Vec<u32> = (0..n).collect();
        assert!(
            got == want.as_slice(),
            "client {id}: expected seqs 0..{n} once each in order, got {} samples (first differences: {:?})",
            got.len(),
            got.iter().zip(&want).find(|(a, b)| a != b)
        );
    }

    /// Client `id`'s samples are `0..k` in order for some `k` in `min..=max`; returns `k`.
    fn assert_prefix(&self, id: u32, min: u32, max: u32) -> u32 {
        let got = self.kit.get(&id).map(Vec::as_slice).unwrap_or_default();
        let k = got.len() as u32;
        assert!(
            got.iter().copied().eq(0..k),
            "client {id}: samples are not a gap-free prefix once each: {got:?}"
        );
        assert!(
            (min..=max).contains(&k),
            "client {id}: {k} samples arrived, expected between {min} (acknowledged) and {max} (whole payloads sent)"
        );
        k
    }
}

/// Consumes every batch until the server has shut down and drained, checking
/// each kit sample byte for byte.
fn spawn_consumer(server: &Server) -> JoinHandle<Tally> {
    let server = server.clone();
    tokio::spawn(async move {
        let spec = server.spec().clone();
        let (mut p, mut scratch) = (Vec::new(), Vec::new());
        let mut tally = Tally::default();
        while let Some(batch) = server.next_batch().await {
            for k in 0..batch.len() {
                batch.copy_sample(k, &mut p);
                let client = u32::from_le_bytes(p[0..4].try_into().unwrap());
                if client < KIT_IDS {
                    let (c, s) =
                        kit_verify(&spec, &p, &mut scratch).unwrap_or_else(|e| panic!("{e}"));
                    tally.kit.entry(c).or_default().push(s);
                } else {
                    tally.foreign.push(p.clone());
                }
            }
        }
        tally
    })
}

/// Reads the server's handshake off a raw connection.
async fn read_handshake(s: &mut TcpStream, spec: &Spec) {
    let want = echo_core::wire::handshake_bytes(&spec.wire());
    let mut got = vec![0u8; want.len()];
    within(10, "reading the handshake", s.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(got, want, "handshake bytes");
}

/// Counts one-byte acks until the server closes; every byte must be an ack.
async fn read_acks_to_end(s: &mut TcpStream) -> usize {
    let mut rest = Vec::new();
    // A reset is as good as a close here: the acks read before it still count.
    let _ = within(10, "reading acks to the end", s.read_to_end(&mut rest)).await;
    assert!(rest.iter().all(|&b| b == 1), "non-ack bytes: {rest:?}");
    rest.len()
}

/// Deterministic noise whose 4-byte words never look like a kit client id.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The top bit of each word's last byte is set: every LE u32 is >= 2^31.
            if i % 4 == 3 {
                (x as u8) | 0x80
            } else {
                x as u8
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_http_as_first_bytes_is_data_and_harms_no_other_client() {
    within(30, "the test", async {
        let size = 64;
        let spec = kit_spec(size);
        let server = server(&spec, 16);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let consumer = spawn_consumer(&server);
        let good = spawn_good(&url, &spec, 0..4, 400);

        // Hostile byte streams: an HTTP request (with a long, never-repeating
        // header so that every 64-byte piece differs) and noise, each ending
        // inside a payload.
        let mut http = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad:".to_vec();
        let mut n = 0;
        while http.len() < 7 * size {
            http.extend_from_slice(format!(" {n}").as_bytes());
            n += 1;
        }
        http.extend_from_slice(b"\r\n\r\n");
        let peers = [http, noise(5 * size + 17, 7), noise(40 * size + 3, 11)];
        // Every whole payload a hostile peer sends, and where it came from.
        let mut pieces: HashMap<Vec<u8>, (usize, usize)> = HashMap::new();
        for (p, bytes) in peers.iter().enumerate() {
            assert_ne!(
                bytes.len() % size,
                0,
                "each hostile stream ends mid-payload"
            );
            for (i, piece) in bytes.chunks_exact(size).enumerate() {
                assert!(pieces.insert(piece.to_vec(), (p, i)).is_none());
            }
        }
        let mut acks = Vec::new();
        for bytes in &peers {
            let mut s = TcpStream::connect(addr(&url)).await.unwrap();
            // The peer writes before reading anything, as an HTTP client would.
            s.write_all(bytes).await.unwrap();
            s.shutdown().await.unwrap();
            read_handshake(&mut s, &spec).await;
            acks.push(read_acks_to_end(&mut s).await);
        }
        // The server still takes new clients afterwards.
        let later = spawn_good(&url, &spec, 4..6, 100);
        join_good(good).await;
        join_good(later).await;
        server.shutdown().await.unwrap();
        let tally = within(10, "the consumer", consumer).await.unwrap();

        for id in 0..4 {
            tally.assert_exactly(id, 400);
        }
        for id in 4..6 {
            tally.assert_exactly(id, 100);
        }
        assert_eq!(
            tally.kit.len(),
            6,
            "only the good clients' ids are kit samples"
        );
        // The hostile bytes were data, by the protocol: whole payloads arrive in
        // order, once, at least every acknowledged one; the partial tail never.
        let mut arrived: Vec<Vec<usize>> = vec![Vec::new(); peers.len()];
        for f in &tally.foreign {
            let &(p, i) = pieces
                .get(f)
                .unwrap_or_else(|| panic!("a sample that no peer sent whole arrived: {f:?}"));
            arrived[p].push(i);
        }
        eprintln!(
            "hostile peers: acks {acks:?}, arrived {:?}",
            arrived.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (p, got) in arrived.iter().enumerate() {
            let whole = peers[p].len() / size;
            assert!(
                got.iter().copied().eq(0..got.len()),
                "hostile peer {p}: payloads arrived out of order or twice: {got:?}"
            );
            assert!(
                got.len() >= acks[p] && got.len() <= whole,
                "hostile peer {p}: {} payloads arrived, {} acknowledged, {whole} sent whole",
                got.len(),
                acks[p]
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_keeps_memory_bounded_and_good_clients_served() {
    within(30, "the test", async {
        let spec = kit_spec(1024);
        let server = server(&spec, 16);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let consumer = spawn_consumer(&server);
        let before = rss_kib();
        // 200 connections that never read or send.
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(addr(&url)).await.unwrap());
        }
        let good = spawn_good(&url, &spec, 0..4, 500);
        join_good(good).await;
        // Every silent peer was admitted and handed the handshake; they are still open.
        let mut settled = false;
        for _ in 0..200 {
            let m = server.metrics();
            if m.transports["tcp"].connections_active == 200 {
                settled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            settled,
            "expected the 200 silent connections open, metrics: {:?}",
            server.metrics().transports["tcp"]
        );
        let after = rss_kib();
        eprintln!(
            "RSS before the flood {before} KiB, after 200 silent connections and 2000 samples {after} KiB"
        );
        assert!(
            after.saturating_sub(before) < 64 * 1024,
            "RSS grew by {} KiB with 200 silent connections (bound: 64 MiB, about 320 KiB each)",
            after - before
        );
        for s in idle.iter_mut().take(5) {
            read_handshake(s, &spec).await;
        }
        // Shutdown does not wait for the silent peers, and closes them.
        within(10, "shutdown with silent peers", server.shutdown())
            .await
            .unwrap();
        let tally = within(10, "the consumer", consumer).await.unwrap();
        for id in 0..4 {
            tally.assert_exactly(id, 500);
        }
        assert!(tally.foreign.is_empty());
        let mut s = idle.pop().unwrap();
        read_handshake(&mut s, &spec).await;
        assert_eq!(read_acks_to_end(&mut s).await, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_the_next_peer_is_closed_at_once() {
    within(30, "the test", async {
        let spec = kit_spec(64);
        let server = server(&spec, 8);
        let url = server
            .listen("tcp://127.0.0.1:0?max_connections=50")
            .await
            .unwrap();
        let consumer = spawn_consumer(&server);
        let mut idle = Vec::new();
        for _ in 0..49 {
            let mut s = TcpStream::connect(addr(&url)).await.unwrap();
            read_handshake(&mut s, &spec).await;
            idle.push(s);
        }
        // The 50th slot goes to a good client, which works.
        let mut good = echo::registry()
            .connect(&url, &spec, &opts())
            .await
            .unwrap();
        // Twenty more: each is closed before the handshake, not left hanging.
        for _ in 0..20 {
            let mut s = TcpStream::connect(addr(&url)).await.unwrap();
            let mut buf = [0u8; 64];
            let n = within(5, "a refused peer's read", s.read(&mut buf))
                .await
                .unwrap_or(0);
            assert_eq!(n, 0, "a refused peer got bytes: {:?}", &buf[..n]);
        }
        assert_eq!(server.metrics().transports["tcp"].connections_refused, 20);
        let mut buf = Vec::new();
        for seq in 0..100 {
            kit_sample(&spec, 0, seq, &mut buf);
            good.send(&buf).await.unwrap();
        }
        good.wait().await.unwrap();
        good.close().await.unwrap();
        // Freed slots are usable again.
        drop(idle);
        let again = loop {
            match echo::registry().connect(&url, &spec, &opts()).await {
                Ok(c) => break c,
                Err(e) if e.is_closed() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        };
        drop(again);
        let later = spawn_good(&url, &spec, 1..3, 50);
        join_good(later).await;
        server.shutdown().await.unwrap();
        let tally = within(10, "the consumer", consumer).await.unwrap();
        tally.assert_exactly(0, 100);
        tally.assert_exactly(1, 50);
        tally.assert_exactly(2, 50);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_one_byte_at_a_time_holds_only_its_connection() {
    within(30, "the test", async {
        let spec = kit_spec(40);
        let server = server(&spec, 8);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let consumer = spawn_consumer(&server);
        let slow = {
            let (url, spec) = (url.clone(), spec.clone());
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr(&url)).await.unwrap();
                read_handshake(&mut s, &spec).await;
                // One whole payload (40 bytes at one every 30 ms, 1.2 s), then
                // half of another, byte by byte.
                let mut bytes = Vec::new();
                kit_sample(&spec, 500, 0, &mut bytes);
                let mut next = Vec::new();
                kit_sample(&spec, 500, 1, &mut next);
                bytes.extend_from_slice(&next[..20]);
                for (i, b) in bytes.iter().enumerate() {
                    s.write_all(&[*b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    if i == 39 {
                        let mut ack = [0u8; 1];
                        within(5, "the slow peer's ack", s.read_exact(&mut ack))
                            .await
                            .unwrap();
                        assert_eq!(ack, [1]);
                    }
                }
                s
            })
        };
        let good = spawn_good(&url, &spec, 0..4, 500);
        join_good(good).await;
        let s = within(10, "the slow peer", slow).await.unwrap();
        // The slow peer leaves mid-payload.
        drop(s);
        server.shutdown().await.unwrap();
        let tally = within(10, "the consumer", consumer).await.unwrap();
        for id in 0..4 {
            tally.assert_exactly(id, 500);
        }
        tally.assert_exactly(500, 1);
        assert!(tally.foreign.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_resetting_mid_payload_lose_only_what_was_not_acknowledged() {
    within(30, "the test", async {
        let spec = kit_spec(256);
        let server = server(&spec, 8);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let consumer = spawn_consumer(&server);
        let good = spawn_good(&url, &spec, 0..3, 600);
        // Six peers, ids 100..106: 5 payloads acknowledged, 3 more sent, part of a
        // ninth, then a reset (RST: SO_LINGER 0, then close).
        let mut buf = Vec::new();
        for (k, id) in (100..106u32).enumerate() {
            let mut s = TcpStream::connect(addr(&url)).await.unwrap();
            read_handshake(&mut s, &spec).await;
            for seq in 0..5 {
                kit_sample(&spec, id, seq, &mut buf);
                s.write_all(&buf).await.unwrap();
            }
            let mut acks = [0u8; 5];
            within(5, "acks before the reset", s.read_exact(&mut acks))
                .await
                .unwrap();
            assert_eq!(acks, [1; 5]);
            for seq in 5..8 {
                kit_sample(&spec, id, seq, &mut buf);
                s.write_all(&buf).await.unwrap();
            }
            kit_sample(&spec, id, 8, &mut buf);
            // Cut at a different point each time.
            s.write_all(&buf[..1 + k * 50]).await.unwrap();
            s.set_zero_linger().unwrap();
            drop(s);
        }
        let later = spawn_good(&url, &spec, 3..5, 100);
        join_good(good).await;
        join_good(later).await;
        server.shutdown().await.unwrap();
        let tally = within(10, "the consumer", consumer).await.unwrap();
        for id in 0..3 {
            tally.assert_exactly(id, 600);
        }
        for id in 3..5 {
            tally.assert_exactly(id, 100);
        }
        for id in 100..106 {
            // Acknowledged: 0..5; sent whole: 0..8; the ninth never.
            tally.assert_prefix(id, 5, 8);
        }
        assert!(tally.foreign.is_empty());
    })
    .await
}

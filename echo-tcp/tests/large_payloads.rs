//! Large payloads over `tcp://`, which the server receives straight into the
//! store once a whole payload is in the socket's receive queue: a payload that
//! arrives slowly holds no batch open and still arrives; a reset mid-payload
//! delivers every whole payload queued before it and nothing partial; many
//! clients with a slow consumer get everything through exactly once, in order.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::time::Duration;

use echo_core::testkit::{kit_sample, kit_spec, kit_verify};
use echo_core::{Client, ClientOptions, Server, Spec};
use echo_tcp::TcpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

fn server(spec: &Spec, batch: usize, num_buffers: usize) -> Server {
    Server::builder(spec.clone())
        .batch_size(batch)
        .num_buffers(num_buffers)
        .registry(echo_tcp::registry())
        .build()
        .unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// A raw connection that has read the server's handshake.
async fn raw_client(url: &str, spec: &Spec) -> TcpStream {
    let mut s = TcpStream::connect(url.strip_prefix("tcp://").unwrap())
        .await
        .unwrap();
    let want = echo_core::wire::handshake_bytes(&spec.wire());
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, want);
    s
}

/// Bytes written to `s` that its peer's kernel has not acknowledged yet.
fn unacked(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through a valid pointer; the fd is open.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert!(r == 0, "TIOCOUTQ: {}", std::io::Error::last_os_error());
    n as usize
}

/// Every sample of every batch until the server is shut down and drained:
/// client id -> sequence numbers in arrival order, each checked byte for byte.
/// With `pause`, the consumer dawdles after each batch so that the ring fills.
fn spawn_consumer(server: &Server, pause: Option<Duration>) -> JoinHandle<HashMap<u32, Vec<u32>>> {
    let server = server.clone();
    tokio::spawn(async move {
        let spec = server.spec().clone();
        let (mut p, mut scratch) = (Vec::new(), Vec::new());
        let mut got: HashMap<u32, Vec<u32>> = HashMap::new();
        while let Some(batch) = server.next_batch().await {
            for k in 0..batch.len() {
                batch.copy_sample(k, &mut p);
                let (c, s) = kit_verify(&spec, &p, &mut scratch).unwrap_or_else(|e| panic!("{e}"));
                got.entry(c).or_default().push(s);
            }
            drop(batch);
            if let Some(d) = pause {
                tokio::time::sleep(d).await;
            }
        }
        got
    })
}

async fn send_all(url: String, spec: Spec, id: u32, n: u32) -> u64 {
    let mut c = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
    let mut buf = Vec::new();
    for seq in 0..n {
        kit_sample(&spec, id, seq, &mut buf);
        c.send(&buf).await.unwrap();
    }
    c.wait().await.unwrap();
    let acked = c.stats().acked;
    c.close().await.unwrap();
    acked
}

fn assert_exactly(got: &HashMap<u32, Vec<u32>>, id: u32, n: u32) {
    let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
    assert!(
        seqs.iter().copied().eq(0..n),
        "client {id}: expected seqs 0..{n} once each in order, got {} samples: {:?}",
        seqs.len(),
        &seqs[..seqs.len().min(40)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_arriving_large_payload_holds_no_batch_and_arrives() {
    within(60, async {
        let spec = kit_spec(256 * 1024);
        let server = server(&spec, 2, 2);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let mut slow = raw_client(&url, &spec).await;
        let mut p = Vec::new();
        kit_sample(&spec, 1, 0, &mut p);
        let piece = p.len() / 4;
        slow.write_all(&p[..piece]).await.unwrap();
        // The slow peer's first quarter is in; another client fills a whole
        // batch, which is handed out at once: no slot is held for the slow payload.
        assert_eq!(send_all(url.clone(), spec.clone(), 2, 2).await, 2);
        let first = server.next_batch().await.unwrap();
        let (mut q, mut scratch) = (Vec::new(), Vec::new());
        let ids: Vec<_> = (0..first.len())
            .map(|k| {
                first.copy_sample(k, &mut q);
                kit_verify(&spec, &q, &mut scratch).unwrap()
            })
            .collect();
        assert_eq!(ids, [(2, 0), (2, 1)]);
        drop(first);
        let consumer = spawn_consumer(&server, None);
        // The rest comes in pieces, slower than the server waits for a payload
        // to complete before reading it into the connection's buffer.
        for k in 1..4 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let end = if k == 3 { p.len() } else { (k + 1) * piece };
            slow.write_all(&p[k * piece..end]).await.unwrap();
        }
        let mut ack = [0u8; 1];
        slow.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [1]);
        // One more from the other client completes the second batch.
        let mut other = TcpClient::connect(&url, &spec, &opts()).await.unwrap();
        kit_sample(&spec, 3, 0, &mut p);
        other.send(&p).await.unwrap();
        other.wait().await.unwrap();
        other.close().await.unwrap();
        drop(slow);
        server.shutdown().await.unwrap();
        let got = consumer.await.unwrap();
        assert_exactly(&got, 1, 1);
        assert_exactly(&got, 3, 1);
        assert_eq!(got.len(), 2, "nothing else: {got:?}");
    })
    .await
}

/// A peer sends `whole` payloads and a part of one more, waits until the
/// server's kernel holds all of it, and resets the connection.
async fn send_then_reset(url: &str, spec: &Spec, id: u32, whole: u32, cut: usize) {
    let mut s = raw_client(url, spec).await;
    let mut p = Vec::new();
    for seq in 0..whole {
        kit_sample(spec, id, seq, &mut p);
        s.write_all(&p).await.unwrap();
    }
    kit_sample(spec, id, whole, &mut p);
    s.write_all(&p[..cut]).await.unwrap();
    while unacked(&s) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.set_zero_linger().unwrap();
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_payload_delivers_the_whole_payloads_before_it_and_nothing_partial() {
    within(60, async {
        let spec = kit_spec(128 * 1024);
        let ps = spec.payload_size();
        let server = server(&spec, 4, 3);
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let consumer = spawn_consumer(&server, None);
        let good: Vec<_> = (0..2)
            .map(|id| tokio::spawn(send_all(url.clone(), spec.clone(), id, 40)))
            .collect();
        // Peers 100.. reset with 0..3 whole payloads and a cut at different
        // points of the next one queued at the server.
        let cuts = [1, ps / 2, ps - 1];
        let mut peers = Vec::new();
        for (k, cut) in cuts.iter().enumerate() {
            for whole in 0..3u32 {
                let id = 100 + (k as u32) * 10 + whole;
                peers.push((id, whole));
                send_then_reset(&url, &spec, id, whole, *cut).await;
            }
        }
        for g in good {
            assert_eq!(g.await.unwrap(), 40);
        }
        // Clients after the resets are served as usual.
        assert_eq!(send_all(url.clone(), spec.clone(), 2, 10).await, 10);
        server.shutdown().await.unwrap();
        let got = consumer.await.unwrap();
        assert_exactly(&got, 0, 40);
        assert_exactly(&got, 1, 40);
        assert_exactly(&got, 2, 10);
        // Queued in the kernel before the reset, the whole payloads were still
        // read (every one, once); the cut one never arrives.
        for (id, whole) in peers {
            assert_exactly(&got, id, whole);
        }
    })
    .await
}

async fn many_clients_exactly_once(spec: Spec) {
    let server = server(&spec, 4, 2);
    let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
    // A consumer slow enough that the ring fills and connections wait for room.
    let consumer = spawn_consumer(&server, Some(Duration::from_millis(2)));
    let clients = 8u32;
    let per = 24u32;
    let senders: Vec<_> = (0..clients)
        .map(|id| tokio::spawn(send_all(url.clone(), spec.clone(), id, per)))
        .collect();
    for s in senders {
        assert_eq!(s.await.unwrap(), u64::from(per));
    }
    server.shutdown().await.unwrap();
    let got = consumer.await.unwrap();
    assert_eq!(
        got.len(),
        clients as usize,
        "clients seen: {:?}",
        got.keys()
    );
    for id in 0..clients {
        assert_exactly(&got, id, per);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_with_large_payloads_and_a_slow_consumer_get_exactly_once_in_order() {
    within(120, async {
        // Three leaves: each payload is scattered over three store buffers.
        many_clients_exactly_once(kit_spec(128 * 1024)).await;
        // One leaf: consecutive payloads are one region of the store.
        many_clients_exactly_once(Spec::bytes(128 * 1024).unwrap()).await;
    })
    .await
}

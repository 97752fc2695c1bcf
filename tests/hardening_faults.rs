//! Faults: client processes killed (SIGKILL) at arbitrary points, often inside a
//! payload, while in-process clients keep sending to the same `tcp://` server.
//! Every acknowledged sample of every client arrives exactly once and byte-exact;
//! a dead client's partial payload never does.
//!
//! The killed clients are this test binary re-executed with `ECHO_FAULT_CHILD`
//! set: a plain blocking wire v1 client that writes each payload in two halves
//! and prints `sent N` / `acked N` as it goes, so the parent knows what was
//! acknowledged before the kill.
#![cfg(feature = "tcp")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use echo::{ClientOptions, Server};
use echo_core::testkit::{kit_sample, kit_spec, kit_verify};

const CHILD_ENV: &str = "ECHO_FAULT_CHILD";
const SIZE: usize = 1024;
const TEST_NAME: &str = "killed_client_processes_lose_nothing_acknowledged";

/// Child mode: `ECHO_FAULT_CHILD=ADDR,ID`. Sends samples of `ID` until killed
/// (or for at most 20 s, so an orphan cannot linger).
fn child_main(arg: &str) -> ! {
    let (addr, id) = arg.split_once(',').expect("ADDR,ID");
    let id: u32 = id.parse().expect("a client id");
    let spec = kit_spec(SIZE);
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let want = echo_core::wire::handshake_bytes(&spec.wire());
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).expect("handshake");
    assert_eq!(got, want);
    let mut reader = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut acked = 0u64;
        let mut buf = [0u8; 256];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 1), "non-ack bytes");
                    acked += n as u64;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "acked {acked}").unwrap();
                    out.flush().unwrap();
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    let mut seq = 0u32;
    while Instant::now() < deadline {
        kit_sample(&spec, id, seq, &mut buf);
        let half = 1 + (seq as usize * 37) % (SIZE - 1);
        if s.write_all(&buf[..half]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
        if s.write_all(&buf[half..]).is_err() {
            break;
        }
        seq += 1;
        let mut out = std::io::stdout().lock();
        writeln!(out, "sent {seq}").unwrap();
        out.flush().unwrap();
    }
    std::process::exit(0)
}

/// What a child reported on stdout.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    sent: u64,
    acked: u64,
}

fn spawn_child(addr: &str, id: u32) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{addr},{id}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads a child's stdout on a thread, forwarding its progress.
fn watch(child: &mut Child, k: usize, tx: std::sync::mpsc::Sender<(usize, Progress)>) {
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut p = Progress::default();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("sent ") {
                p.sent = n.parse().unwrap();
            } else if let Some(n) = line.strip_prefix("acked ") {
                p.acked = n.parse().unwrap();
            } else {
                continue; // the test harness's own lines
            }
            if tx.send((k, p)).is_err() {
                break;
            }
        }
    });
}

#[test]
fn killed_client_processes_lose_nothing_acknowledged() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        child_main(&arg);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), run())
            .await
            .expect("the fault test took over 40 s")
    });
}

async fn run() {
    let spec = kit_spec(SIZE);
    let server = Server::builder(spec.clone())
        .batch_size(16)
        .registry(echo::registry())
        .build()
        .unwrap();
    let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
    let addr = url.strip_prefix("tcp://").unwrap().to_string();
    let consumer = {
        let server = server.clone();
        tokio::spawn(async move {
            let spec = server.spec().clone();
            let (mut p, mut scratch) = (Vec::new(), Vec::new());
            let mut got: HashMap<u32, Vec<u32>> = HashMap::new();
            while let Some(batch) = server.next_batch().await {
                for k in 0..batch.len() {
                    batch.copy_sample(k, &mut p);
                    // Byte-exact, or the test fails here: a dead client's partial
                    // payload completed by anyone else's bytes would not verify.
                    let (c, s) =
                        kit_verify(&spec, &p, &mut scratch).unwrap_or_else(|e| panic!("{e}"));
                    got.entry(c).or_default().push(s);
                }
            }
            got
        })
    };
    // In-process clients 0..4 send until every child is dead (at least 200 each).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut good = Vec::new();
    for id in 0..4u32 {
        let (url, spec, stop) = (url.clone(), spec.clone(), stop.clone());
        good.push(tokio::spawn(async move {
            let opts = ClientOptions {
                connect_timeout: Duration::from_secs(5),
                ..ClientOptions::default()
            };
            let mut c = echo::registry().connect(&url, &spec, &opts).await.unwrap();
            let mut buf = Vec::new();
            let mut seq = 0u32;
            while seq < 200 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                kit_sample(&spec, id, seq, &mut buf);
                c.send(&buf).await.unwrap();
                seq += 1;
            }
            c.wait().await.unwrap();
            let acked = c.stats().acked;
            assert_eq!(acked, u64::from(seq), "client {id}: acked after wait()");
            c.close().await.unwrap();
            seq
        }));
    }
    // Client processes 100.., each killed once it has this many samples
    // acknowledged; two at a time, so some die while others are starting.
    let kill_after = [3u64, 40, 97, 150, 260, 11];
    let ids: Vec<u32> = (0..kill_after.len() as u32).map(|k| 100 + k).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut last = vec![Progress::default(); ids.len()];
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    for pair in (0..ids.len()).collect::<Vec<_>>().chunks(2) {
        let mut children: Vec<(usize, Child)> = pair
            .iter()
            .map(|&k| {
                let mut c = spawn_child(&addr, ids[k]);
                watch(&mut c, k, tx.clone());
                (k, c)
            })
            .collect();
        let rx = rx.clone();
        let mut progress = last.clone();
        let (children_back, progress) = tokio::task::spawn_blocking(move || {
            let rx = rx.lock().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !children.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let (k, p) = rx
                    .recv_timeout(left)
                    .expect("client processes stopped reporting progress");
                progress[k] = p;
                if let Some(i) = children
                    .iter()
                    .position(|(c, _)| *c == k && p.acked >= kill_after[k])
                {
                    let (_, mut child) = children.swap_remove(i);
                    child.kill().unwrap(); // SIGKILL, wherever it is
                    child.wait().unwrap();
                }
            }
            (children, progress)
        })
        .await
        .unwrap();
        assert!(children_back.is_empty());
        last = progress;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(tx);
    // Progress lines written before the kill may still be in the pipes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok((k, p)) = rx.lock().unwrap().try_recv() {
        last[k].sent = last[k].sent.max(p.sent);
        last[k].acked = last[k].acked.max(p.acked);
    }
    let mut sent_by = Vec::new();
    for g in good {
        sent_by.push(g.await.unwrap());
    }
    server.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the consumer finished")
        .unwrap();
    for (id, &per) in sent_by.iter().enumerate() {
        let id = id as u32;
        let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
        eprintln!(
            "in-process client {id}: {per} sent and acknowledged, {} delivered",
            seqs.len()
        );
        assert!(
            seqs.iter().copied().eq(0..per),
            "client {id}: expected 0..{per} once each in order, got {} samples",
            seqs.len()
        );
    }
    for (k, &id) in ids.iter().enumerate() {
        let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
        let n = seqs.len() as u64;
        assert!(
            seqs.iter().copied().eq(0..n as u32),
            "killed client {id}: samples are not a gap-free prefix once each: {seqs:?}"
        );
        let Progress { sent, acked } = last[k];
        eprintln!("killed client {id}: {acked} acked, {sent} reported sent, {n} delivered");
        assert!(
            acked >= kill_after[k],
            "client {id} was killed before its acks"
        );
        // Everything acknowledged arrived; at most the payload being written when
        // the kill came beyond what the child reported sent.
        assert!(
            n >= acked && n <= sent + 1,
            "killed client {id}: {n} delivered, {acked} acknowledged, {sent} reported sent"
        );
    }
    assert_eq!(
        got.len(),
        4 + ids.len(),
        "unexpected client ids: {:?}",
        got.keys()
    );
}

/// Checks every sample of `batch` byte for byte and records it.
fn take_batch(batch: &echo::Batch, got: &mut HashMap<u32, Vec<u32>>) {
    let spec = batch.spec().clone();
    let (mut p, mut scratch) = (Vec::new(), Vec::new());
    for k in 0..batch.len() {
        batch.copy_sample(k, &mut p);
        let (c, s) = kit_verify(&spec, &p, &mut scratch).unwrap_or_else(|e| panic!("{e}"));
        got.entry(c).or_default().push(s);
    }
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stalled_for_seconds_keeps_memory_bounded_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let stall = Duration::from_secs(3);
    let run = async {
        let size = 16 * 1024;
        let spec = kit_spec(size);
        let server = Server::builder(spec.clone())
            .batch_size(16)
            .num_buffers(4)
            .registry(echo::registry())
            .build()
            .unwrap();
        let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for id in 0..4u32 {
            let (url, spec, stop) = (url.clone(), spec.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let opts = ClientOptions {
                    connect_timeout: Duration::from_secs(5),
                    ..ClientOptions::default()
                };
                let mut c = echo::registry().connect(&url, &spec, &opts).await.unwrap();
                let mut buf = Vec::new();
                let mut seq = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    kit_sample(&spec, id, seq, &mut buf);
                    c.send(&buf).await.unwrap();
                    seq += 1;
                }
                c.wait().await.unwrap();
                assert_eq!(
                    c.stats().acked,
                    u64::from(seq),
                    "client {id}: acked after wait()"
                );
                c.close().await.unwrap();
                seq
            }));
        }
        let mut got: HashMap<u32, Vec<u32>> = HashMap::new();
        let take = |batch: echo::Batch, got: &mut HashMap<u32, Vec<u32>>| take_batch(&batch, got);
        // Flowing: 20 batches.
        for _ in 0..20 {
            take(server.next_batch().await.unwrap(), &mut got);
        }
        // Stalled: nobody consumes; the clients keep trying.
        let before = rss_kib();
        let inserted_before = server.metrics().samples_inserted_total;
        let mut peak = before;
        let t = Instant::now();
        while t.elapsed() < stall {
            tokio::time::sleep(Duration::from_millis(50)).await;
            peak = peak.max(rss_kib());
        }
        let inserted_during = server.metrics().samples_inserted_total - inserted_before;
        // Resumed: the flow picks up, then the clients stop and everything drains.
        let resumed_at = got.values().map(Vec::len).sum::<usize>();
        for _ in 0..20 {
            take(server.next_batch().await.unwrap(), &mut got);
        }
        // The clients wait for their last acks, which need room in the ring:
        // keep consuming meanwhile.
        stop.store(true, Ordering::Relaxed);
        let drain = {
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(batch) = server.next_batch().await {
                    take_batch(&batch, &mut got);
                }
                got
            })
        };
        let mut sent = Vec::new();
        for c in clients {
            sent.push(c.await.unwrap());
        }
        server.shutdown().await.unwrap();
        let got = drain.await.unwrap();
        eprintln!(
            "stalled consumer: RSS {before} KiB at the stall, peak {peak} KiB over {stall:?}; \
             {inserted_during} samples inserted while stalled; {resumed_at} consumed before, \
             {} in all",
            got.values().map(Vec::len).sum::<usize>()
        );
        // The ring holds 4 x 16 samples of 16 KiB (allocated before the stall);
        // the per-connection queues (8 x 256 KiB each) and the clients' windows
        // (32 x 16 KiB each) add about 10 MiB at most. An unbounded server would
        // buffer everything the clients can send in 3 s instead (hundreds of MiB).
        assert!(
            peak.saturating_sub(before) < 64 * 1024,
            "RSS grew from {before} KiB to {peak} KiB while the consumer was stalled"
        );
        assert!(
            inserted_during <= 2 * 4 * 16,
            "{inserted_during} samples went into a ring of 64 while nobody consumed"
        );
        for (id, &n) in sent.iter().enumerate() {
            let id = id as u32;
            let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
            assert!(
                seqs.iter().copied().eq(0..n),
                "client {id}: expected 0..{n} once each in order, got {} samples",
                seqs.len()
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("the stalled-consumer test took over 40 s");
}

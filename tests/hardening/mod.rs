//! Helpers shared by the facade's hardening tests: time limits, the process's
//! resident set, a consumer that checks every kit sample byte for byte, and
//! well-behaved kit clients. (Each test binary uses some of them.)

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use echo::{Batch, ClientOptions, Server, Spec};
use echo_core::testkit::{kit_sample, kit_verify};
use tokio::task::JoinHandle;

/// Awaits `f`, panicking with `what` if it takes over `secs` seconds.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {secs} s"))
}

/// This process's resident set, in KiB (`VmRSS` in `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Client options for the tests' clients: a generous connect timeout, as the
/// tests share 2 cores.
pub fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

/// What a consumer received: client id -> sequence numbers in arrival order.
pub type Got = HashMap<u32, Vec<u32>>;

/// Checks every sample of `batch` byte for byte (it must be a kit sample) and
/// records it.
pub fn take_batch(batch: &Batch, got: &mut Got) {
    let spec = batch.spec().clone();
    let (mut p, mut scratch) = (Vec::new(), Vec::new());
    for k in 0..batch.len() {
        batch.copy_sample(k, &mut p);
        // Byte-exact, or the test fails here: a partial payload completed by
        // anyone else's bytes would not verify.
        let (c, s) = kit_verify(&spec, &p, &mut scratch).unwrap_or_else(|e| panic!("{e}"));
        got.entry(c).or_default().push(s);
    }
}

/// Consumes every batch until the server has shut down and drained.
pub fn spawn_consumer(server: &Server) -> JoinHandle<Got> {
    let server = server.clone();
    tokio::spawn(async move {
        let mut got = Got::new();
        while let Some(batch) = server.next_batch().await {
            take_batch(&batch, &mut got);
        }
        got
    })
}

/// Client `id`'s samples are exactly `0..n`, once each, in order.
pub fn assert_exactly(got: &Got, id: u32, n: u32) {
    let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
    assert_zero_to(id, seqs, n, "in order");
}

/// `seqs`, client `id`'s samples as `how` says they were taken, are `0..n`.
fn assert_zero_to(id: u32, seqs: &[u32], n: u32, how: &str) {
    assert!(
        seqs.iter().copied().eq(0..n),
        "client {id}: expected 0..{n} once each {how}, got {} samples (first difference: {:?})",
        seqs.len(),
        seqs.iter().copied().zip(0..n).find(|(a, b)| a != b)
    );
}

/// Client `id`'s samples are `0..k`, once each, in order, for some `k` in
/// `min..=max`; returns `k`.
pub fn assert_prefix(got: &Got, id: u32, min: u64, max: u64) -> u64 {
    let seqs = got.get(&id).map(Vec::as_slice).unwrap_or_default();
    let k = seqs.len() as u64;
    assert!(
        seqs.iter().copied().eq(0..k as u32),
        "client {id}: samples are not a gap-free prefix once each: {seqs:?}"
    );
    assert!(
        (min..=max).contains(&k),
        "client {id}: {k} samples arrived, expected between {min} (acknowledged) and {max} (sent)"
    );
    k
}

/// Client `id`'s samples are exactly `0..n`, once each, in any order (a client
/// spreading samples over several streams keeps no order between them).
pub fn assert_exactly_unordered(got: &Got, id: u32, n: u32) {
    let mut seqs = got.get(&id).cloned().unwrap_or_default();
    seqs.sort_unstable();
    assert_zero_to(id, &seqs, n, "in any order (sorted)");
}

/// Client `id`'s samples are distinct, all below `max`, and at least `min` of
/// them, in any order: what a client spreading samples over several streams
/// delivers when it dies with `min` acknowledged and `max` at most begun (each
/// stream loses only what it had not had acknowledged). Returns how many came.
pub fn assert_distinct_within(got: &Got, id: u32, min: u64, max: u64) -> u64 {
    let mut seqs = got.get(&id).cloned().unwrap_or_default();
    seqs.sort_unstable();
    let k = seqs.len() as u64;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "client {id}: a sample arrived twice"
    );
    assert!(
        seqs.last().is_none_or(|&s| u64::from(s) < max),
        "client {id}: sample {:?} arrived, but only 0..{max} were begun",
        seqs.last()
    );
    assert!(
        k >= min,
        "client {id}: {k} samples arrived, fewer than the {min} acknowledged"
    );
    k
}

/// A self-signed certificate for `name` and its key, written as PEM files
/// `cert.pem` and `key.pem` in `dir`; returns their paths.
pub fn self_signed(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A client of `url` for `spec`, through the facade's registry.
pub async fn connect(url: &str, spec: &Spec) -> Box<dyn echo::Client> {
    echo::registry()
        .connect(url, spec, &opts())
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Clients `ids` each send samples `0..n` at `url`, wait for every ack and
/// close; each returns `n`.
pub fn spawn_good(url: &str, spec: &Spec, ids: Range<u32>, n: u32) -> Vec<JoinHandle<u32>> {
    spawn_until_stopped(url, spec, ids, n, &Arc::new(AtomicBool::new(true)))
}

/// Waits for clients from [`spawn_good`] (30 s at most each).
pub async fn join_good(clients: Vec<JoinHandle<u32>>) {
    for c in clients {
        within(30, "a good client", c).await.unwrap();
    }
}

/// Clients `ids` each send samples until `stop` is set (and at least `min`),
/// then wait for every ack and close; each returns how many it sent.
pub fn spawn_until_stopped(
    url: &str,
    spec: &Spec,
    ids: Range<u32>,
    min: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<u32>> {
    ids.map(|id| {
        let (url, spec, stop) = (url.to_string(), spec.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = connect(&url, &spec).await;
            let mut buf = Vec::new();
            let mut seq = 0u32;
            while seq < min || !stop.load(Ordering::Relaxed) {
                kit_sample(&spec, id, seq, &mut buf);
                c.send(&buf).await.unwrap();
                seq += 1;
            }
            c.wait().await.unwrap();
            assert_eq!(c.stats().acked, u64::from(seq), "client {id}: acked");
            c.close().await.unwrap();
            seq
        })
    })
    .collect()
}

/// Clients `ids` each send samples until the server goes away; each returns
/// `(error, sent, acked)`, where `error` must be `ConnectionClosed`.
pub fn spawn_until_closed(
    url: &str,
    spec: &Spec,
    ids: Range<u32>,
) -> Vec<JoinHandle<(echo::Error, u64, u64)>> {
    ids.map(|id| {
        let (url, spec) = (url.to_string(), spec.clone());
        tokio::spawn(async move {
            let mut c = connect(&url, &spec).await;
            let mut buf = Vec::new();
            let mut seq = 0u32;
            let err = loop {
                kit_sample(&spec, id, seq, &mut buf);
                if let Err(e) = c.send(&buf).await {
                    break e;
                }
                seq += 1;
            };
            let acked = c.stats().acked;
            let _ = c.close().await;
            (err, u64::from(seq), acked)
        })
    })
    .collect()
}

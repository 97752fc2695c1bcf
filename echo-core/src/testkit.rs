//! The transport conformance kit: the same checks for every transport, ours and
//! downstream ones (enable the `testkit` feature in dev-dependencies).
//!
//! Implement [`Conformance`] for your transport and call [`run_all`] from a test:
//!
//! 1. [`exactly_once`]: K concurrent clients x N samples, each carrying its client id,
//!    sequence number and a checksum: every acknowledged sample arrives in exactly one
//!    batch, byte-exact, in per-client order (per stream).
//! 2. [`spec_mismatch`]: a client with another spec is refused at connect, with an
//!    error naming both specs.
//! 3. [`abort_mid_payload`]: a peer that disconnects inside a payload costs nothing
//!    else: the other clients' samples all arrive, no partial payload does.
//! 4. [`stalled_consumer`]: with the consumer stalled, clients block at `max_inflight`
//!    and the server's buffers stay bounded; when it resumes, everything arrives.
//! 5. [`shutdown_under_load`]: the consumer receives every acknowledged sample, and
//!    clients get `ConnectionClosed` instead of hanging.
//!
//! [`decoders`] holds the property checks for the decoders of untrusted bytes,
//! shared by echo-core's property tests and the cargo-fuzz targets; [`bench`](mod@bench)
//! what the benchmark programs share.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::spec::{DType, Leaf, Spec};
use crate::transport::{Client, ClientOptions};
use crate::wire::{self, Decoded, HandshakeDecoder, CLIENT_HELLO};
use crate::{Error, Registry, Result, Server};

pub mod bench;
pub mod decoders;

/// What the kit needs to know about a transport.
#[async_trait]
pub trait Conformance: Send + Sync {
    /// A registry holding the transport's scheme.
    fn registry(&self) -> Registry;

    /// A fresh URL to bind a server on (e.g. `tcp://127.0.0.1:0`, or a new socket path).
    fn bind_url(&self) -> String;

    /// Client options for the kit's clients (default: [`ClientOptions::default`]).
    fn client_options(&self) -> ClientOptions {
        ClientOptions::default()
    }

    /// Connects to `url` below the [`Client`] API, completes the handshake, sends
    /// `whole` (complete payloads) and then `partial` (part of one more payload),
    /// and drops the connection abruptly without waiting for acks.
    async fn send_then_abort(
        &self,
        url: &str,
        spec: &Spec,
        whole: &[u8],
        partial: &[u8],
    ) -> Result<()>;
}

/// The kit's sample layout for payloads of `size` bytes (at least 17): `meta` =
/// `[client, seq]` as u32, `check` = a u64 checksum of `data`, `data` = bytes
/// derived from `(client, seq)`.
pub fn kit_spec(size: usize) -> Spec {
    let data = size.saturating_sub(16).max(1) as u32;
    Spec::new(vec![
        Leaf::new("meta", vec![2], DType::Uint32),
        Leaf::new("check", vec![], DType::Uint64),
        Leaf::new("data", vec![data], DType::Uint8),
    ])
    .expect("kit spec is valid")
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes sample `seq` of `client` for `spec` (from [`kit_spec`]) into `out`.
pub fn kit_sample(spec: &Spec, client: u32, seq: u32, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&client.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let mut x = (u64::from(client) << 32 | u64::from(seq)) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..spec.payload_size() - 16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    let c = checksum(&out[16..]);
    out[8..16].copy_from_slice(&c.to_le_bytes());
}

/// Checks a received payload; returns `(client, seq)`.
pub fn kit_verify(spec: &Spec, payload: &[u8], scratch: &mut Vec<u8>) -> Result<(u32, u32)> {
    let client = u32::from_le_bytes(payload[0..4].try_into().unwrap_or_default());
    let seq = u32::from_le_bytes(payload[4..8].try_into().unwrap_or_default());
    kit_sample(spec, client, seq, scratch);
    if scratch.as_slice() != payload {
        return Err(Error::Other(format!(
            "sample (client {client}, seq {seq}) arrived corrupted"
        )));
    }
    Ok((client, seq))
}

/// What the consumer collected.
#[derive(Debug, Default)]
pub struct Collected {
    /// `(client, seq)` in arrival order.
    pub samples: Vec<(u32, u32)>,
    /// Batches received.
    pub batches: usize,
    /// Partial batches received (at most one, the last).
    pub partial: usize,
}

async fn collect_until(server: &Server, want: Option<usize>) -> Result<Collected> {
    let spec = server.spec().clone();
    let mut got = Collected::default();
    let mut seen = HashSet::new();
    let (mut payload, mut scratch) = (Vec::new(), Vec::new());
    while want.is_none_or(|w| got.samples.len() < w) {
        let Some(batch) = server.next_batch().await else {
            break;
        };
        got.batches += 1;
        if batch.is_partial() {
            got.partial += 1;
        }
        for k in 0..batch.len() {
            batch.copy_sample(k, &mut payload);
            let id = kit_verify(&spec, &payload, &mut scratch)?;
            if !seen.insert(id) {
                return Err(Error::Other(format!(
                    "sample (client {}, seq {}) arrived twice",
                    id.0, id.1
                )));
            }
            got.samples.push(id);
        }
    }
    Ok(got)
}

async fn within<T>(what: &str, secs: u64, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .map_err(|_| Error::Timeout(format!("conformance check `{what}` took over {secs} s")))?
}

fn fail(msg: String) -> Error {
    Error::Other(msg)
}

async fn server_for<K: Conformance + ?Sized>(
    kit: &K,
    spec: &Spec,
    batch_size: usize,
) -> Result<(Server, String)> {
    let server = Server::builder(spec.clone())
        .batch_size(batch_size)
        .registry(kit.registry())
        .build()?;
    let url = server.listen(&kit.bind_url()).await?;
    Ok((server, url))
}

async fn send_all(mut client: Box<dyn Client>, spec: Spec, id: u32, n: u32) -> Result<()> {
    let mut buf = Vec::new();
    for seq in 0..n {
        kit_sample(&spec, id, seq, &mut buf);
        // Both ways of sending: borrowed, and handed over (which a client may
        // keep without copying until the server has it).
        if seq % 2 == 0 {
            client.send(&buf).await?;
        } else {
            client.send_bytes(bytes::Bytes::from(buf.clone())).await?;
        }
    }
    client.wait().await?;
    let stats = client.stats();
    if stats.acked != u64::from(n) {
        return Err(fail(format!(
            "client {id}: {} of {n} acked after wait()",
            stats.acked
        )));
    }
    client.close().await?;
    client.close().await?; // idempotent
    match client.send(&buf).await {
        Err(e) if e.is_closed() => {}
        other => {
            return Err(fail(format!(
                "client {id}: send after close gave {other:?}, expected ConnectionClosed"
            )))
        }
    }
    match client.send_bytes(bytes::Bytes::from(buf)).await {
        Err(e) if e.is_closed() => Ok(()),
        other => Err(fail(format!(
            "client {id}: send_bytes after close gave {other:?}, expected ConnectionClosed"
        ))),
    }
}

/// Check 1: `clients` x `samples` samples of `size` bytes arrive exactly once,
/// byte-exact, in per-client order (when `ordered`); each client sends every
/// other sample with [`Client::send_bytes`], the rest with [`Client::send`].
pub async fn exactly_once<K: Conformance + ?Sized>(
    kit: &K,
    clients: u32,
    samples: u32,
    size: usize,
    ordered: bool,
) -> Result<()> {
    within("exactly_once", 120, async {
        let spec = kit_spec(size);
        let (server, url) = server_for(kit, &spec, 16).await?;
        let total = (clients * samples) as usize;
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { collect_until(&server, Some(total)).await })
        };
        let mut senders = Vec::new();
        for id in 0..clients {
            let client = kit
                .registry()
                .connect(&url, &spec, &kit.client_options())
                .await?;
            senders.push(tokio::spawn(send_all(client, spec.clone(), id, samples)));
        }
        for s in senders {
            s.await.map_err(|e| fail(e.to_string()))??;
        }
        server.shutdown().await?;
        let got = consumer.await.map_err(|e| fail(e.to_string()))??;
        if got.samples.len() != total {
            return Err(fail(format!(
                "{} of {total} samples arrived",
                got.samples.len()
            )));
        }
        if ordered {
            let mut last: HashMap<u32, u32> = HashMap::new();
            for (c, s) in &got.samples {
                if let Some(prev) = last.insert(*c, *s) {
                    if *s != prev + 1 {
                        return Err(fail(format!("client {c}: seq {s} arrived after {prev}")));
                    }
                }
            }
        }
        // Whatever was left is handed out after shutdown, then nothing.
        let rest = collect_until(&server, None).await?;
        if !rest.samples.is_empty() {
            return Err(fail(format!(
                "{} extra samples arrived",
                rest.samples.len()
            )));
        }
        Ok(())
    })
    .await
}

/// Check 2: a client whose spec differs is refused at connect, naming both specs.
pub async fn spec_mismatch<K: Conformance + ?Sized>(kit: &K) -> Result<()> {
    within("spec_mismatch", 30, async {
        let spec = kit_spec(64);
        let (server, url) = server_for(kit, &spec, 4).await?;
        let other = kit_spec(80);
        let r = kit
            .registry()
            .connect(&url, &other, &kit.client_options())
            .await;
        let e = match r {
            Ok(_) => return Err(fail("a client with another spec was accepted".into())),
            Err(e) => e,
        };
        let msg = e.to_string();
        if !matches!(e, Error::SpecMismatch(_)) || !msg.contains("[48]") || !msg.contains("[64]") {
            return Err(fail(format!(
                "mismatch error should be SpecMismatch naming both specs, got: {msg}"
            )));
        }
        // The server still serves a matching client.
        let client = kit
            .registry()
            .connect(&url, &spec, &kit.client_options())
            .await?;
        send_all(client, spec.clone(), 0, 4).await?;
        let got = collect_until(&server, Some(4)).await?;
        server.shutdown().await?;
        if got.samples.len() != 4 {
            return Err(fail("matching client's samples did not arrive".into()));
        }
        Ok(())
    })
    .await
}

/// Check 3: a peer that disconnects mid-payload costs nothing else.
pub async fn abort_mid_payload<K: Conformance + ?Sized>(kit: &K) -> Result<()> {
    within("abort_mid_payload", 60, async {
        let spec = kit_spec(256);
        let (server, url) = server_for(kit, &spec, 8).await?;
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { collect_until(&server, None).await })
        };
        let good = 3u32;
        let per = 200u32;
        let mut senders = Vec::new();
        for id in 0..good {
            let client = kit
                .registry()
                .connect(&url, &spec, &kit.client_options())
                .await?;
            senders.push(tokio::spawn(send_all(client, spec.clone(), id, per)));
        }
        // Three peers, ids 100.., each send five whole payloads and part of a sixth.
        let mut buf = Vec::new();
        for bad_id in 100..103 {
            let mut whole = Vec::new();
            for seq in 0..5 {
                kit_sample(&spec, bad_id, seq, &mut buf);
                whole.extend_from_slice(&buf);
            }
            kit_sample(&spec, bad_id, 5, &mut buf);
            kit.send_then_abort(&url, &spec, &whole, &buf[..100])
                .await?;
        }
        for s in senders {
            s.await.map_err(|e| fail(e.to_string()))??;
        }
        server.shutdown().await?;
        let got = consumer.await.map_err(|e| fail(e.to_string()))??;
        let good_count = got.samples.iter().filter(|(c, _)| *c < good).count();
        if good_count != (good * per) as usize {
            return Err(fail(format!(
                "{good_count} of {} well-behaved samples arrived",
                good * per
            )));
        }
        if got.samples.iter().any(|&(c, s)| c >= 100 && s >= 5) {
            return Err(fail("a partial payload reached a batch".into()));
        }
        Ok(())
    })
    .await
}

/// Check 4: a stalled consumer makes clients block at `max_inflight` with bounded
/// buffering; when it resumes, everything arrives.
pub async fn stalled_consumer<K: Conformance + ?Sized>(kit: &K) -> Result<()> {
    within("stalled_consumer", 90, async {
        let spec = kit_spec(1024);
        let batch = 8;
        let server = Server::builder(spec.clone())
            .batch_size(batch)
            .num_buffers(2)
            .queue_size(2)
            .registry(kit.registry())
            .build()?;
        let url = server.listen(&kit.bind_url()).await?;
        let clients = 3u32;
        let per = 400u32;
        let mut senders = Vec::new();
        for id in 0..clients {
            let client = kit
                .registry()
                .connect(&url, &spec, &kit.client_options())
                .await?;
            senders.push(tokio::spawn(send_all(client, spec.clone(), id, per)));
        }
        // Let the clients fill every buffer while nobody consumes.
        let mut last = u64::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let m = server.metrics();
            if m.samples_inserted_total == last {
                break;
            }
            last = m.samples_inserted_total;
        }
        let m = server.metrics();
        let capacity = (batch * 2) as u64;
        // Reserved slots may run one batch ahead per drainer waiting for space.
        if m.samples_inserted_total > capacity || m.store_size > capacity + batch as u64 {
            return Err(fail(format!(
                "stalled consumer: {} samples inserted, {} reserved, in a ring of {capacity}",
                m.samples_inserted_total, m.store_size
            )));
        }
        if senders.iter().any(|s| s.is_finished()) {
            return Err(fail("a client finished although nobody consumed".into()));
        }
        // Acknowledged but not yet in the store: bounded by the queues and the clients' windows.
        let queued: u64 = m.transports.values().map(|t| t.samples).sum::<u64>();
        let bound = capacity + clients as u64 * kit.client_options().max_inflight as u64 * 4;
        if queued > bound {
            return Err(fail(format!(
                "{queued} samples buffered with the consumer stalled; expected at most {bound}"
            )));
        }
        let got = collect_until(&server, Some((clients * per) as usize)).await?;
        for s in senders {
            s.await.map_err(|e| fail(e.to_string()))??;
        }
        server.shutdown().await?;
        if got.samples.len() != (clients * per) as usize {
            return Err(fail(
                "not everything arrived after the consumer resumed".into(),
            ));
        }
        Ok(())
    })
    .await
}

/// Check 5: shutdown under load: every acknowledged sample reaches the consumer,
/// clients see `ConnectionClosed` rather than hanging.
pub async fn shutdown_under_load<K: Conformance + ?Sized>(kit: &K) -> Result<()> {
    within("shutdown_under_load", 90, async {
        let spec = kit_spec(512);
        let (server, url) = server_for(kit, &spec, 8).await?;
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move { collect_until(&server, None).await })
        };
        let clients = 4u32;
        let mut senders = Vec::new();
        for id in 0..clients {
            let mut client = kit
                .registry()
                .connect(&url, &spec, &kit.client_options())
                .await?;
            let spec = spec.clone();
            senders.push(tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut seq = 0u32;
                let err = loop {
                    kit_sample(&spec, id, seq, &mut buf);
                    if let Err(e) = client.send(&buf).await {
                        break e;
                    }
                    seq += 1;
                    if seq > 5_000_000 {
                        return Err(fail("client never saw the shutdown".into()));
                    }
                };
                let acked = client.stats().acked;
                let _ = client.close().await;
                Ok::<_, Error>((err, acked))
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.shutdown().await?;
        let mut acked_per = HashMap::new();
        for (id, s) in senders.into_iter().enumerate() {
            let (err, acked) = tokio::time::timeout(Duration::from_secs(20), s)
                .await
                .map_err(|_| fail(format!("client {id} hung after shutdown")))?
                .map_err(|e| fail(e.to_string()))??;
            if !err.is_closed() {
                return Err(fail(format!(
                    "client {id} got {err}, expected ConnectionClosed"
                )));
            }
            acked_per.insert(id as u32, acked);
        }
        let got = consumer.await.map_err(|e| fail(e.to_string()))??;
        if got.partial > 1 {
            return Err(fail(format!("{} partial batches", got.partial)));
        }
        let mut recv_per: HashMap<u32, u64> = HashMap::new();
        for (c, _) in &got.samples {
            *recv_per.entry(*c).or_default() += 1;
        }
        for (id, acked) in acked_per {
            let recv = recv_per.get(&id).copied().unwrap_or(0);
            if recv < acked {
                return Err(fail(format!(
                    "client {id}: {acked} acked but {recv} delivered"
                )));
            }
        }
        if got.samples.is_empty() {
            return Err(fail("no samples arrived before shutdown".into()));
        }
        Ok(())
    })
    .await
}

/// Runs every check, with per-client order required (`ordered`) for transports that
/// keep it (all but multi-stream ones).
pub async fn run_all<K: Conformance + ?Sized>(kit: &K, ordered: bool) -> Result<()> {
    exactly_once(kit, 4, 500, 64, ordered).await?;
    exactly_once(kit, 2, 40, 256 * 1024, ordered).await?;
    spec_mismatch(kit).await?;
    abort_mid_payload(kit).await?;
    stalled_consumer(kit).await?;
    shutdown_under_load(kit).await?;
    Ok(())
}

/// [`Conformance::send_then_abort`] for byte-stream transports: runs the client side
/// of the handshake on `reader`/`writer`, writes the bytes and returns (dropping
/// both halves closes the stream).
pub async fn stream_send_then_abort<R, W>(
    mut reader: R,
    mut writer: W,
    send_hello: bool,
    whole: &[u8],
    partial: &[u8],
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if send_hello {
        writer.write_all(&CLIENT_HELLO).await?;
    }
    let mut dec = HandshakeDecoder::new(wire::HandshakeLimits::default());
    let mut buf = [0u8; 512];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(Error::closed("server closed during the handshake"));
        }
        if let Decoded::Done { .. } = dec.feed(&buf[..n])? {
            break;
        }
    }
    writer.write_all(whole).await?;
    writer.write_all(partial).await?;
    writer.flush().await?;
    // Give the server a moment to read, so the abort really is mid-payload.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

/// The Python interpreter of the project's venv, for interop tests: `$ECHO_PYTHON`
/// if set, else `.venv/bin/python` at the workspace root (made by
/// `scripts/setup-python.sh`). Panics with instructions when it is missing, so a
/// test that needs Python fails loudly instead of skipping.
pub fn python_interpreter() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ECHO_PYTHON") {
        return p.into();
    }
    let root = workspace_root();
    let py = root.join(".venv").join("bin").join("python");
    assert!(
        py.exists(),
        "interop tests need the project's Python venv at {}: run scripts/setup-python.sh \
         (scripts/test.sh does it) or set ECHO_PYTHON",
        py.display()
    );
    py
}

/// The workspace root (the directory holding `Cargo.lock`), found from this crate's
/// manifest directory or the current directory.
pub fn workspace_root() -> std::path::PathBuf {
    let start = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut dir = start.as_path();
    loop {
        if dir.join("Cargo.lock").exists() || dir.join(".git").exists() {
            return dir.to_path_buf();
        }
        match dir.parent() {
            Some(p) => dir = p,
            None => return start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem;

    #[async_trait]
    impl Conformance for Mem {
        fn registry(&self) -> Registry {
            Registry::with_core()
        }

        fn bind_url(&self) -> String {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            format!("mem://kit-{}", N.fetch_add(1, Ordering::Relaxed))
        }

        async fn send_then_abort(
            &self,
            url: &str,
            _spec: &Spec,
            whole: &[u8],
            partial: &[u8],
        ) -> Result<()> {
            let (r, w) = crate::mem::raw_connect(url).await?;
            stream_send_then_abort(r, w, false, whole, partial).await
        }
    }

    #[test]
    fn samples_verify_and_detect_corruption() {
        let spec = kit_spec(40);
        let (mut a, mut s) = (Vec::new(), Vec::new());
        kit_sample(&spec, 3, 7, &mut a);
        assert_eq!(a.len(), 40);
        assert_eq!(kit_verify(&spec, &a, &mut s).unwrap(), (3, 7));
        a[30] ^= 1;
        assert!(kit_verify(&spec, &a, &mut s).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mem_transport_passes_the_kit() {
        run_all(&Mem, true).await.unwrap();
    }
}

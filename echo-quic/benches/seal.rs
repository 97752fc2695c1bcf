//! QUIC packet protection: sealing and opening one packet with rustls's own
//! *ring* AES-128-GCM key and with `quic://`'s (`echo_quic::crypto_provider`,
//! which hands packets of 4 KiB or more to graviola's AVX-512 code on CPUs
//! that have it), for packet payloads from a 1500-byte path's to a loopback
//! packet's. Both keys are QUIC initial keys for the same connection ID, so
//! they seal to the same bytes.
//!
//! `cargo bench -p echo-quic --bench seal`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rustls::quic::{Keys, PacketKey, Version};
use rustls::{Side, SupportedCipherSuite};

/// Payload lengths: a 1500-byte path's packet, two sizes around where
/// `quic://` switches code, a jumbo frame's and a 64 KiB loopback packet's.
const SIZES: [usize; 6] = [1_400, 2_300, 4_096, 6_450, 16_384, 65_440];
const HEADER: [u8; 24] = [0x41; 24];

fn key(suite: SupportedCipherSuite, side: Side) -> Box<dyn PacketKey> {
    let t = suite.tls13().expect("a TLS 1.3 suite");
    let keys = Keys::initial(Version::V1, t, t.quic.expect("QUIC"), &[7; 8], side);
    match side {
        Side::Client => keys.local.packet,
        Side::Server => keys.remote.packet,
    }
}

fn suites() -> [(&'static str, SupportedCipherSuite); 2] {
    [
        (
            "ring",
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ),
        ("echo-quic", echo_quic::crypto_provider().cipher_suites[0]),
    ]
}

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for (name, suite) in suites() {
            let k = key(suite, Side::Client);
            let mut buf = vec![0x5a; size];
            let mut pn = 0u64;
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    pn += 1;
                    black_box(k.encrypt_in_place(pn, &HEADER, &mut buf).expect("seal"))
                })
            });
        }
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for (name, suite) in suites() {
            // One sealed packet, opened again and again from a fresh copy
            // (opening decrypts in place); the copy is in both columns.
            let mut packet = vec![0x5a; size];
            let tag = key(suite, Side::Client)
                .encrypt_in_place(9, &HEADER, &mut packet)
                .expect("seal");
            packet.extend_from_slice(tag.as_ref());
            let k = key(suite, Side::Server);
            let mut buf = packet.clone();
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    buf.copy_from_slice(&packet);
                    black_box(
                        k.decrypt_in_place(9, &HEADER, &mut buf)
                            .expect("open")
                            .len(),
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, seal, open);
criterion_main!(benches);

//! The `quic://` transport for echo: wire v1 on QUIC streams, always encrypted
//! (TLS 1.3 via rustls with the *ring* provider, ALPN `echo/1`; on x86-64
//! CPUs with AVX-512, packets of 4 KiB or more are sealed and opened with
//! graviola's AES-GCM, see [`crypto_provider`]).
//!
//! * Server: `quic://HOST:PORT`, with `?cert=PATH&key=PATH` to serve a given
//!   certificate, or else a generated self-signed one whose certificate is
//!   written to `?cert_out=PATH` (default: a file in the temp directory named
//!   after the bound address) and reported by [`Transport::details`] as `cert`.
//!   The listener's URL carries `?ca=` pointing at that file, so it can be handed
//!   to clients as is.
//! * Client: `quic://HOST:PORT?ca=PATH[&server_name=NAME][&streams=N]`: trusts
//!   exactly the certificates in `ca`. Certificate, name and ALPN failures are
//!   reported as [`Error::Tls`] saying which it was. There is no mode that skips
//!   verification.
//! * Each client-opened bidirectional stream carries wire v1: the client's hello
//!   (a QUIC stream is invisible to the server until the client writes), the
//!   server's handshake, raw payloads and one-byte acks, served by
//!   [`echo_core::stream::serve_stream_direct`] like TCP: payloads of 64 KiB
//!   or more go from the decrypted datagrams straight into the store once a
//!   whole one has arrived. A client may spread samples
//!   over several streams of one connection; each stream has its own flow
//!   control, so a stalled stream does not stall the others. `max_inflight` is
//!   per client, split over its streams.
//!
//! Clients run on quinn. The server drives quinn's protocol crate
//! (quinn-proto) itself: one thread per listener receives the datagrams,
//! decrypts them and runs the listener's stream tasks (a single-threaded Tokio
//! runtime of its own), which takes 15-19 % off the server's CPU per
//! byte at 1 MiB against quinn's endpoint and connection tasks, and avoids
//! its copy of every datagram (BENCHMARKS.md, "QUIC"). One listener's QUIC
//! traffic is thus bounded by one core (170-200 µs of CPU per MiB on the
//! benchmark host, so about 5-6 GB/s of 1 MiB samples: the more with
//! AVX-512); a server that needs more can listen on several ports.
//!
//! Flow-control windows, congestion control and packet sizes are in [`Tuning`];
//! the server bounds streams per connection (`max_streams`) and connections
//! (`max_conns`, and the server's `max_connections` over all streams).
//!
//! [`Transport::details`]: echo_core::Transport::details
//! [`Error::Tls`]: echo_core::Error::Tls

mod client;
mod config;
mod endpoint;
mod recv;
mod seal;
mod send;
mod server;
mod tls;
mod udp;

use std::sync::Arc;

use echo_core::{Registry, Result};

pub use client::{
    raw_connection, QuicClient, QuicClientFactory, DEFAULT_LINGER, MAX_CLIENT_STREAMS,
};
pub use config::{Congestion, Tuning};
pub use quinn;
pub use server::{
    QuicTransport, QuicTransportFactory, CODE_REFUSED, CODE_SHUTDOWN, DEFAULT_MAX_STREAMS,
};
pub use tls::{crypto_provider, load_certs, load_key, ALPN};

/// Registers `quic` in `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        "quic",
        Arc::new(QuicTransportFactory),
        Arc::new(QuicClientFactory::default()),
    )
}

/// A QUIC connection error in words, for logs.
pub(crate) fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(c) if c.error_code == 0u32.into() => "closed by the peer".into(),
        E::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::crypto(120) => {
            format!(
                "ALPN mismatch: the peer does not speak {:?} ({c})",
                String::from_utf8_lossy(ALPN)
            )
        }
        E::TimedOut => "idle timeout".into(),
        other => other.to_string(),
    }
}

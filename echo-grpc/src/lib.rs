//! The gRPC transport for echo: `grpc://host:port` and, with TLS, `grpcs://host:port`.
//!
//! The contract is `proto/echo.proto` (package `echo.v1`), which any language's
//! gRPC tooling compiles: a unary `GetSpec` call returns the server's spec and
//! limits, and a bidirectional `Push` stream carries messages of one or more
//! payloads each, answered with cumulative ack counts.
//!
//! * Server ([`GrpcTransportFactory`], bound through the [`Registry`]): tonic over
//!   HTTP/2. Each message's `payloads` field is decoded as [`bytes::Bytes`] sliced
//!   out of tonic's receive buffer and queued in the ingress as is, so the only copy
//!   after HTTP/2 is the one into the batch. A message with a wrong-size payload is
//!   refused with `INVALID_ARGUMENT` naming the expected and received sizes; what was
//!   acknowledged before it stays delivered.
//! * Client ([`GrpcClient`]): checks the spec, packs every payload waiting to go
//!   into one message (up to the server's per-message limit), keeps at most
//!   `max_inflight` payloads unacknowledged. `send` copies the payload once, into a
//!   pooled message buffer with room for the gRPC and protobuf framing in front;
//!   the framed message goes to HTTP/2 as is (the Push stream's request body is
//!   written directly on the tonic channel, bypassing the generated client's
//!   encoder and its second copy). `GetSpec` uses the generated client.
//! * Security: `grpcs://` is TLS with rustls (ring); a bearer token, when the server
//!   sets one, is checked on every call before anything is read.
//! * Bounds: each Push stream is one ingress connection (counted against
//!   `max_connections`; over it, `UNAVAILABLE`), TCP connections with or
//!   without a stream to twice `max_connections` (one more is closed as soon as it
//!   is accepted and counted as refused), messages are limited to
//!   `max_payloads` payloads, the TLS handshake to the handshake timeout, and
//!   HTTP/2 keepalive pings (every 30 s, 20 s to answer) drop peers that vanished.
//!
//! # URL options
//!
//! Server (`Server::listen`):
//!
//! | option | meaning |
//! |---|---|
//! | `cert`, `key` | PEM certificate chain and private key (required for `grpcs`, refused for `grpc`) |
//! | `token`, `token_file` | require `authorization: Bearer <token>` on every call |
//! | `max_payloads` | most payloads per message (default: as many as fit in the ingress chunk size, 256 KiB, at least 1) |
//! | `window` | HTTP/2 receive window per stream, bytes (default [`DEFAULT_STREAM_WINDOW`], raised to hold two full messages) |
//! | `conn_window` | HTTP/2 receive window per connection (default: twice `window`) |
//! | `frame` | largest HTTP/2 DATA frame the server accepts (default [`DEFAULT_MAX_FRAME`]) |
//!
//! Client (`Registry::connect`):
//!
//! | option | meaning |
//! |---|---|
//! | `ca` | PEM file of trusted certificates: a CA, or the server's self-signed certificate |
//! | `pin` | PEM file holding the server's exact certificate: only it is accepted (names are not checked) |
//! | `domain` | the name to verify in the server's certificate (default: the URL's host) |
//! | `token`, `token_file` | the bearer token to send |
//! | `max_payloads` | most payloads per message (default and cap: the server's limit) |
//!
//! Example: `grpcs://127.0.0.1:0?cert=/etc/echo/cert.pem&key=/etc/echo/key.pem&token_file=/etc/echo/token`
//! on the server; `grpcs://learner:7000?ca=/etc/echo/ca.pem&token_file=/etc/echo/token` on a client.
//!
//! # HTTP/2 tuning
//!
//! Samples flow client to server, so the server's receive windows bound how much
//! one stream may have in flight before the server reads it. The defaults
//! ([`DEFAULT_STREAM_WINDOW`] per stream, at least two full messages; twice that per
//! connection) keep a 1 MiB-payload stream from stalling on window updates, and the
//! larger DATA frames ([`DEFAULT_MAX_FRAME`]) cut per-frame work. BENCHMARKS.md,
//! section "gRPC", has the measurements behind these values.

mod client;
mod config;
mod incoming;
mod server;
mod tls;

/// The code generated from `proto/echo.proto` (package `echo.v1`): messages,
/// the `echo_client::EchoClient` and the `echo_server::Echo` service trait.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/echo.v1.rs"));
}

use std::sync::Arc;

pub use client::{api_client, BearerToken, EchoApi, GrpcClient, GrpcClientFactory};
pub use config::{DEFAULT_MAX_FRAME, DEFAULT_STREAM_WINDOW};
pub use server::{GrpcTransport, GrpcTransportFactory};

use echo_core::{Registry, Result};

/// Registers `grpc` and `grpcs` in `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let transports = Arc::new(GrpcTransportFactory);
    let clients = Arc::new(GrpcClientFactory);
    registry.register("grpc", transports.clone(), clients.clone())?;
    registry.register("grpcs", transports, clients)
}

/// A registry with core's transports (`mem`) plus `grpc` and `grpcs`.
pub fn registry() -> Registry {
    let mut r = Registry::with_core();
    register(&mut r).expect("a registry with core's schemes has no grpc yet");
    r
}

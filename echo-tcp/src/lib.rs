//! The TCP and Unix-socket transport for echo, speaking wire v1, and [`TcpClient`].
//!
//! Wire v1 is the protocol of id-echo's Python `TcpClient` (see
//! [`echo_core::wire`]): on accept the server sends its spec, then the client
//! streams raw payloads and the server answers each with one `0x01` byte once it
//! is queued. This crate only supplies the sockets; the protocol itself is
//! [`echo_core::stream`]'s driver, shared with every other byte-stream transport.
//!
//! Over TCP, payloads of at least [`echo_core::stream::DIRECT_RECV_MIN`] bytes
//! are read straight from the socket into the store's slots, without the copy
//! through a receive buffer: the server sets `SO_RCVLOWAT` to the payload size
//! (Linux then grows the receive buffer to fit two payloads), and only once a
//! whole payload is in the receive queue (`FIONREAD`) reserves its slots, reads
//! it with one `readv` and acknowledges it. A peer that stalls mid-payload holds
//! no slot; its bytes wait in the kernel, and after
//! [`echo_core::stream::DIRECT_RECV_STALL`] in the connection's buffer. Unix
//! sockets always use the buffered path.
//!
//! # URLs
//!
//! | URL | listens on / connects to |
//! |---|---|
//! | `tcp://127.0.0.1:5555` | a TCP port; port `0` binds an ephemeral one, reported by `local_url` |
//! | `tcp://[::1]:5555` | IPv6 |
//! | `unix:///run/echo.sock` | a Unix socket at an absolute path |
//!
//! Listener options are query parameters:
//!
//! * `max_connections=N`: most connections open on this listener at once; the next
//!   one is closed right after accept (the peer sees the connection end before the
//!   handshake) and counted as refused. The server-wide limit
//!   ([`echo_core::Limits::max_connections`], default 1024) applies as well.
//!
//! The other limits are the server's [`echo_core::Limits`]: the handshake write
//! timeout (`handshake_timeout`), per-connection memory (`queue_size` receive
//! buffers of about `chunk_bytes` each, at least one payload), and so on.
//!
//! Wire v1 has no authentication or encryption: it is the reference's protocol,
//! kept byte-compatible. Bind to loopback or a private interface (the address you
//! give is the only one bound), or use a Unix socket and its file permissions.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> echo_core::Result<()> {
//! use echo_core::{Client, ClientOptions, Registry, Server, Spec};
//! use echo_tcp::TcpClient;
//!
//! let spec = Spec::from_json(r#"{"obs": {"shape": [4], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}"#)?;
//! let mut registry = Registry::with_core();
//! echo_tcp::register(&mut registry)?;
//! let server = Server::builder(spec.clone()).batch_size(2).registry(registry).build()?;
//! let url = server.listen("tcp://127.0.0.1:0").await?; // e.g. tcp://127.0.0.1:40123
//!
//! let mut client = TcpClient::connect(&url, &spec, &ClientOptions::default()).await?;
//! client.send(&[1u8; 20]).await?;
//! client.send(&[2u8; 20]).await?;
//! client.wait().await?;
//! client.close().await?;
//!
//! let batch = server.next_batch().await.expect("a batch");
//! assert_eq!(batch.leaf_by_name("reward").unwrap().bytes(), &[1, 1, 1, 1, 2, 2, 2, 2]);
//! # drop(batch);
//! # server.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use echo_core::{Registry, Result};

mod client;
mod listener;
mod transport;

pub use client::{TcpClient, TcpClientFactory};
pub use transport::{TcpTransport, TcpTransportFactory};

/// Registers `tcp` and `unix` in `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let transports = Arc::new(TcpTransportFactory);
    let clients = Arc::new(TcpClientFactory);
    registry.register("tcp", transports.clone(), clients.clone())?;
    registry.register("unix", transports, clients)
}

/// A registry with core's transports (`mem`) plus `tcp` and `unix`.
pub fn registry() -> Registry {
    let mut r = Registry::with_core();
    register(&mut r).expect("a fresh registry has no tcp or unix scheme yet");
    r
}

//! # echo
//!
//! Move reinforcement-learning samples from many rollout workers to a learner,
//! fast, over pluggable transports. This facade re-exports [`echo_core`] and, per
//! Cargo feature, each transport crate:
//!
//! | feature | schemes | crate |
//! |---|---|---|
//! | `tcp` (default) | `tcp://host:port`, `unix:///path` | [`echo_tcp`] |
//! | `grpc` | `grpc://host:port`, `grpcs://host:port` | `echo_grpc` |
//! | `quic` | `quic://host:port` | `echo_quic` |
//! | `full` | all of the above | |
//!
//! `mem://name` (in-process) is always there. [`registry()`] holds exactly what was
//! compiled in.
//!
//! ## From `cargo add` to samples in batches
//!
//! ```toml
//! [dependencies]
//! echo = { version = "0.1", features = ["tcp"] }   # or "grpc", "quic", "full"
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! A learner serves TCP and consumes fixed-size batches; an actor (here in the same
//! process; normally another machine, or id-echo's Python `TcpClient`) sends
//! samples by URL:
//!
//! ```
//! # #[cfg(feature = "tcp")]
//! # #[tokio::main]
//! # async fn main() -> echo::Result<()> {
//! use echo::{ClientOptions, Server, Spec};
//!
//! // The sample pytree: leaves in optree's order (dict keys sorted).
//! let spec = Spec::from_json(r#"{
//!     "obs":    {"shape": [4], "dtype": "float32"},
//!     "reward": {"shape": [],  "dtype": "float32"}
//! }"#)?;
//!
//! // Learner side: a server with room for 3 batches of 8, listening on TCP.
//! let server = Server::builder(spec.clone())
//!     .batch_size(8)
//!     .registry(echo::registry())
//!     .build()?;
//! let url = server.listen("tcp://127.0.0.1:0").await?; // port 0: pick one
//!
//! // Actor side: connect by URL (the server's spec is checked), send, wait for acks.
//! let mut client = echo::registry()
//!     .connect(&url, &spec, &ClientOptions::default())
//!     .await?;
//! for step in 0..8u8 {
//!     let mut sample = Vec::new();
//!     for x in [1.0f32, 2.0, 3.0, 4.0, step as f32] {
//!         sample.extend_from_slice(&x.to_le_bytes()); // obs[0..4], then reward
//!     }
//!     client.send(&sample).await?;
//! }
//! client.wait().await?;
//! client.close().await?;
//!
//! // Learner side: a whole batch, one contiguous buffer per leaf, no copy.
//! let batch = server.next_batch().await.expect("a full batch");
//! let obs: &[f32] = batch.leaf_by_name("obs").unwrap().as_slice()?; // shape (8, 4)
//! let reward: &[f32] = batch.leaf_by_name("reward").unwrap().as_slice()?; // (8,)
//! assert_eq!(obs.len(), 32);
//! assert_eq!(reward, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
//! drop(batch); // its slots go back to the writers
//!
//! server.shutdown().await?; // graceful: whatever was acknowledged is still handed out
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "tcp"))]
//! # fn main() {}
//! ```
//!
//! To add a transport of your own (RDMA, shared memory, WebSocket, ...), implement
//! [`TransportFactory`], [`Transport`], [`ClientFactory`] and [`Client`], register
//! them under a scheme in a [`Registry`], and run the conformance kit
//! (`echo_core::testkit`, feature `testkit`) against it: `examples/custom_transport.rs`
//! does all of that in one file.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use echo_core::*;

#[cfg(feature = "tcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "tcp")))]
pub use echo_tcp as tcp;

#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub use echo_grpc as grpc;

#[cfg(feature = "quic")]
#[cfg_attr(docsrs, doc(cfg(feature = "quic")))]
pub use echo_quic as quic;

/// A registry with every transport this build has: `mem`, plus each enabled
/// feature's schemes.
pub fn registry() -> Registry {
    let mut r = Registry::with_core();
    #[cfg(feature = "tcp")]
    echo_tcp::register(&mut r).expect("tcp schemes are registered once");
    #[cfg(feature = "grpc")]
    echo_grpc::register(&mut r).expect("grpc schemes are registered once");
    #[cfg(feature = "quic")]
    echo_quic::register(&mut r).expect("quic schemes are registered once");
    r
}

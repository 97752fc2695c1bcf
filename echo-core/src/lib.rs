//! echo-core: the parts of echo every transport shares.
//!
//! * [`spec`]: the sample spec (leaves, dtypes, sizes) and its JSON forms;
//! * [`wire`]: wire protocol v1 as pure state machines, and [`stream`], its driver
//!   over any async byte stream;
//! * [`transport`]: the [`Transport`] and [`Client`] traits and their factories,
//!   collected per URL scheme in a [`Registry`];
//! * [`ingress`], [`store`], [`server`]: per-connection queues, the pre-allocated
//!   batching store and the [`Server`] tying them together;
//! * [`mem`]: the in-memory transport, `mem://NAME`;
//! * `testkit` (feature `testkit`): the conformance kit any transport can run.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> echo_core::Result<()> {
//! use echo_core::{ClientOptions, Server, Spec};
//!
//! let spec = Spec::from_json(r#"{"obs": {"shape": [4], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}"#)?;
//! let server = Server::builder(spec.clone()).batch_size(2).build()?;
//! let url = server.listen("mem://doc-example").await?;
//!
//! let mut client = server.registry().connect(&url, &spec, &ClientOptions::default()).await?;
//! for i in 0..2u8 {
//!     client.send(&[i; 20]).await?;
//! }
//! client.wait().await?;
//!
//! let batch = server.next_batch().await.expect("a batch");
//! assert_eq!(batch.leaf(0).shape(), vec![2, 4]);
//! assert_eq!(batch.leaf_by_name("reward").unwrap().bytes(), &[0, 0, 0, 0, 1, 1, 1, 1]);
//! # client.close().await?;
//! # drop(batch);
//! # server.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod busy;
pub mod control;
pub mod error;
pub mod heap;
pub mod ingress;
pub mod mem;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod spec;
pub mod store;
pub mod stream;
pub mod transport;
pub mod window;
pub mod wire;

#[cfg(feature = "testkit")]
pub mod testkit;

/// The synchronisation primitives the store uses; the loom model of the store
/// (`tests/loom_store.rs`) compiles `store.rs` against its own version of this module.
mod sync {
    pub(crate) use event_listener::{Event, EventListener, Listener};
    pub(crate) use std::sync::atomic;
}

/// The payload handle of [`Client::send_bytes`] (the `bytes` crate's).
pub use bytes::Bytes;
pub use error::{Error, Result};
pub use ingress::{Connection, Ingress, Limits, ShutdownSignal};
pub use metrics::{LatencyHistogram, LatencySummary, Metrics, TransportMetrics};
pub use registry::Registry;
pub use server::{ListenerInfo, Server, ServerBuilder};
pub use spec::{DType, Leaf, Spec, SpecError, WireSpec};
pub use store::{Batch, Element, LeafView, Reservation};
pub use transport::{
    check_send, Client, ClientFactory, ClientOptions, ClientStats, Transport, TransportFactory,
};
pub use url::Url;
pub use window::InflightWindow;

pub use async_trait::async_trait;

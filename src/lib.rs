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

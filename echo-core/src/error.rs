//! The error type shared by every part of echo.

use crate::spec::SpecError;
use crate::wire::WireError;

/// Errors from echo's servers, transports and clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client was closed, or its peer went away (Python: `ConnectionClosedError`).
    #[error("connection closed: {0}")]
    ConnectionClosed(String),
    /// The server's spec is not the one the client expects.
    #[error("Server spec mismatch: {0}")]
    SpecMismatch(String),
    /// A payload of the wrong size.
    #[error("Payload size {got} != expected {expected}")]
    PayloadSize {
        /// The spec's payload size.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A bad spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A wire protocol violation.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A URL that cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No transport is registered for a URL's scheme.
    #[error("no transport registered for scheme {scheme:?}; registered: {}", if available.is_empty() { "(none)".to_string() } else { available.join(", ") })]
    UnknownScheme {
        /// The scheme asked for.
        scheme: String,
        /// What the registry has.
        available: Vec<String>,
    },
    /// A scheme registered twice.
    #[error("scheme {0:?} is already registered")]
    DuplicateScheme(String),
    /// A bad configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Something took longer than its limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server is shutting down or has shut down.
    #[error("server is shut down")]
    Shutdown,
    /// A TLS or certificate problem.
    #[error("TLS: {0}")]
    Tls(String),
    /// An I/O error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else a transport reports.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A [`Error::ConnectionClosed`] with a message.
    pub fn closed(msg: impl Into<String>) -> Self {
        Error::ConnectionClosed(msg.into())
    }

    /// True for [`Error::ConnectionClosed`].
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::ConnectionClosed(_))
    }
}

/// `Result` with echo's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The quic transport for echo (in progress).

//! The grpc transport for echo (in progress).

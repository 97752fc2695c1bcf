//! The tcp transport for echo (in progress).

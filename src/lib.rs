//! echo facade

//! `echo-server`: a standalone echo server. Receives samples over any registered
//! transport, assembles batches, writes them as `.npz` files (or counts them), and
//! answers a fastdaemon-protocol control plane (see `echo-ctl`).
//!
//! Run `echo-server --help` for the command line, the stdout contract and the
//! control commands.

#[path = "../server_cli/mod.rs"]
mod server_cli;

fn main() -> std::process::ExitCode {
    server_cli::main()
}

//! echo-ctl against echo-server, end to end: TCP, Unix stream and Unix datagram
//! control sockets, exit statuses.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::*;

/// The newest modification time of the files echo-ctl is built from.
fn newest_source() -> std::time::SystemTime {
    fn walk(p: &Path, newest: &mut std::time::SystemTime) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if let Ok(m) = meta.modified() {
            *newest = (*newest).max(m);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for p in [
        "echo-ctl/src",
        "echo-ctl/Cargo.toml",
        "echo-core/src",
        "echo-core/Cargo.toml",
        "Cargo.lock",
    ] {
        walk(&root.join(p), &mut newest);
    }
    newest
}

/// The echo-ctl binary of this build. It is another package, so cargo does not
/// hand its path to this test: `cargo test --workspace` has just built it next to
/// this test's profile directory; if it is missing or older than its sources
/// (e.g. `cargo test -p echo`), cargo builds it here.
fn echo_ctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps");
        let bin = profile_dir.join("echo-ctl");
        let fresh = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .is_ok_and(|built| built >= newest_source());
        if fresh {
            return bin;
        }
        let target_dir = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "echo-ctl", "--bin", "echo-ctl"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("run cargo build -p echo-ctl");
        assert!(status.success(), "cargo build -p echo-ctl failed: {status}");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

fn echo_ctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(echo_ctl_bin());
    cmd.args(args)
        .env("ECHO_CTL_TIMEOUT", "20")
        .stdin(Stdio::null());
    output(cmd)
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf-8 output")
}

#[test]
fn tcp_control_round_trips() {
    let server = EchoServer::start(SPEC, &["--listen", "mem://ctl-tcp", "--control", "0"], 2);
    let port = server.line("control ");
    let out = echo_ctl(&[&port, "health"]);
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("ok\n", ""));
    assert_eq!(out.status.code(), Some(0));

    let out = echo_ctl(&[&port, "stats", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["samples_inserted_total"], 0);
    assert_eq!(v["server"]["payload_size"], 20);

    let out = echo_ctl(&[&port, "--host", "127.0.0.1", "listeners"]);
    assert_eq!(text(&out.stdout), "mem://ctl-tcp\n");

    let out = echo_ctl(&[&port, "launch", "rockets"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("\"launch\"") && err.contains("help"), "{err}");

    let status = server.terminate();
    assert!(status.success(), "{status}");
    // The server is gone: echo-ctl says so with status 3.
    let out = echo_ctl(&[&port, "health"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn unix_stream_and_datagram_control_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("ctl.sock");
    let dgram = dir.path().join("ctl.dgram");
    let server = EchoServer::start(
        SPEC,
        &[
            "--listen",
            "mem://ctl-unix",
            "--control",
            stream.to_str().unwrap(),
            "--control-dgram",
            dgram.to_str().unwrap(),
        ],
        3,
    );
    assert_eq!(server.line("control "), stream.to_str().unwrap());
    assert_eq!(server.line("control-dgram "), dgram.to_str().unwrap());

    let out = echo_ctl(&[stream.to_str().unwrap(), "spec", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "obs");
    assert_eq!(v[1]["name"], "reward");

    let out = echo_ctl(&["--dgram", dgram.to_str().unwrap(), "health"]);
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("ok\n", ""));
    assert_eq!(out.status.code(), Some(0));
    let out = echo_ctl(&[dgram.to_str().unwrap(), "--dgram", "stats"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("samples_inserted_total"));
    let out = echo_ctl(&["--dgram", dgram.to_str().unwrap(), "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("\"nope\""));
    // A stream client on the datagram socket (and vice versa) fails cleanly.
    let out = echo_ctl(&[dgram.to_str().unwrap(), "health"]);
    assert_eq!(out.status.code(), Some(3));
    let out = echo_ctl(&["--dgram", stream.to_str().unwrap(), "health"]);
    assert_eq!(out.status.code(), Some(3));

    assert!(server.terminate().success());
    assert!(!stream.exists() && !dgram.exists(), "sockets left behind");
}

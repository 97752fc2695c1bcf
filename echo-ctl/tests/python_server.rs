//! echo-ctl against a small Python server speaking the fastdaemon protocol
//! (`python/ctl_server.py`, standard library only): TCP, Unix stream and Unix
//! datagram sockets, stdin forwarding, exit statuses.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use echo_core::testkit::{python_interpreter, workspace_root};

const WAIT: Duration = Duration::from_secs(30);

/// A running `ctl_server.py`, killed on drop.
struct PyServer {
    child: Child,
    addr: String,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn py_server(args: &[&str]) -> PyServer {
    let script = workspace_root().join("python").join("ctl_server.py");
    let mut child = Command::new(python_interpreter())
        .arg(&script)
        .args(args)
        .args(["--timeout", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python/ctl_server.py");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("ctl_server.py printed no `listening` line in time");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line from ctl_server.py: {line:?}"))
        .to_string();
    PyServer { child, addr }
}

/// Runs echo-ctl with `args`, feeding `stdin` (None: /dev/null), bounded in time.
fn echo_ctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-ctl"))
        .args(args)
        .env("ECHO_CTL_TIMEOUT", "20")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echo-ctl");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT)
        .expect("echo-ctl did not exit in time")
        .expect("echo-ctl output")
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf-8 output")
}

fn sock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn forwards_args_and_stdin_over_tcp() {
    let server = py_server(&["--tcp"]);
    let out = echo_ctl(
        &[&server.addr, "hello", "--json", "world"],
        Some("some input\nü"),
    );
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "{\"stdin\": \"some input\\n\\u00fc\", \"args\": \"hello --json world\"}\n"
    );
    assert_eq!(out.status.code(), Some(0));

    // --host with a numeric address, options after the positional, `--`.
    let out = echo_ctl(
        &[
            &server.addr,
            "a",
            "--host",
            "127.0.0.1",
            "--",
            "--host",
            "b",
        ],
        None,
    );
    assert_eq!(
        text(&out.stdout),
        "{\"stdin\": \"\", \"args\": \"a --host b\"}\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn unix_stream_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(dir.path(), "ctl.sock");
    let server = py_server(&["--unix", path.to_str().unwrap()]);
    let out = echo_ctl(&[&server.addr, "stats"], None);
    assert_eq!(
        text(&out.stdout),
        "{\"stdin\": \"\", \"args\": \"stats\"}\n"
    );
    assert_eq!(out.status.code(), Some(0));
    // No arguments at all: an empty args string.
    let out = echo_ctl(&[&server.addr], Some("x"));
    assert_eq!(text(&out.stdout), "{\"stdin\": \"x\", \"args\": \"\"}\n");
}

#[test]
fn server_stderr_is_written_and_exit_1() {
    let server = py_server(&["--tcp"]);
    let out = echo_ctl(&[&server.addr, "fail", "x", "y"], None);
    assert_eq!(text(&out.stderr), "failed: x y\n");
    assert_eq!(text(&out.stdout), "some output\n");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn large_reply_arrives_whole() {
    let server = py_server(&["--tcp"]);
    let out = echo_ctl(&[&server.addr, "big", "300000"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 300_000);
    assert!(out.stdout.iter().all(|&b| b == b'x'));
}

#[test]
fn no_reply_and_no_server_exit_3() {
    let server = py_server(&["--tcp"]);
    let out = echo_ctl(&[&server.addr, "close"], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("closed the connection without a reply"),
        "{}",
        text(&out.stderr)
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = echo_ctl(&[&port.to_string(), "health"], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("could not connect"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let out = echo_ctl(&[missing.to_str().unwrap(), "health"], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("nobody.sock"),
        "{}",
        text(&out.stderr)
    );
    let out = echo_ctl(&["--dgram", missing.to_str().unwrap(), "health"], None);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn dgram_round_trip_with_python_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(dir.path(), "ctl.dgram");
    let server = py_server(&["--dgram", path.to_str().unwrap()]);
    let out = echo_ctl(&["--dgram", &server.addr, "health", "now"], Some("in"));
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "{\"stdin\": \"in\", \"args\": \"health now\"}\n"
    );
    assert_eq!(out.status.code(), Some(0));
    let out = echo_ctl(&[&server.addr, "--dgram", "fail", "d"], None);
    assert_eq!(text(&out.stderr), "failed: d\n");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_statuses() {
    let out = echo_ctl(&[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("missing PORT_OR_PATH"));
    let out = echo_ctl(&["7000", "--dgram", "health"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("Unix datagram sockets only"),
        "{}",
        text(&out.stderr)
    );
    let out = echo_ctl(&["--help"], None);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "Exit status",
        "0  the server replied",
        "3  the server could not be reached",
        "--dgram",
        "--host",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
    // stdin that is not UTF-8 is a usage error, not garbage on the wire.
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-ctl"))
        .args(["7000", "health"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[0xff, 0xfe])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not valid UTF-8"));
}

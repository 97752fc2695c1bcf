//! echo-server as a process: start-up lines, the control plane (TCP, Unix stream,
//! Unix datagram), a stdlib Python control client, byte-exact `--out` files read
//! back by numpy from samples sent by id-echo's Python TcpClient, graceful drain,
//! `--max-batches`, configuration errors.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use echo::control::{Reply, Request};
use echo::{ClientOptions, Spec};
use echo_core::testkit::{python_interpreter, workspace_root};

/// A spec touching several dtypes, nesting, a scalar and id-echo_interop's `meta`.
const RICH_SPEC: &str = r#"{
    "meta": {"shape": [2], "dtype": "int32"},
    "obs": {"image": {"shape": [2, 3], "dtype": "uint8"}, "vec": {"shape": [3], "dtype": "float16"}},
    "done": {"shape": [], "dtype": "bool"},
    "r": {"shape": [], "dtype": "float64"},
    "z": {"shape": [2], "dtype": "complex128"}
}"#;

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn prints_listeners_and_answers_control_commands() {
    let server = EchoServer::start(
        SPEC,
        &[
            "--listen",
            "mem://server-cmds",
            "--listen",
            "tcp://127.0.0.1:0",
            "--control",
            "0",
        ],
        3,
    );
    assert_eq!(server.lines[0], "listening mem://server-cmds");
    let tcp = server.url("tcp");
    let port: u16 = tcp.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0, "{tcp}");
    assert!(server.lines[1].starts_with(&format!("listening {tcp}")));
    // After the URL, space-separated KEY=VALUE fields.
    let fields: Vec<&str> = server.lines[1].split(' ').skip(2).collect();
    assert!(
        fields.iter().all(|f| f
            .split_once('=')
            .is_some_and(|(k, v)| !k.is_empty() && !v.is_empty())),
        "{:?}",
        server.lines[1]
    );
    assert!(fields.contains(&"auth=none"), "{:?}", server.lines[1]);
    let control = server.control_port();
    assert_ne!(control, 0);

    assert_eq!(ctl_tcp(control, "health"), Reply::ok("ok\n"));
    let help = ctl_tcp(control, "help");
    for cmd in ["help", "stats", "spec", "listeners", "health", "--json"] {
        assert!(help.stdout.contains(cmd), "{help:?}");
    }
    assert_eq!(ctl_tcp(control, ""), help);

    let v = stats(control);
    for key in [
        "store_size",
        "active_connections",
        "samples_inserted_total",
        "batches_total",
        "bytes_received",
        "transports",
    ] {
        assert!(v.get(key).is_some(), "stats lacks {key}: {v}");
    }
    assert_eq!(v["server"]["batch_size"], 32);
    assert_eq!(v["server"]["num_buffers"], 3);
    assert!(ctl_tcp(control, "stats")
        .stdout
        .contains("samples_inserted_total"));

    let spec = ctl_tcp(control, "spec --json");
    assert_eq!(
        Spec::from_json(&spec.stdout).unwrap(),
        Spec::from_json(SPEC).unwrap()
    );
    assert!(ctl_tcp(control, "spec")
        .stdout
        .contains("payload_size\t20 bytes"));

    let listeners = ctl_tcp(control, "listeners").stdout;
    assert!(listeners.starts_with("mem://server-cmds\n"), "{listeners}");
    assert!(listeners.contains(&tcp), "{listeners}");
    let lj: serde_json::Value =
        serde_json::from_str(&ctl_tcp(control, "listeners --json").stdout).unwrap();
    assert_eq!(lj[1]["url"], tcp.as_str());

    let r = ctl_tcp(control, "reboot --now");
    assert_eq!(r.stdout, "");
    assert!(
        r.stderr.contains("unknown command \"reboot\"") && r.stderr.contains("help"),
        "{r:?}"
    );
    let r = ctl_tcp(control, "stats --xml");
    assert!(r.stderr.contains("--xml"), "{r:?}");
}

#[test]
fn malformed_and_oversized_requests_only_close_their_connection() {
    let server = EchoServer::start(SPEC, &["--listen", "mem://server-bad", "--control", "0"], 2);
    let port = server.control_port();
    let closed_without_reply = |bytes: &[u8], half_close: bool| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(bytes).unwrap();
        if half_close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert_closed_without_reply(&mut s, &format!("{bytes:?}"));
    };
    // A 4 GiB string, announced and never sent: refused from its length prefix.
    closed_without_reply(&[0xff, 0xff, 0xff, 0xff], false);
    // Past the request limit (1 MiB), even with the bytes following.
    let mut big = vec![0, 0x10, 0, 1];
    big.extend(std::iter::repeat_n(b'a', 64 << 10));
    closed_without_reply(&big, false);
    // Invalid UTF-8.
    closed_without_reply(&[0, 0, 0, 2, 0xff, 0xfe, 0, 0, 0, 0], false);
    // Truncated, then EOF.
    closed_without_reply(&[0, 0, 0, 10, b'a'], true);
    closed_without_reply(&[0, 0], true);
    // The server is unharmed.
    assert_eq!(ctl_tcp(port, "health"), Reply::ok("ok\n"));
    assert_eq!(stats(port)["samples_inserted_total"], 0);
    let log = server.stderr();
    assert!(log.contains("bad request"), "{log}");
}

#[test]
fn unix_control_socket_is_private_replaces_stale_refuses_live_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    // A stale socket: bound, then its owner went away without removing it.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let p = path.to_str().unwrap();

    let mut server = EchoServer::start(
        SPEC,
        &["--listen", "mem://server-unix-1", "--control", p],
        2,
    );
    assert_eq!(server.line("control "), p);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    assert_eq!(ctl_unix(&path, "health"), Reply::ok("ok\n"));

    // A second server on the same live socket is refused, and the socket still works.
    let other = tempfile::tempdir().unwrap();
    let mut cmd = server_cmd(
        other.path(),
        SPEC,
        &["--listen", "mem://server-unix-2", "--control", p],
    );
    cmd.stdin(Stdio::null());
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running server"), "{err}");
    assert_eq!(ctl_unix(&path, "health"), Reply::ok("ok\n"));

    // A regular file is never replaced.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = output(server_cmd(
        other.path(),
        SPEC,
        &[
            "--listen",
            "mem://server-unix-3",
            "--control",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    assert!(!path.exists(), "control socket not removed on exit");
}

#[test]
fn datagram_control_socket_answers_and_survives_bad_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.dgram");
    let p = path.to_str().unwrap();
    let mut server = EchoServer::start(
        SPEC,
        &["--listen", "mem://server-dgram", "--control-dgram", p],
        2,
    );
    assert_eq!(server.line("control-dgram "), p);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let client = UnixDatagram::bind(dir.path().join("client.dgram")).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.connect(&path).unwrap();
    let ask = |bytes: &[u8]| {
        client.send(bytes).unwrap();
        let mut buf = vec![0u8; 1 << 17];
        let n = client.recv(&mut buf).unwrap();
        Reply::decode(&buf[..n], 1 << 17).unwrap()
    };
    assert_eq!(
        ask(&Request::new("", "health").encode().unwrap()),
        Reply::ok("ok\n")
    );
    let r = ask(&[0, 0, 0, 9, b'x']);
    assert!(r.stderr.contains("bad request datagram"), "{r:?}");
    let r = ask(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(r.stderr.contains("unexpected bytes"), "{r:?}");
    // An unbound sender cannot be answered; the server carries on.
    let anon = UnixDatagram::unbound().unwrap();
    anon.send_to(&Request::new("", "stats").encode().unwrap(), &path)
        .unwrap();
    let r = ask(&Request::new("", "stats --json").encode().unwrap());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["samples_inserted_total"], 0);

    server.signal(libc::SIGINT);
    assert!(server.wait_exit().success());
    assert!(!path.exists());
}

#[test]
fn python_stdlib_client_gets_stats() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let tcp = EchoServer::start(
        SPEC,
        &["--listen", "mem://server-py-1", "--control", "0"],
        2,
    );
    let _unix = EchoServer::start(
        SPEC,
        &[
            "--listen",
            "mem://server-py-2",
            "--control",
            sock.to_str().unwrap(),
        ],
        2,
    );
    let client = workspace_root().join("python").join("ctl_client.py");
    for addr in [
        tcp.control_port().to_string(),
        sock.to_str().unwrap().to_string(),
    ] {
        let mut cmd = Command::new(python_interpreter());
        cmd.arg(&client).arg(&addr).args(["stats", "--json"]);
        cmd.stdin(Stdio::null());
        let out = output(cmd);
        assert!(
            out.status.success(),
            "{addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["samples_inserted_total"], 0);
        assert_eq!(v["server"]["payload_size"], 20);

        let mut cmd = Command::new(python_interpreter());
        cmd.arg(&client).arg(&addr).arg("nonsense");
        cmd.stdin(Stdio::null());
        let out = output(cmd);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("\"nonsense\""));
    }
}

/// numpy.load reads every batch file; their samples, in order, are exactly the
/// bytes the Python TcpClient sent.
const CHECK_NPZ: &str = r#"
import glob, json, os, sys
import numpy as np
out_dir, sent_path, spec_json = sys.argv[1:4]
leaves = json.loads(spec_json)
files = sorted(glob.glob(os.path.join(out_dir, "*.npz")))
rows = []
for f in files:
    with np.load(f) as z:
        assert z.files == [l["name"] for l in leaves], (f, z.files)
        arrays = [z[l["name"]] for l in leaves]
    n = arrays[0].shape[0]
    for a, l in zip(arrays, leaves):
        assert a.dtype == np.dtype(l["dtype"]), (f, l, a.dtype)
        assert a.shape == (n, *l["shape"]), (f, l, a.shape)
    rows += [b"".join(a[k].tobytes() for a in arrays) for k in range(n)]
sent = open(sent_path, "rb").read()
got = b"".join(rows)
assert got == sent, f"{len(got)} bytes in the npz files != {len(sent)} bytes sent"
print(json.dumps({"files": [os.path.basename(f) for f in files], "samples": len(rows)}))
"#;

#[test]
fn out_files_round_trip_python_tcp_client_samples_byte_exact() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("batches");
    let mut server = EchoServer::start(
        RICH_SPEC,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--batch-size",
            "4",
            "--control",
            "0",
            "--out",
            out.to_str().unwrap(),
        ],
        2,
    );
    let url = server.url("tcp");
    let port = url.rsplit(':').next().unwrap();
    let spec_path = server.dir.path().join("spec.json");
    let sent = server.dir.path().join("sent.bin");
    let mut cmd = Command::new(python_interpreter());
    cmd.arg(workspace_root().join("python").join("echo_interop.py"))
        .args(["send", "--host", "127.0.0.1", "--port", port, "--spec"])
        .arg(&spec_path)
        .args([
            "--samples",
            "10",
            "--client-id",
            "7",
            "--timeout",
            "25",
            "--out",
        ])
        .arg(&sent)
        .stdin(Stdio::null());
    let o = output(cmd);
    assert!(
        o.status.success(),
        "send: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    wait_samples(server.control_port(), 10);

    server.signal(libc::SIGINT);
    assert!(server.wait_exit().success(), "{}", server.stderr());
    assert_eq!(
        files(&out),
        [
            "batch-000000.npz",
            "batch-000001.npz",
            "batch-000002-partial.npz"
        ]
    );
    let spec_list = Spec::from_json(RICH_SPEC).unwrap().to_json().to_string();
    let mut cmd = Command::new(python_interpreter());
    cmd.args(["-c", CHECK_NPZ])
        .arg(&out)
        .arg(&sent)
        .arg(&spec_list)
        .stdin(Stdio::null());
    let o = output(cmd);
    assert!(
        o.status.success(),
        "numpy check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 10);
}

async fn send_samples(url: &str, spec: &Spec, n: u32) {
    let registry = echo::registry();
    let mut client = registry
        .connect(url, spec, &ClientOptions::default())
        .await
        .unwrap();
    let mut payload = Vec::new();
    for i in 0..n {
        echo_core::testkit::kit_sample(spec, 1, i, &mut payload);
        client.send(&payload).await.unwrap();
    }
    client.wait().await.unwrap();
    let _ = client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batches_exits_zero_after_n_batches() {
    let out_dir = tempfile::tempdir().unwrap();
    let spec = echo_core::testkit::kit_spec(24);
    let spec_json = spec.to_json().to_string();
    let mut server = EchoServer::start(
        &spec_json,
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--batch-size",
            "4",
            "--max-batches",
            "2",
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
        1,
    );
    send_samples(&server.url("tcp"), &spec, 8).await;
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert!(status.success(), "{status}");
    assert_eq!(
        files(out_dir.path()),
        ["batch-000000.npz", "batch-000001.npz"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_partial_batch_without_out() {
    let spec = echo_core::testkit::kit_spec(16);
    let mut server = EchoServer::start(
        &spec.to_json().to_string(),
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--batch-size",
            "4",
            "--control",
            "0",
        ],
        2,
    );
    send_samples(&server.url("tcp"), &spec, 5).await;
    let port = server.control_port();
    tokio::task::block_in_place(|| {
        wait_samples(port, 5);
        let deadline = Instant::now() + WAIT;
        while stats(port)["server"]["batches_written"] != 1 {
            assert!(
                Instant::now() < deadline,
                "the full batch was never consumed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit().success());
    });
    let log = server.stderr();
    assert!(
        log.contains("final partial batch 1: 1 of 4 samples"),
        "{log}"
    );
    assert!(log.contains("done: 2 batches, 5 samples"), "{log}");
}

#[test]
fn configuration_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let run = |spec: &str, args: &[&str]| output(server_cmd(dir.path(), spec, args));

    let o = run(
        r#"{"x": {"shape": [2], "dtype": "float8"}}"#,
        &["--listen", "mem://e1"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--spec") && err.contains("float8"), "{err}");

    let o = run(SPEC, &["--listen", "carrier-pigeon://coop:1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("carrier-pigeon") && err.contains("mem") && err.contains("tcp"),
        "{err}"
    );

    let o = run(SPEC, &[]);
    assert_eq!(o.status.code(), Some(2), "no --listen is a usage error");

    let o = run(SPEC, &["--listen", "mem://e2", "--batch-size", "0"]);
    assert_eq!(o.status.code(), Some(2));

    let o = run(SPEC, &["--listen", "mem://e3", "--control", "70000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range"));

    let out: PathBuf = dir.path().join("full");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("batch-000000.npz"), b"old").unwrap();
    let o = run(
        SPEC,
        &["--listen", "mem://e4", "--out", out.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds batch files"));
    assert_eq!(std::fs::read(out.join("batch-000000.npz")).unwrap(), b"old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_written_stops_the_server_with_an_error() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("gone");
    let spec = echo_core::testkit::kit_spec(16);
    let mut server = EchoServer::start(
        &spec.to_json().to_string(),
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--batch-size",
            "4",
            "--out",
            out.to_str().unwrap(),
        ],
        1,
    );
    std::fs::remove_dir(&out).unwrap();
    send_samples(&server.url("tcp"), &spec, 4).await;
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(1));
    let log = server.stderr();
    assert!(log.contains("writing batch 0 to"), "{log}");
}

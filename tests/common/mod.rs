//! Shared by the tests that run the `echo-server` binary: starting it and reading
//! its start-up lines, signals, bounded waits, and control-plane requests.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use echo::control::{Reply, Request, DEFAULT_MAX_RECORD};

/// How long any one step may take before the test fails.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A small spec: `obs` float32[4] and a scalar `reward` (20-byte payloads).
pub(crate) const SPEC: &str =
    r#"{"obs": {"shape": [4], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}"#;

/// A running echo-server; killed on drop, its stderr shown if the test failed.
pub(crate) struct EchoServer {
    pub(crate) child: Child,
    pub(crate) lines: Vec<String>,
    pub(crate) dir: tempfile::TempDir,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- echo-server stderr ---\n{}", self.stderr());
        }
    }
}

/// An echo-server command with `spec` written to `dir/spec.json`.
pub(crate) fn server_cmd(dir: &Path, spec: &str, args: &[&str]) -> Command {
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echo-server"));
    cmd.arg("--spec")
        .arg(&spec_path)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

impl EchoServer {
    /// Starts echo-server and waits for its `n` start-up lines.
    pub(crate) fn start(spec: &str, args: &[&str], n: usize) -> EchoServer {
        let dir = tempfile::tempdir().unwrap();
        let stderr = File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = server_cmd(dir.path(), spec, args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start echo-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = EchoServer {
            child,
            lines: Vec::new(),
            dir,
        };
        while server.lines.len() < n {
            match rx.recv_timeout(WAIT) {
                Ok(l) => server.lines.push(l),
                Err(e) => panic!("echo-server printed {:?}, then {e:?}", server.lines),
            }
        }
        server
    }

    /// The rest of the start-up line beginning with `prefix`.
    pub(crate) fn line(&self, prefix: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {:?}", self.lines))
            .to_string()
    }

    /// The TCP control port from the `control PORT` line.
    pub(crate) fn control_port(&self) -> u16 {
        self.line("control ").parse().expect("a TCP control port")
    }

    /// The bound URL of the listener with this scheme.
    pub(crate) fn url(&self, scheme: &str) -> String {
        let l = self.line(&format!("listening {scheme}://"));
        format!("{scheme}://{}", l.split(' ').next().unwrap())
    }

    /// What the server wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Sends `sig` to the server.
    pub(crate) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Sends SIGTERM and waits (bounded) for the server to exit.
    pub(crate) fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits (bounded) for the server to exit.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "echo-server did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command to completion, bounded in time.
pub(crate) fn output(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT)
        .expect("process did not exit in time")
        .expect("process output")
}

/// One control request on a connected stream.
pub(crate) fn ctl<S: Read + Write>(mut s: S, args: &str) -> Reply {
    Request::new("", args).write(&mut s).unwrap();
    Reply::read(&mut s, DEFAULT_MAX_RECORD).unwrap()
}

/// One control request to the TCP control port.
pub(crate) fn ctl_tcp(port: u16, args: &str) -> Reply {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    ctl(s, args)
}

/// One control request to a Unix control socket.
pub(crate) fn ctl_unix(path: &Path, args: &str) -> Reply {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    ctl(s, args)
}

/// `stats --json` from the TCP control port.
pub(crate) fn stats(port: u16) -> serde_json::Value {
    let r = ctl_tcp(port, "stats --json");
    assert_eq!(r.stderr, "");
    serde_json::from_str(&r.stdout).unwrap()
}

/// Polls `stats` until `samples_inserted_total` reaches `n`.
pub(crate) fn wait_samples(port: u16, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = stats(port);
        if v["samples_inserted_total"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "samples never reached {n}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the server closes `s` without replying (within [`WAIT`]).
pub(crate) fn assert_closed_without_reply(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("got a reply {:?} to {what}", &buf[..n]),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server kept the connection open after {what}"
        ),
    }
}

//! echo-server's TCP control plane under hostile local peers: it listens on
//! 127.0.0.1 only; a flood of connections that never send, plus records claiming
//! 4 GiB, cost a bounded wait at most, while samples keep flowing and the server
//! keeps answering. (Owner-only Unix control sockets and each malformed record
//! kind are in tests/echo_server.rs.)
#![cfg(feature = "tcp")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use echo::control::{Reply, Request, DEFAULT_MAX_RECORD};
use echo::{ClientOptions, Spec};

const WAIT: Duration = Duration::from_secs(30);
const SPEC: &str =
    r#"{"obs": {"shape": [4], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}"#;

/// A running echo-server, killed on drop.
struct EchoServer {
    child: Child,
    lines: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EchoServer {
    fn start(args: &[&str], n: usize) -> EchoServer {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("spec.json");
        std::fs::write(&spec, SPEC).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_echo-server"))
            .arg("--spec")
            .arg(&spec)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
        let mut lines = Vec::new();
        while lines.len() < n {
            match rx.recv_timeout(WAIT) {
                Ok(l) => lines.push(l),
                Err(e) => panic!("echo-server printed {lines:?}, then {e:?}"),
            }
        }
        EchoServer {
            child,
            lines,
            _dir: dir,
        }
    }

    fn line(&self, prefix: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {:?}", self.lines))
            .to_string()
    }
}

fn ctl_tcp(port: u16, args: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    Request::new("", args).write(&mut s).unwrap();
    Reply::read(&mut s, DEFAULT_MAX_RECORD).unwrap()
}

/// Local addresses (hex, as in /proc/net/tcp*) of every listening socket on `port`.
fn listeners_on(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.rsplit_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16).ok() == Some(port) {
                out.push(addr.to_string());
            }
        }
    }
    out
}

#[test]
fn tcp_control_listens_on_loopback_only() {
    let server = EchoServer::start(&["--listen", "mem://hardening-ctl-1", "--control", "0"], 2);
    let port: u16 = server.line("control ").parse().unwrap();
    // 127.0.0.1 in /proc/net/tcp's byte order; nothing on other addresses or IPv6.
    assert_eq!(listeners_on(port), vec!["0100007F".to_string()]);
    assert_eq!(ctl_tcp(port, "health"), Reply::ok("ok\n"));
}

#[test]
fn silent_and_huge_control_peers_cost_a_bounded_wait_while_samples_flow() {
    let server = EchoServer::start(
        &[
            "--listen",
            "tcp://127.0.0.1:0",
            "--control",
            "0",
            "--batch-size",
            "8",
        ],
        2,
    );
    let port: u16 = server.line("control ").parse().unwrap();
    let url = format!(
        "tcp://{}",
        server.line("listening tcp://").split(' ').next().unwrap()
    );
    // Samples flow throughout, from another thread.
    let sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let spec = Spec::from_json(SPEC).unwrap();
            let opts = ClientOptions {
                connect_timeout: Duration::from_secs(10),
                ..ClientOptions::default()
            };
            let mut c = echo::registry().connect(&url, &spec, &opts).await.unwrap();
            for i in 0..4000u32 {
                c.send(&[(i % 251) as u8; 20]).await.unwrap();
            }
            c.wait().await.unwrap();
            c.close().await.unwrap();
        })
    });
    // More silent connections than the control plane serves at once (64), and
    // records announcing 4 GiB that never come.
    let mut hostile = Vec::new();
    for k in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if k % 10 == 0 {
            s.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        }
        hostile.push(s);
    }
    // A well-behaved request is answered: at once, or once the silent peers'
    // 10 s request timeout frees a slot; never later than the bound here.
    let t = Instant::now();
    assert_eq!(ctl_tcp(port, "health"), Reply::ok("ok\n"));
    eprintln!(
        "control: health answered after {:?} with 100 hostile peers",
        t.elapsed()
    );
    // The 4 GiB claims were refused and closed, not allocated.
    for s in hostile.iter_mut().step_by(10) {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("a 4 GiB claim got a reply: {:?}", &buf[..n]),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a 4 GiB claim was left open"
            ),
        }
    }
    sender.join().unwrap();
    // Every acknowledged sample goes in, and the control plane still answers.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = ctl_tcp(port, "stats --json");
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        if v["samples_inserted_total"] == 4000 {
            break;
        }
        assert!(Instant::now() < deadline, "samples never reached 4000: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

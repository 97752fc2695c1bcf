//! echo-server's TCP control plane under hostile local peers: it listens on
//! 127.0.0.1 only; a flood of connections that never send, plus records claiming
//! 4 GiB, cost a bounded wait at most, while samples keep flowing and the server
//! keeps answering. (Owner-only Unix control sockets and each malformed record
//! kind are in tests/echo_server.rs.)
#![cfg(feature = "tcp")]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use echo::control::Reply;
use echo::{ClientOptions, Spec};

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
    let server = EchoServer::start(
        SPEC,
        &["--listen", "mem://hardening-ctl-1", "--control", "0"],
        2,
    );
    let port: u16 = server.line("control ").parse().unwrap();
    // 127.0.0.1 in /proc/net/tcp's byte order; nothing on other addresses or IPv6.
    assert_eq!(listeners_on(port), vec!["0100007F".to_string()]);
    assert_eq!(ctl_tcp(port, "health"), Reply::ok("ok\n"));
}

#[test]
fn silent_and_huge_control_peers_cost_a_bounded_wait_while_samples_flow() {
    let server = EchoServer::start(
        SPEC,
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
        assert_closed_without_reply(s, "a 4 GiB claim");
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

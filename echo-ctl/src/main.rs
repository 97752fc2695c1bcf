//! `echo-ctl`: a tiny client for echo-server's control plane.
//!
//! It speaks fastdaemon's record protocol (see `echo_core::control`) and takes
//! fastdaemon_client's arguments:
//!
//! ```text
//! echo-ctl PORT_OR_PATH [--host HOST] [--dgram] [ARGS...]
//! ```
//!
//! * `PORT_OR_PATH`: a number is a TCP port (on `--host`, default `localhost`),
//!   anything else is a Unix socket path.
//! * `--dgram`: use a Unix datagram socket instead of a stream (Unix paths only;
//!   the server must listen on one, e.g. `echo-server --control-dgram PATH`).
//! * The remaining arguments (options `echo-ctl` does not know included, and
//!   everything after `--`) are joined with single spaces and sent as the
//!   request's args; standard input is sent too when it is not a terminal.
//! * The reply's stderr is written to stderr, then its stdout to stdout.
//!
//! Exit status:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the server replied and its stderr was empty |
//! | 1 | the server replied with something on stderr (it reported an error) |
//! | 2 | usage error (bad arguments, stdin not UTF-8) |
//! | 3 | the server could not be reached, or did not send a valid reply in time |
//!
//! `ECHO_CTL_TIMEOUT` (seconds, default 30) bounds connecting, sending and
//! waiting for the reply.
//!
//! It uses plain std networking (no async runtime) so that a round trip costs
//! about a process start.

use std::ffi::OsString;
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::ExitCode;
use std::time::Duration;

use echo_core::control::{ControlError, Reply, Request, DEFAULT_MAX_RECORD};

/// Exit status: the server replied, nothing on stderr.
const EXIT_OK: u8 = 0;
/// Exit status: the server replied with an error on stderr.
const EXIT_SERVER_ERROR: u8 = 1;
/// Exit status: bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit status: the server could not be reached or gave no valid reply.
const EXIT_UNREACHABLE: u8 = 3;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest datagram reply read with `--dgram`.
const MAX_DGRAM: usize = 1 << 20;

const HELP: &str = "\
echo-ctl: send a command to echo-server's control plane (fastdaemon protocol)

Usage: echo-ctl PORT_OR_PATH [--host HOST] [--dgram] [ARGS...]

Arguments:
  PORT_OR_PATH  a number is a TCP port, anything else a Unix socket path
  ARGS...       the command, forwarded joined by spaces (unknown options too;
                everything after `--` verbatim), e.g. `stats --json`

Options:
  --host HOST   server host for a TCP port (default: localhost)
  --dgram       use a Unix datagram socket (Unix socket paths only)
  -h, --help    print this help

Standard input is forwarded when it is not a terminal. The reply's stderr is
written to stderr, then its stdout to stdout.

Commands echo-server understands: help, stats [--json], spec [--json],
listeners [--json], health.

Exit status:
  0  the server replied and its stderr was empty
  1  the server replied with an error on stderr
  2  usage error (bad arguments, stdin not UTF-8)
  3  the server could not be reached or sent no valid reply in time

Environment:
  ECHO_CTL_TIMEOUT  seconds to wait for connect, send and reply (default 30)
";

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Tcp { host: String, port: u16 },
    Unix(String),
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cli {
    target: Target,
    dgram: bool,
    args: String,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run(Cli),
    Help,
}

/// A failure with its exit status and message.
#[derive(Debug)]
struct Failure {
    status: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        status: EXIT_USAGE,
        message: format!(
            "{}\nUsage: echo-ctl PORT_OR_PATH [--host HOST] [--dgram] [ARGS...] (see --help)",
            message.into()
        ),
    }
}

fn unreachable(message: impl Into<String>) -> Failure {
    Failure {
        status: EXIT_UNREACHABLE,
        message: message.into(),
    }
}

/// Parses arguments the way fastdaemon_client's `parse_known_args` does: the
/// options it knows are taken wherever they appear (before `--`), the first
/// positional is the port or path, everything else is forwarded in order.
fn parse(argv: Vec<OsString>) -> Result<Parsed, Failure> {
    let mut port: Option<String> = None;
    let mut host: Option<String> = None;
    let mut dgram = false;
    let mut rest: Vec<String> = Vec::new();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| usage(format!("argument {a:?} is not valid UTF-8")))?;
        match arg.as_str() {
            "--" => {
                for a in it.by_ref() {
                    rest.push(
                        a.into_string()
                            .map_err(|a| usage(format!("argument {a:?} is not valid UTF-8")))?,
                    );
                }
            }
            "-h" | "--help" => return Ok(Parsed::Help),
            "--dgram" => dgram = true,
            "--host" => {
                let v = it
                    .next()
                    .ok_or_else(|| usage("--host needs a value"))?
                    .into_string()
                    .map_err(|a| usage(format!("--host {a:?} is not valid UTF-8")))?;
                host = Some(v);
            }
            _ if arg.starts_with("--host=") => host = Some(arg["--host=".len()..].to_string()),
            _ if port.is_none() && !arg.starts_with('-') => port = Some(arg),
            _ => rest.push(arg),
        }
    }
    let port = port.ok_or_else(|| usage("missing PORT_OR_PATH"))?;
    if port.is_empty() {
        return Err(usage("PORT_OR_PATH is empty"));
    }
    let target = if port.bytes().all(|b| b.is_ascii_digit()) {
        let n: u16 = port.parse().map_err(|_| {
            usage(format!(
                "port {port} is out of range; expected 1..=65535 (or a Unix socket path)"
            ))
        })?;
        if n == 0 {
            return Err(usage("port 0 cannot be connected to; expected 1..=65535"));
        }
        if dgram {
            return Err(usage(format!(
                "--dgram works over Unix datagram sockets only; {port} is a TCP port \
                 (UDP is not supported): pass a socket path, or drop --dgram"
            )));
        }
        Target::Tcp {
            host: host.unwrap_or_else(|| "localhost".to_string()),
            port: n,
        }
    } else {
        Target::Unix(port)
    };
    Ok(Parsed::Run(Cli {
        target,
        dgram,
        args: rest.join(" "),
    }))
}

fn timeout_from_env() -> Result<Duration, Failure> {
    match std::env::var("ECHO_CTL_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
            _ => Err(usage(format!(
                "ECHO_CTL_TIMEOUT={v:?}: expected a positive number of seconds"
            ))),
        },
    }
}

/// Standard input, when it is not a terminal.
fn read_stdin() -> Result<String, Failure> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return Ok(String::new());
    }
    let mut bytes = Vec::new();
    match stdin.lock().read_to_end(&mut bytes) {
        Ok(_) => {}
        // A closed standard input is an empty one.
        Err(e) if e.raw_os_error() == Some(9) => {}
        Err(e) => return Err(usage(format!("reading stdin: {e}"))),
    }
    String::from_utf8(bytes).map_err(|e| {
        usage(format!(
            "stdin is not valid UTF-8 (invalid at byte {}); the protocol carries text",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn tcp_addrs(host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // echo-server's TCP control listens on 127.0.0.1: try it first, without the resolver.
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]);
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("could not resolve host {host:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(unreachable(format!("host {host:?} has no addresses")));
    }
    Ok(addrs)
}

fn connect_tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Failure> {
    let mut last = None;
    for addr in tcp_addrs(host, port)? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("tcp_addrs returns at least one address");
    Err(unreachable(format!(
        "could not connect to {host}:{port} ({addr}): {e}; is echo-server running with --control {port}?"
    )))
}

fn reply_error(what: &str, e: ControlError) -> Failure {
    unreachable(format!("{what}: {e}"))
}

/// One request and reply over a stream socket.
fn stream_round_trip<S: Read + Write>(mut s: S, request: &Request) -> Result<Reply, Failure> {
    request
        .write(&mut s)
        .map_err(|e| reply_error("sending the request", e))?;
    Reply::read(&mut BufReader::new(s), DEFAULT_MAX_RECORD).map_err(|e| {
        let e = match e {
            ControlError::Truncated { index: 0, got: 0, in_length: true, .. } => {
                return unreachable("the server closed the connection without a reply (it may have refused the request)")
            }
            e => e,
        };
        reply_error("reading the reply", e)
    })
}

fn unix_stream(path: &str, timeout: Duration) -> Result<UnixStream, Failure> {
    let s = UnixStream::connect(path).map_err(|e| {
        unreachable(format!(
            "could not connect to Unix socket {path}: {e}; is echo-server running with --control {path}?"
        ))
    })?;
    set_timeouts_unix(&s, timeout)?;
    Ok(s)
}

fn set_timeouts_unix(s: &UnixStream, timeout: Duration) -> Result<(), Failure> {
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable(format!("setting socket timeouts: {e}")))
}

/// A client datagram socket with an address the server can reply to.
#[cfg(target_os = "linux")]
fn dgram_socket() -> io::Result<(UnixDatagram, Option<std::path::PathBuf>)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr as UnixAddr;
    // An abstract name: nothing to clean up, even if we are killed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("echo-ctl-{}-{nanos}", std::process::id());
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    Ok((UnixDatagram::bind_addr(&addr)?, None))
}

/// A client datagram socket with an address the server can reply to.
#[cfg(not(target_os = "linux"))]
fn dgram_socket() -> io::Result<(UnixDatagram, Option<std::path::PathBuf>)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = std::env::temp_dir().join(format!("echo-ctl-{}-{nanos}.sock", std::process::id()));
    let s = UnixDatagram::bind(&path)?;
    Ok((s, Some(path)))
}

fn dgram_round_trip(path: &str, request: &Request, timeout: Duration) -> Result<Reply, Failure> {
    let (s, own_path) =
        dgram_socket().map_err(|e| unreachable(format!("creating a datagram socket: {e}")))?;
    struct Cleanup(Option<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _cleanup = Cleanup(own_path);
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable(format!("setting socket timeouts: {e}")))?;
    s.connect(path).map_err(|e| {
        unreachable(format!(
            "could not reach Unix datagram socket {path}: {e}; is echo-server running with --control-dgram {path}?"
        ))
    })?;
    let bytes = request
        .encode()
        .map_err(|e| reply_error("encoding the request", e))?;
    s.send(&bytes).map_err(|e| {
        unreachable(format!(
            "sending a {}-byte request datagram to {path}: {e}",
            bytes.len()
        ))
    })?;
    let mut buf = vec![0u8; MAX_DGRAM];
    let n = s.recv(&mut buf).map_err(|e| {
        unreachable(format!(
            "no reply datagram from {path}: {e} (ECHO_CTL_TIMEOUT={}s)",
            timeout.as_secs_f64()
        ))
    })?;
    Reply::decode(&buf[..n], MAX_DGRAM).map_err(|e| reply_error("decoding the reply datagram", e))
}

fn run(cli: &Cli, timeout: Duration) -> Result<Reply, Failure> {
    let request = Request {
        stdin: read_stdin()?,
        args: cli.args.clone(),
    };
    match (&cli.target, cli.dgram) {
        (Target::Tcp { host, port }, _) => {
            let s = connect_tcp(host, *port, timeout)?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(timeout))
                .and_then(|_| s.set_write_timeout(Some(timeout)))
                .map_err(|e| unreachable(format!("setting socket timeouts: {e}")))?;
            stream_round_trip(s, &request)
        }
        (Target::Unix(path), false) => stream_round_trip(unix_stream(path, timeout)?, &request),
        (Target::Unix(path), true) => dgram_round_trip(path, &request, timeout),
    }
}

fn main() -> ExitCode {
    let result = parse(std::env::args_os().skip(1).collect()).and_then(|parsed| match parsed {
        Parsed::Help => {
            let _ = io::stdout().write_all(HELP.as_bytes());
            Ok(None)
        }
        Parsed::Run(cli) => {
            let timeout = timeout_from_env()?;
            run(&cli, timeout).map(Some)
        }
    });
    match result {
        Ok(None) => ExitCode::from(EXIT_OK),
        Ok(Some(reply)) => {
            // Output errors (a closed pipe) do not change what the server said.
            let mut err = io::stderr().lock();
            let _ = err.write_all(reply.stderr.as_bytes());
            let _ = err.flush();
            let mut out = io::stdout().lock();
            let _ = out.write_all(reply.stdout.as_bytes());
            let _ = out.flush();
            ExitCode::from(if reply.stderr.is_empty() {
                EXIT_OK
            } else {
                EXIT_SERVER_ERROR
            })
        }
        Err(f) => {
            let _ = writeln!(io::stderr(), "echo-ctl: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, Failure> {
        parse(args.iter().map(OsString::from).collect())
    }

    fn cli(args: &[&str]) -> Cli {
        match p(args).unwrap() {
            Parsed::Run(c) => c,
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn number_is_tcp_anything_else_unix() {
        assert_eq!(
            cli(&["7000", "stats", "--json"]),
            Cli {
                target: Target::Tcp {
                    host: "localhost".into(),
                    port: 7000
                },
                dgram: false,
                args: "stats --json".into()
            }
        );
        assert_eq!(
            cli(&["/tmp/x.sock", "health"]).target,
            Target::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            cli(&["./7000", "health"]).target,
            Target::Unix("./7000".into())
        );
    }

    #[test]
    fn known_options_anywhere_unknown_forwarded() {
        let c = cli(&["--json", "7000", "stats", "--host", "::1", "x"]);
        assert_eq!(
            c.target,
            Target::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert_eq!(c.args, "--json stats x");
        let c = cli(&["s.sock", "--dgram", "a", "--", "--host", "-h", "b"]);
        assert!(c.dgram);
        assert_eq!(c.args, "a --host -h b");
        assert_eq!(
            cli(&["--host=h", "1"]).target,
            Target::Tcp {
                host: "h".into(),
                port: 1
            }
        );
        assert_eq!(cli(&["1"]).args, "");
        assert_eq!(p(&["7000", "stats", "-h"]).unwrap(), Parsed::Help);
    }

    #[test]
    fn usage_errors() {
        for (args, needle) in [
            (&[][..], "missing PORT_OR_PATH"),
            (&["--host"][..], "--host needs a value"),
            (&["70000"][..], "out of range"),
            (&["0"][..], "port 0"),
            (&["7000", "--dgram"][..], "Unix datagram sockets only"),
            (&[""][..], "empty"),
        ] {
            let f = p(args).unwrap_err();
            assert_eq!(f.status, EXIT_USAGE, "{args:?}");
            assert!(f.message.contains(needle), "{args:?}: {}", f.message);
        }
    }
}

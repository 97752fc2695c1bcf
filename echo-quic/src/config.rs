//! Transport tuning shared by server and client, and the UDP endpoint setup.
//!
//! The defaults aim at throughput on a LAN or loopback (round trips well under a
//! millisecond, 1-100 Gbit/s) while keeping each connection's memory bounded;
//! BENCHMARKS.md ("QUIC") has the measurements behind them.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use echo_core::transport::query_param;
use echo_core::{Error, Result, Url};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AsyncUdpSocket, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, Runtime, TransportConfig,
    UdpPoller, VarInt,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The largest `max_mtu` with `gso` on: 10 segments in one 65,507-byte UDP send.
const MAX_GSO_MTU: u16 = 6550;
/// Largest UDP payload a client endpoint accepts (see `Tuning::client_endpoint`).
const CLIENT_MAX_UDP_PAYLOAD: u16 = 1472;

/// Flow-control, congestion and packet-size settings (URL query parameters of
/// the same names override them, on both `quic://` servers and clients).
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Bytes a peer may send on one stream ahead of the reader (`stream_window`,
    /// default 2 MiB). Limits what one stream can have buffered at the receiver.
    pub stream_window: u64,
    /// Bytes a peer may send on all streams of a connection ahead of the reader
    /// (`conn_window`, default 4 MiB): the most a connection's unread data can
    /// occupy at the receiver. It is also what a connection can have in flight
    /// towards a server at once: below the server's UDP receive buffer
    /// (`udp_buffer`, which the kernel doubles), one connection cannot overflow
    /// it while the server is briefly descheduled (with 8 / 16 MiB, a thousand
    /// or more datagrams dropped per 2 s run on loopback, and losses that can
    /// make quinn-proto take the path for an MTU black hole; BENCHMARKS.md).
    /// A server's connections share its buffer: with `n` established, each
    /// gets the largest of this window, half of it, a quarter, and so on down
    /// to 256 KiB, that is at most `udp_buffer` as the system granted it
    /// (capped at `net.core.rmem_max`) divided by `n` (on loopback
    /// and a LAN a whole window can sit in the buffer; on long paths most of
    /// it is in the network, so there raise `udp_buffer` and the system's
    /// maximum to keep the shares large enough). A server also
    /// takes up to one payload per stream out of this window while it waits
    /// for a whole one (payloads of 64 KiB or more, which are received
    /// straight into the store).
    pub conn_window: u64,
    /// Bytes of application writes a sender keeps until they are acknowledged
    /// (`send_window`, default 16 MiB). A client also keeps up to this many
    /// bytes (at most 4 MiB) of its 64 KiB write buffers for reuse once they
    /// are acknowledged.
    pub send_window: u64,
    /// Largest UDP payload path-MTU discovery probes for (`max_mtu`, default
    /// 6500; quinn's default is 1452). Probes that do not fit the path are
    /// simply lost, so on a 1500-byte Ethernet this settles at 1452, on loopback
    /// or jumbo frames at 6500. With `gso` on it may be at most 6550: quinn hands
    /// the kernel up to 10 datagrams per send, and they must fit in 64 KiB (a
    /// larger batch is dropped whole, silently).
    pub max_mtu: u16,
    /// Largest UDP payload path-MTU discovery probes for on loopback, i.e. when
    /// the peer's address is a loopback address (`loopback_mtu`, default
    /// 65527, the most a UDP datagram carries over IPv6; discovery settles at
    /// what the path takes, 65,495 on IPv4 loopback in our runs). Above 6550 those connections send one
    /// datagram per system call instead of using `gso`: the kernel's cost per
    /// byte stays about the same, and quinn's per-packet work (headers,
    /// encryption calls, acknowledgements) drops. 0 treats loopback like any
    /// other path (`max_mtu`). Each large datagram a server receives keeps
    /// the 64 KiB buffer it was received in until its bytes are read: with
    /// glibc, a server process should keep freed memory for reuse
    /// ([`echo_core::heap::server_heap`], which echo-server calls), or those
    /// allocations cost page faults (BENCHMARKS.md, "QUIC").
    pub loopback_mtu: u16,
    /// Congestion controller (`cc`: `cubic`, the default, `bbr` or `newreno`).
    pub congestion: Congestion,
    /// UDP socket send and receive buffer size asked of the kernel (`udp_buffer`,
    /// default 4 MiB; the kernel caps it at `net.core.{r,w}mem_max`).
    pub udp_buffer: usize,
    /// Ack-eliciting packets a receiver may take before it must acknowledge
    /// (`ack_threshold`, default 4, through the ACK-frequency extension, which
    /// both ends must support; 0 leaves QUIC's usual ack-every-other-packet
    /// and does not negotiate the extension). Fewer acknowledgements are less
    /// work on both sides: at 1 MiB with one client, 8-10 % less CPU per byte
    /// on the client (BENCHMARKS.md, "QUIC").
    pub ack_threshold: u32,
    /// Whether to hand the kernel several datagrams per send (`gso`, default
    /// true). Clients only: a server sends one datagram per call (mostly
    /// acknowledgements), and receives with offload where the system has it.
    pub gso: bool,
    /// Idle time after which a connection is dropped (`idle_timeout` in seconds,
    /// default 30). Clients send keep-alives at a third of it.
    pub idle_timeout: Duration,
}

/// Where a connection's peer is, as far as packet sizes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A loopback address: this host, through the loopback device.
    Loopback,
    /// Any other address.
    Remote,
    /// Not known yet (a server's endpoint, which may have peers of both kinds).
    Any,
}

impl Peer {
    /// The kind of path to `addr`.
    pub(crate) fn of(addr: std::net::IpAddr) -> Peer {
        if addr.to_canonical().is_loopback() {
            Peer::Loopback
        } else {
            Peer::Remote
        }
    }
}

/// A congestion controller quinn offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 8312), quinn's default.
    Cubic,
    /// BBR (v1, experimental in quinn).
    Bbr,
    /// NewReno (RFC 6582).
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            _ => Err(format!("expected cubic, bbr or newreno, got {s:?}")),
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            stream_window: 2 * MIB,
            conn_window: 4 * MIB,
            send_window: 16 * MIB,
            max_mtu: 6500,
            loopback_mtu: 65527,
            congestion: Congestion::Cubic,
            udp_buffer: 4 * MIB as usize,
            ack_threshold: 4,
            gso: true,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

fn url_err(url: &Url, reason: String) -> Error {
    Error::Url {
        url: url.to_string(),
        reason,
    }
}

impl Tuning {
    /// The defaults overridden by `url`'s query parameters.
    pub fn from_url(url: &Url) -> Result<Tuning> {
        let d = Tuning::default();
        let t = Tuning {
            stream_window: query_param(url, "stream_window", d.stream_window)?,
            conn_window: query_param(url, "conn_window", d.conn_window)?,
            send_window: query_param(url, "send_window", d.send_window)?,
            max_mtu: query_param(url, "max_mtu", d.max_mtu)?,
            loopback_mtu: query_param(url, "loopback_mtu", d.loopback_mtu)?,
            congestion: query_param(url, "cc", d.congestion)?,
            udp_buffer: query_param(url, "udp_buffer", d.udp_buffer)?,
            gso: query_param(url, "gso", d.gso)?,
            ack_threshold: query_param(url, "ack_threshold", d.ack_threshold)?,
            idle_timeout: Duration::from_secs(query_param(
                url,
                "idle_timeout",
                d.idle_timeout.as_secs(),
            )?),
        };
        t.validate().map_err(|reason| url_err(url, reason))?;
        Ok(t)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let max_varint = (1u64 << 62) - 1;
        for (name, v) in [
            ("stream_window", self.stream_window),
            ("conn_window", self.conn_window),
        ] {
            if v < 64 * KIB || v > max_varint {
                return Err(format!(
                    "{name} must be between 65536 and 2^62-1 bytes, got {v}"
                ));
            }
        }
        if self.send_window < 64 * KIB {
            return Err(format!(
                "send_window must be at least 65536 bytes, got {}",
                self.send_window
            ));
        }
        if !(1200..=65527).contains(&self.max_mtu) {
            return Err(format!(
                "max_mtu must be between 1200 and 65527, got {}",
                self.max_mtu
            ));
        }
        if self.loopback_mtu != 0 && !(1200..=65527).contains(&self.loopback_mtu) {
            return Err(format!(
                "loopback_mtu must be 0 (off) or between 1200 and 65527, got {}",
                self.loopback_mtu
            ));
        }
        if self.gso && self.max_mtu > MAX_GSO_MTU {
            return Err(format!(
                "max_mtu above {MAX_GSO_MTU} needs gso=false (quinn sends up to 10 datagrams \
                 per call, which must fit in 64 KiB), got max_mtu={}",
                self.max_mtu
            ));
        }
        if self.idle_timeout < Duration::from_secs(1) || self.idle_timeout.as_secs() > 3600 {
            return Err(format!(
                "idle_timeout must be between 1 and 3600 seconds, got {}",
                self.idle_timeout.as_secs()
            ));
        }
        Ok(())
    }

    /// The MTU discovery bound and whether to use GSO on a path to `peer`.
    pub(crate) fn path(&self, peer: Peer) -> (u16, bool) {
        match peer {
            Peer::Loopback if self.loopback_mtu != 0 => (
                self.loopback_mtu,
                self.gso && self.loopback_mtu <= MAX_GSO_MTU,
            ),
            _ => (self.max_mtu, self.gso),
        }
    }

    /// quinn's transport config for these settings on a path to `peer`.
    /// `bidi_streams` is how many bidirectional streams the peer may open at
    /// once (0 for a client).
    pub(crate) fn transport(
        &self,
        bidi_streams: u32,
        keep_alive: bool,
        peer: Peer,
    ) -> TransportConfig {
        let (max_mtu, gso) = self.path(peer);
        let mut t = TransportConfig::default();
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        t.max_concurrent_bidi_streams(bidi_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.conn_window))
            .send_window(self.send_window)
            // On a LAN the first round trip is far below quinn's 333 ms guess.
            .initial_rtt(Duration::from_millis(10))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .enable_segmentation_offload(gso);
        if keep_alive {
            t.keep_alive_interval(Some(self.idle_timeout / 3));
        }
        if self.ack_threshold > 0 {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(self.ack_threshold.into());
            t.ack_frequency_config(Some(ack));
        }
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(max_mtu);
        // Probe again soon after a change of path instead of every 10 minutes.
        mtu.interval(Duration::from_secs(60));
        if peer == Peer::Loopback {
            // Loopback has no MTU black holes: losses there are full socket
            // buffers, which quinn-proto may still take for one and drop to
            // 1,200-byte packets. Probe up again after 2 s, not 60.
            mtu.black_hole_cooldown(Duration::from_secs(2));
        }
        t.mtu_discovery_config(Some(mtu));
        // With packets of up to 64 KiB (loopback), the usual initial window
        // (14,720 bytes) is below one packet: start at four of them. It also
        // keeps a path-MTU probe in flight from blocking everything else early
        // in a connection, which matters at close: quinn-proto 0.11.19 holds
        // back a CONNECTION_CLOSE while congestion control blocks the stream
        // frames still queued (quinn issue 2785, fixed after that release), and
        // the peer then learns of the close only by its idle timeout.
        let initial_window =
            (peer == Peer::Loopback && self.loopback_mtu != 0).then(|| 4 * u64::from(max_mtu));
        match self.congestion {
            Congestion::Cubic => {
                if let Some(w) = initial_window {
                    let mut cc = quinn::congestion::CubicConfig::default();
                    cc.initial_window(w);
                    t.congestion_controller_factory(Arc::new(cc));
                }
            }
            Congestion::Bbr => {
                let mut cc = quinn::congestion::BbrConfig::default();
                if let Some(w) = initial_window {
                    cc.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(cc));
            }
            Congestion::NewReno => {
                let mut cc = quinn::congestion::NewRenoConfig::default();
                if let Some(w) = initial_window {
                    cc.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(cc));
            }
        }
        t
    }

    /// quinn's endpoint config: accepts UDP payloads up to the MTU bound of
    /// any path it may carry (`Peer::Any` for a server that may also be reached
    /// over loopback).
    pub(crate) fn endpoint(&self, peer: Peer) -> EndpointConfig {
        let mut mtu = self.max_mtu;
        if peer != Peer::Remote {
            mtu = mtu.max(self.path(Peer::Loopback).0);
        }
        let mut e = EndpointConfig::default();
        // Within 1200..=65527 (validated), which quinn accepts.
        let _ = e.max_udp_payload_size(mtu.max(1472));
        e
    }

    /// quinn's endpoint config for a client: it accepts UDP payloads of up to
    /// 1472 bytes (what a 1500-byte Ethernet carries). A client receives only
    /// the server's acknowledgements, which gain nothing from large packets,
    /// and quinn sizes each endpoint's receive buffer by this bound (see
    /// [`NoGro`]): 46 KiB instead of 1 MiB on loopback. What the client
    /// sends is bounded by the server's endpoint and the client's path
    /// (`max_mtu`, `loopback_mtu`), not by this.
    pub(crate) fn client_endpoint(&self) -> EndpointConfig {
        let mut e = EndpointConfig::default();
        // Within 1200..=65527, which quinn accepts.
        let _ = e.max_udp_payload_size(CLIENT_MAX_UDP_PAYLOAD);
        e
    }

    /// [`server_socket`](Self::server_socket)'s socket alone.
    pub(crate) fn socket(&self, addr: SocketAddr) -> Result<UdpSocket> {
        Ok(self.server_socket(addr)?.0)
    }

    /// A UDP socket bound to `addr` with the configured buffer sizes, and
    /// quinn-udp's state for it, which turned on receive offload where the
    /// system has it (the server's driver splits what it receives by the
    /// segment size the kernel reports), packet info and ECN, and says
    /// whether the system may fragment datagrams sent on it (then path-MTU
    /// discovery is off) and what receive buffer it gave.
    pub(crate) fn server_socket(
        &self,
        addr: SocketAddr,
    ) -> Result<(UdpSocket, quinn::udp::UdpSocketState)> {
        let socket = UdpSocket::bind(addr).map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot bind UDP {addr}: {e}"),
            ))
        })?;
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        // Best effort: the kernel caps both at its configured maxima.
        if let Err(e) = state.set_recv_buffer_size((&socket).into(), self.udp_buffer) {
            tracing::debug!("quic: cannot set UDP receive buffer: {e}");
        }
        if let Err(e) = state.set_send_buffer_size((&socket).into(), self.udp_buffer) {
            tracing::debug!("quic: cannot set UDP send buffer: {e}");
        }
        Ok((socket, state))
    }
}

/// A client endpoint's UDP socket without receive offload (GRO).
///
/// quinn sizes an endpoint's receive buffer as `max_udp_payload_size` (up to
/// 64 KiB) x GRO segments (64 on Linux) x 32 datagrams per `recvmmsg`: 13 MiB
/// at a 6500-byte MTU, 64 MiB at 32768, allocated with every endpoint, and a
/// client has one endpoint of its own. With glibc, a freed block under 32 MiB
/// raises the allocator's mmap threshold, so later endpoints' buffers come from
/// the heap, where `calloc` zeroes (and so makes resident) all of it, and freed
/// ones stay in the heap: a process that keeps replacing QUIC clients grows by
/// megabytes per client (RELIABILITY.md, "QUIC client churn"). A client only
/// receives acknowledgements, so it needs no GRO: one datagram per buffer slot
/// makes the buffer 32 x the payload size, 46 KiB with a client's 1472-byte
/// bound ([`Tuning::client_endpoint`]).
#[derive(Debug)]
struct NoGro(Arc<dyn AsyncUdpSocket>);

impl AsyncUdpSocket for NoGro {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// Turns UDP receive offload off on `socket`; false if that failed.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn disable_gro(socket: &UdpSocket) -> bool {
    use std::os::fd::AsRawFd;
    let off: libc::c_int = 0;
    // SAFETY: a valid socket descriptor, and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Elsewhere quinn does not coalesce received datagrams on UDP sockets
/// (Windows' URO aside): nothing to turn off, but nothing known to be off.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn disable_gro(_socket: &UdpSocket) -> bool {
    false
}

impl Tuning {
    /// A client endpoint's socket bound to `addr`: [`socket`](Self::socket),
    /// handed to quinn without receive offload (see [`NoGro`]).
    pub(crate) fn client_socket(
        &self,
        addr: SocketAddr,
        runtime: &dyn Runtime,
    ) -> Result<Arc<dyn AsyncUdpSocket>> {
        let socket = self.socket(addr)?;
        let probe = socket.try_clone()?;
        // quinn turns GRO on here: off again afterwards.
        let wrapped = runtime.wrap_udp_socket(socket)?;
        if disable_gro(&probe) {
            Ok(Arc::new(NoGro(wrapped)))
        } else {
            Ok(wrapped)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning(query: &str) -> Result<Tuning> {
        Tuning::from_url(&Url::parse(&format!("quic://127.0.0.1:1?{query}")).unwrap())
    }

    #[test]
    fn loopback_peers_are_recognised() {
        for ip in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(Peer::of(ip.parse().unwrap()), Peer::Loopback, "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert_eq!(Peer::of(ip.parse().unwrap()), Peer::Remote, "{ip}");
        }
    }

    #[test]
    fn loopback_paths_get_large_packets_without_gso() {
        let t = tuning("").unwrap();
        assert_eq!(t.path(Peer::Loopback), (65527, false));
        assert_eq!(t.path(Peer::Remote), (6500, true));
        // A loopback bound that fits GSO keeps it.
        let t = tuning("loopback_mtu=6000").unwrap();
        assert_eq!(t.path(Peer::Loopback), (6000, true));
        // Off: loopback is like any other path.
        let t = tuning("loopback_mtu=0&max_mtu=1452").unwrap();
        assert_eq!(t.path(Peer::Loopback), (1452, true));
        let t = tuning("gso=false").unwrap();
        assert_eq!(t.path(Peer::Remote), (6500, false));
        assert_eq!(t.path(Peer::Loopback), (65527, false));
    }

    #[test]
    fn endpoints_accept_the_largest_packets_they_may_carry() {
        let t = tuning("loopback_mtu=30000").unwrap();
        let size = |peer| t.endpoint(peer).get_max_udp_payload_size();
        assert_eq!(size(Peer::Loopback), 30000);
        assert_eq!(size(Peer::Any), 30000);
        assert_eq!(size(Peer::Remote), 6500);
        let t = tuning("loopback_mtu=0").unwrap();
        assert_eq!(t.endpoint(Peer::Any).get_max_udp_payload_size(), 6500);
    }

    #[test]
    fn bad_loopback_mtu_is_refused_clearly() {
        for (v, want) in [("1000", "got 1000"), ("70000", "70000")] {
            let e = tuning(&format!("loopback_mtu={v}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("loopback_mtu") && e.contains(want), "{e}");
        }
    }
}

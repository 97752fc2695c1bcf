//! Receiving UDP datagrams straight into a buffer of their own, without
//! zeroing it first, and with receive offload where the system has it: on
//! Linux one call can return several datagrams of one sender glued together
//! (UDP GRO), each but the last `stride` bytes long. On Linux each receive
//! also says which of the host's addresses the datagrams were sent to
//! (packet info), so that a server bound to a wildcard address answers from
//! that address, and their ECN mark (which quinn-proto counts for the peer's
//! congestion controller); elsewhere neither.

use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use tokio::net::UdpSocket;

/// Room for the largest UDP payload there is (and for the largest batch that
/// receive offload returns at once: it stays within one IP packet's 64 KiB).
pub(crate) const MAX_RECEIVE: usize = 65_536;

/// What one receive brought: `len` bytes from `from` to `local`, in
/// datagrams of `stride` bytes (the last one may be shorter).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub(crate) from: SocketAddr,
    /// The address the datagrams were sent to, if the system says (packet
    /// info, which quinn-udp turns on for the sockets it sets up).
    pub(crate) local: Option<IpAddr>,
    /// The datagrams' ECN codepoint, if they carry one and the system says.
    pub(crate) ecn: Option<quinn_proto::EcnCodepoint>,
    pub(crate) len: usize,
    pub(crate) stride: usize,
}

/// Receives into `buf` (which must be empty) without waiting: `WouldBlock`
/// when nothing is there.
pub(crate) fn try_recv(socket: &UdpSocket, buf: &mut BytesMut) -> io::Result<Received> {
    debug_assert!(buf.is_empty());
    buf.reserve(MAX_RECEIVE);
    sys::try_recv(socket, buf)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use bytes::BytesMut;
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    use super::Received;

    /// Room for the control messages a socket set up by quinn-udp gets (packet
    /// info, traffic class, receive offload), with some to spare.
    #[repr(C, align(8))]
    struct Control([u8; 256]);

    pub(super) fn try_recv(socket: &UdpSocket, buf: &mut BytesMut) -> io::Result<Received> {
        socket.try_io(Interest::READABLE, || recv(socket, buf))
    }

    fn recv(socket: &UdpSocket, buf: &mut BytesMut) -> io::Result<Received> {
        let spare = buf.spare_capacity_mut();
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        // SAFETY: plain C structs, valid zeroed.
        let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
        let mut control = Control([0; 256]);
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        // SAFETY: every pointer in `msg` points at live memory of the length
        // given with it; the kernel writes at most that much into each.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = n as usize;
        // SAFETY: the kernel initialized the first `len` bytes of the spare room.
        unsafe { buf.set_len(len) };
        let mut stride = len;
        let mut local = None;
        let mut ecn = 0u8;
        // SAFETY: `msg` as filled in by recvmsg; the CMSG_* helpers walk the
        // headers within `msg_controllen` bytes of `control`, and `data`
        // reads a message's payload only if its length covers a `T` (a
        // message cut short by a full buffer, MSG_CTRUNC, says how much of it
        // is there).
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                    (libc::SOL_UDP, libc::UDP_GRO) => {
                        if let Some(segment) = data::<libc::c_int>(cmsg).filter(|&s| s > 0) {
                            stride = (segment as usize).min(len).max(1);
                        }
                    }
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        if let Some(info) = data::<libc::in_pktinfo>(cmsg) {
                            let ip = Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes());
                            local = Some(IpAddr::V4(ip));
                        }
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        if let Some(info) = data::<libc::in6_pktinfo>(cmsg) {
                            local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                        }
                    }
                    // The IPv4 type-of-service byte, the IPv6 traffic class
                    // (an int): ECN is their low two bits.
                    (libc::IPPROTO_IP, libc::IP_TOS) | (libc::IPPROTO_IP, libc::IP_RECVTOS) => {
                        ecn = data::<u8>(cmsg).unwrap_or(0);
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                        ecn = data::<libc::c_int>(cmsg).map_or(0, |c| c as u8);
                    }
                    _ => {}
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let from = socket_addr(&addr)?;
        Ok(Received {
            from,
            local,
            ecn: quinn_proto::EcnCodepoint::from_bits(ecn),
            len,
            stride,
        })
    }

    /// The payload of control message `cmsg` as a `T`, if the message is
    /// long enough to hold one.
    ///
    /// # Safety
    ///
    /// `cmsg` points at a control message header within a buffer the kernel
    /// filled, and its `cmsg_len` bytes are within that buffer.
    unsafe fn data<T: Copy>(cmsg: *const libc::cmsghdr) -> Option<T> {
        // SAFETY: as the caller promises; CMSG_LEN is arithmetic.
        unsafe {
            let need = libc::CMSG_LEN(size_of::<T>() as _) as usize;
            // `cmsg_len` is a usize with glibc, not with every libc.
            #[allow(clippy::unnecessary_cast)]
            if ((*cmsg).cmsg_len as usize) < need {
                return None;
            }
            Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<T>()))
        }
    }

    fn socket_addr(addr: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
        match addr.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET),
                // which fits in and is aligned for a sockaddr_storage.
                let a = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for a sockaddr_in6 (family AF_INET6).
                let a = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            family => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a datagram from an address of family {family}, not IPv4 or IPv6"),
            )),
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::io;

    use bytes::BytesMut;
    use tokio::net::UdpSocket;

    use super::Received;

    /// One datagram per call.
    pub(super) fn try_recv(socket: &UdpSocket, buf: &mut BytesMut) -> io::Result<Received> {
        let (len, from) = socket.try_recv_buf_from(buf)?;
        Ok(Received {
            from,
            local: None,
            ecn: None,
            len,
            stride: len.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Datagrams sent in one offloaded batch (GSO) come out of `try_recv`
    /// either glued together with their segment size (receive offload) or one
    /// by one; split by `stride`, they are the datagrams that were sent. Each
    /// receive says which address they were sent to.
    /// A server socket to receive on (set up as servers' are), its address,
    /// and a socket to send to it from, with quinn-udp's state for it.
    fn sockets() -> (
        UdpSocket,
        SocketAddr,
        std::net::UdpSocket,
        quinn::udp::UdpSocketState,
    ) {
        let (rx, ..) = crate::Tuning::default()
            .server_socket("127.0.0.1:0".parse().unwrap())
            .unwrap();
        rx.set_nonblocking(true).unwrap();
        let to = rx.local_addr().unwrap();
        let rx = UdpSocket::from_std(rx).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn::udp::UdpSocketState::new((&tx).into()).unwrap();
        (rx, to, tx, state)
    }

    #[tokio::test]
    async fn receive_offload_splits_into_the_datagrams_sent() {
        let (rx, to, tx, state) = sockets();
        let segments = state.max_gso_segments().clamp(1, 8);
        // Three batches: whole segments, a short last one, a single datagram.
        let batches: Vec<Vec<Vec<u8>>> = vec![
            (0..segments).map(|i| vec![i as u8; 1200]).collect(),
            (0..segments)
                .map(|i| vec![100 + i as u8; if i + 1 == segments { 700 } else { 1200 }])
                .collect(),
            vec![vec![250u8; 33]],
        ];
        let mut sent = Vec::new();
        for batch in &batches {
            let contents: Vec<u8> = batch.concat();
            let transmit = quinn::udp::Transmit {
                destination: to,
                ecn: None,
                contents: &contents,
                segment_size: (batch.len() > 1).then_some(batch[0].len()),
                src_ip: None,
            };
            state.send((&tx).into(), &transmit).unwrap();
            sent.extend(batch.iter().cloned());
        }
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        while got.len() < sent.len() {
            tokio::time::timeout(Duration::from_secs(5), rx.readable())
                .await
                .expect("datagrams in time")
                .unwrap();
            match try_recv(&rx, &mut buf) {
                Ok(r) => {
                    assert_eq!(r.len, buf.len());
                    assert_eq!(r.from, tx.local_addr().unwrap());
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    assert_eq!(r.local, Some(to.ip()), "packet info: sent to");
                    for d in buf.chunks(r.stride) {
                        got.push(d.to_vec());
                    }
                    buf.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, sent);
    }

    /// A datagram's ECN mark comes out of `try_recv` as it was sent, and
    /// an unmarked one as none.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn receives_carry_the_ecn_mark_sent() {
        let (rx, to, tx, state) = sockets();
        use quinn::udp::EcnCodepoint as Mark;
        use quinn_proto::EcnCodepoint as Got;
        let marks = [
            (Some(Mark::Ect0), Some(Got::Ect0)),
            (None, None),
            (Some(Mark::Ce), Some(Got::Ce)),
            (Some(Mark::Ect1), Some(Got::Ect1)),
        ];
        let mut buf = BytesMut::new();
        for (i, (mark, want)) in marks.into_iter().enumerate() {
            let contents = [i as u8; 40];
            let transmit = quinn::udp::Transmit {
                destination: to,
                ecn: mark,
                contents: &contents,
                segment_size: None,
                src_ip: None,
            };
            state.send((&tx).into(), &transmit).unwrap();
            let got = loop {
                tokio::time::timeout(Duration::from_secs(5), rx.readable())
                    .await
                    .expect("a datagram in time")
                    .unwrap();
                match try_recv(&rx, &mut buf) {
                    Ok(r) => break r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(&buf[..], &contents[..]);
            assert_eq!(got.ecn, want, "sent with {mark:?}");
            buf.clear();
        }
    }
}

//! Wire protocol v1, as pure state machines over byte buffers (no I/O).
//!
//! The protocol is fixed by id-echo's Python `TcpClient`:
//!
//! 1. On accept the server sends `ECHO`, the version byte `0x01`, a u32 LE leaf
//!    count, then per leaf a u32 LE item size, a u32 LE ndim and ndim u32 LE dims.
//! 2. The client sends payloads back to back, exactly `payload_size` bytes each,
//!    with no framing.
//! 3. The server answers each payload with one byte `0x01` once it is queued.
//!
//! TCP, Unix sockets and QUIC streams all drive these types; see
//! [`crate::stream`] for the async driver.

use crate::spec::{WireLeaf, WireSpec};

/// The four magic bytes that open the server's handshake.
pub const MAGIC: [u8; 4] = *b"ECHO";
/// The wire version this crate speaks.
pub const VERSION: u8 = 1;
/// The acknowledgement byte: one per payload.
pub const ACK: u8 = 0x01;
/// What a client writes first on transports where the server cannot see a
/// stream until the client writes (QUIC): the magic and the version.
pub const CLIENT_HELLO: [u8; 5] = [b'E', b'C', b'H', b'O', VERSION];

/// A buffer of ack bytes, to write many acks without building a buffer.
pub static ACKS: [u8; 4096] = [ACK; 4096];

/// Violations of wire v1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The handshake did not start with `ECHO`.
    #[error(
        "Unexpected handshake magic {}; expected b\"ECHO\": is the peer an echo server?",
        byte_str(got)
    )]
    BadMagic {
        /// The first bytes received.
        got: Vec<u8>,
    },
    /// A version this crate does not speak.
    #[error("Unsupported echo wire version {got} (this side supports {VERSION})")]
    BadVersion {
        /// The version received.
        got: u8,
    },
    /// More leaves than the decoder's limit.
    #[error("handshake announces {got} leaves; expected at most {max}")]
    TooManyLeaves {
        /// Leaves announced.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// A zero-leaf handshake.
    #[error("handshake announces 0 leaves; expected at least 1")]
    NoLeaves,
    /// More dimensions than the decoder's limit.
    #[error("handshake leaf #{leaf} has {got} dimensions; expected at most {max}")]
    TooManyDims {
        /// Leaf index.
        leaf: u32,
        /// Dimensions announced.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// A payload larger than the decoder's limit (or one that overflows).
    #[error("handshake describes a payload of {} bytes; expected at most {max}", got.map(|g| g.to_string()).unwrap_or_else(|| "more than usize::MAX".into()))]
    PayloadTooLarge {
        /// The size, if it fits in usize.
        got: Option<usize>,
        /// The limit.
        max: usize,
    },
    /// A handshake whose payload is zero bytes.
    #[error("handshake describes a zero-byte payload; expected at least 1 byte")]
    ZeroPayload,
    /// A client hello that is not [`CLIENT_HELLO`].
    #[error("bad client hello {}; expected {} (is the peer an echo client?)", byte_str(got), byte_str(&CLIENT_HELLO))]
    BadHello {
        /// The bytes received.
        got: Vec<u8>,
    },
    /// A byte other than [`ACK`] where an ack was expected.
    #[error("unexpected byte {got:#04x} in the ack stream; expected 0x01")]
    UnexpectedAckByte {
        /// The byte.
        got: u8,
    },
    /// More acks than payloads sent.
    #[error("server acknowledged {got} payloads but only {sent} were sent")]
    TooManyAcks {
        /// Acks received.
        got: u64,
        /// Payloads sent.
        sent: u64,
    },
    /// The stream ended inside a handshake or hello.
    #[error("connection closed during the {0}")]
    Truncated(&'static str),
}

/// Bytes as a byte-string literal, the way Python shows them: `b"HTTP"`, `b"\x00\x01"`.
fn byte_str(bytes: &[u8]) -> String {
    let mut s = String::from("b\"");
    for &b in bytes {
        s.extend(std::ascii::escape_default(b).map(char::from));
    }
    s.push('"');
    s
}

/// Limits that keep a hostile handshake from making the decoder allocate without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Most leaves accepted.
    pub max_leaves: u32,
    /// Most dimensions per leaf accepted.
    pub max_ndim: u32,
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_leaves: 4096,
            max_ndim: 32,
            max_payload: 1 << 31,
        }
    }
}

impl HandshakeLimits {
    /// The largest handshake these limits allow, in bytes (`usize::MAX` if that
    /// does not fit a usize).
    pub fn max_handshake_len(&self) -> usize {
        let per_leaf = (self.max_ndim as usize).saturating_mul(4).saturating_add(8);
        (self.max_leaves as usize)
            .saturating_mul(per_leaf)
            .saturating_add(9)
    }
}

/// Appends the server handshake for `spec` to `out`.
pub fn encode_handshake(spec: &WireSpec, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(spec.leaves.len() as u32).to_le_bytes());
    for leaf in &spec.leaves {
        out.extend_from_slice(&leaf.itemsize.to_le_bytes());
        out.extend_from_slice(&(leaf.shape.len() as u32).to_le_bytes());
        for d in &leaf.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

/// The server handshake for `spec`.
pub fn handshake_bytes(spec: &WireSpec) -> Vec<u8> {
    let mut out = Vec::new();
    encode_handshake(spec, &mut out);
    out
}

/// Incremental decoder for the server handshake: feed it bytes as they arrive.
///
/// Each field is parsed once, however the bytes are cut: a handshake that
/// arrives a byte at a time costs no more than one that arrives whole.
#[derive(Debug)]
pub struct HandshakeDecoder {
    limits: HandshakeLimits,
    buf: Vec<u8>,
    progress: Progress,
    failed: Option<WireError>,
}

/// What [`HandshakeDecoder::feed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed.
    NeedMore,
    /// The handshake is complete; `used` bytes of the last fed chunk belonged to it
    /// (the rest, if any, is what followed it on the stream).
    Done {
        /// The decoded spec.
        spec: WireSpec,
        /// Bytes of the last chunk consumed.
        used: usize,
    },
}

impl HandshakeDecoder {
    /// A decoder with the given limits.
    pub fn new(limits: HandshakeLimits) -> Self {
        HandshakeDecoder {
            limits,
            buf: Vec::new(),
            progress: Progress::default(),
            failed: None,
        }
    }

    /// Feeds bytes; returns the spec once the handshake is complete. After a
    /// refusal, every later call returns the same refusal; after the spec, every
    /// later call returns it again with `used: 0`.
    pub fn feed(&mut self, data: &[u8]) -> Result<Decoded, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let before = self.buf.len();
        if !self.progress.complete() {
            // Never hold more than the largest handshake the limits allow.
            let room = self.limits.max_handshake_len().saturating_sub(before);
            self.buf.extend_from_slice(&data[..data.len().min(room)]);
        }
        match self.progress.resume(&self.buf, &self.limits) {
            Ok(None) => Ok(Decoded::NeedMore),
            Ok(Some(len)) => Ok(Decoded::Done {
                spec: WireSpec {
                    leaves: self.progress.leaves.clone(),
                },
                used: len.saturating_sub(before),
            }),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes buffered so far.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Parses a complete handshake at the start of `buf`, or `None` if more bytes are
/// needed. Checks limits as soon as each count is known, before allocating for it.
pub fn parse_handshake(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(WireSpec, usize)>, WireError> {
    let mut progress = Progress::default();
    Ok(progress.resume(buf, limits)?.map(|len| {
        (
            WireSpec {
                leaves: progress.leaves,
            },
            len,
        )
    }))
}

/// How far a handshake parse has come through a buffer that only grows: every
/// field read so far, so that more bytes resume the parse instead of repeating it.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes parsed: the next field starts here.
    pos: usize,
    /// The leaf count, once read.
    count: Option<u32>,
    /// The leaves read whole.
    leaves: Vec<WireLeaf>,
    /// Their payload bytes.
    total: usize,
    /// The current leaf's item size and dimension count, once read.
    itemsize: Option<u32>,
    ndim: Option<u32>,
    /// The current leaf's dimensions read so far, and their product with the item
    /// size (`None` once it overflows).
    shape: Vec<u32>,
    size: Option<usize>,
    /// 4-byte fields read, to test that none is read twice.
    #[cfg(test)]
    words: usize,
}

impl Progress {
    fn complete(&self) -> bool {
        self.count
            .is_some_and(|n| self.leaves.len() == n as usize && self.total > 0)
    }

    /// The next little-endian u32, if the buffer holds it.
    fn word(&mut self, buf: &[u8]) -> Option<u32> {
        let b = buf.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        #[cfg(test)]
        {
            self.words += 1;
        }
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Parses on from where the last call stopped; `buf` holds the same bytes as
    /// then, and maybe more. Returns the handshake's length once it is complete.
    /// After an error the progress is not meant to be resumed.
    fn resume(&mut self, buf: &[u8], limits: &HandshakeLimits) -> Result<Option<usize>, WireError> {
        if self.pos < 5 {
            let head = &buf[..buf.len().min(4)];
            if head != &MAGIC[..head.len()] {
                return Err(WireError::BadMagic { got: head.to_vec() });
            }
            if buf.len() < 5 {
                return Ok(None);
            }
            if buf[4] != VERSION {
                return Err(WireError::BadVersion { got: buf[4] });
            }
            self.pos = 5;
        }
        let n = match self.count {
            Some(n) => n,
            None => {
                let Some(n) = self.word(buf) else {
                    return Ok(None);
                };
                if n == 0 {
                    return Err(WireError::NoLeaves);
                }
                if n > limits.max_leaves {
                    return Err(WireError::TooManyLeaves {
                        got: n,
                        max: limits.max_leaves,
                    });
                }
                self.count = Some(n);
                n
            }
        };
        while self.leaves.len() < n as usize {
            let itemsize = match self.itemsize {
                Some(s) => s,
                None => {
                    let Some(s) = self.word(buf) else {
                        return Ok(None);
                    };
                    self.itemsize = Some(s);
                    self.size = Some(s as usize);
                    s
                }
            };
            let ndim = match self.ndim {
                Some(d) => d,
                None => {
                    let Some(d) = self.word(buf) else {
                        return Ok(None);
                    };
                    if d > limits.max_ndim {
                        return Err(WireError::TooManyDims {
                            leaf: self.leaves.len() as u32,
                            got: d,
                            max: limits.max_ndim,
                        });
                    }
                    // Reserve only for what the bytes at hand can describe: under
                    // generous limits a peer's count alone must not decide an
                    // allocation.
                    let left = buf.len().saturating_sub(self.pos) / 4;
                    self.shape = Vec::with_capacity((d as usize).min(left));
                    self.ndim = Some(d);
                    d
                }
            };
            while self.shape.len() < ndim as usize {
                let Some(d) = self.word(buf) else {
                    return Ok(None);
                };
                self.size = self.size.and_then(|s| s.checked_mul(d as usize));
                self.shape.push(d);
            }
            match self.size.and_then(|s| self.total.checked_add(s)) {
                Some(t) if t <= limits.max_payload => self.total = t,
                got => {
                    return Err(WireError::PayloadTooLarge {
                        got,
                        max: limits.max_payload,
                    })
                }
            }
            self.leaves.push(WireLeaf {
                itemsize,
                shape: std::mem::take(&mut self.shape),
            });
            self.itemsize = None;
            self.ndim = None;
        }
        if self.total == 0 {
            return Err(WireError::ZeroPayload);
        }
        Ok(Some(self.pos))
    }
}

/// Checks a client hello; `Ok(false)` means more bytes are needed.
pub fn check_hello(got: &[u8]) -> Result<bool, WireError> {
    let n = got.len().min(CLIENT_HELLO.len());
    if got[..n] != CLIENT_HELLO[..n] {
        return Err(WireError::BadHello {
            got: got[..n].to_vec(),
        });
    }
    Ok(got.len() >= CLIENT_HELLO.len())
}

/// Splits a byte stream into fixed-size payloads inside a reusable receive buffer.
///
/// Bytes are read (or fed) into [`spare`](Self::spare), committed, and whole
/// payloads are handed out as one buffer with [`take`](Self::take), which moves
/// the incomplete tail, if any, into the next buffer. A payload split over many
/// reads and many payloads in one read both come out whole; the tail copy only
/// happens when the stream paused mid-payload.
#[derive(Debug)]
pub struct PayloadSplitter {
    payload_size: usize,
    buf: Vec<u8>,
    filled: usize,
}

impl PayloadSplitter {
    /// A splitter whose buffers hold `per_chunk` payloads (at least 1).
    pub fn new(payload_size: usize, per_chunk: usize) -> Self {
        assert!(payload_size > 0, "payload size must be positive");
        let cap = payload_size * per_chunk.max(1);
        PayloadSplitter {
            payload_size,
            buf: vec![0; cap],
            filled: 0,
        }
    }

    /// How many payloads of `payload_size` fit in a chunk of about `target` bytes (at least 1).
    pub fn payloads_per_chunk(payload_size: usize, target: usize) -> usize {
        (target / payload_size.max(1)).max(1)
    }

    /// The payload size.
    pub fn payload_size(&self) -> usize {
        self.payload_size
    }

    /// Bytes a buffer for this splitter must hold.
    pub fn chunk_capacity(&self) -> usize {
        self.buf.len()
    }

    /// Room to read into; empty only when the buffer is full of whole payloads.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Marks `n` bytes of [`spare`](Self::spare) as received.
    pub fn commit(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.buf.len());
    }

    /// Copies as much of `data` as fits; returns how many bytes were taken.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    /// Whole payloads buffered.
    pub fn ready(&self) -> usize {
        self.filled / self.payload_size
    }

    /// True when no more bytes fit.
    pub fn is_full(&self) -> bool {
        self.filled == self.buf.len()
    }

    /// Bytes of an incomplete payload buffered (0 at a payload boundary).
    pub fn partial_len(&self) -> usize {
        self.filled % self.payload_size
    }

    /// Hands out the buffer holding the [`ready`](Self::ready) whole payloads (its
    /// first `ready() * payload_size` bytes) and continues in `next`, into which
    /// the incomplete tail is moved. `next` is resized to the chunk capacity.
    pub fn take(&mut self, mut next: Vec<u8>) -> Chunk {
        let whole = self.ready() * self.payload_size;
        let tail = self.filled - whole;
        if next.len() != self.buf.len() {
            next.resize(self.buf.len(), 0);
        }
        next[..tail].copy_from_slice(&self.buf[whole..self.filled]);
        self.filled = tail;
        let buf = std::mem::replace(&mut self.buf, next);
        Chunk {
            buf,
            len: whole,
            payload_size: self.payload_size,
        }
    }
}

/// Whole payloads, back to back, in a (possibly larger) buffer.
#[derive(Debug)]
pub struct Chunk {
    buf: Vec<u8>,
    len: usize,
    payload_size: usize,
}

impl Chunk {
    /// Wraps the first `len` bytes of `buf`, which must be whole payloads.
    pub fn new(buf: Vec<u8>, len: usize, payload_size: usize) -> Self {
        debug_assert!(len <= buf.len() && payload_size > 0 && len % payload_size == 0);
        let len = len.min(buf.len());
        Chunk {
            buf,
            len,
            payload_size,
        }
    }

    /// The payload bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// How many payloads.
    pub fn count(&self) -> usize {
        self.len / self.payload_size
    }

    /// The payloads, one slice each.
    pub fn payloads(&self) -> std::slice::ChunksExact<'_, u8> {
        self.bytes().chunks_exact(self.payload_size)
    }

    /// Gives the buffer back, for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// Counts acks on the client side and checks that nothing else arrives.
#[derive(Debug, Default, Clone)]
pub struct AckCounter {
    acked: u64,
}

impl AckCounter {
    /// Counts the acks in `data`; any byte other than [`ACK`] is an error.
    pub fn feed(&mut self, data: &[u8], sent: u64) -> Result<u64, WireError> {
        if let Some(&bad) = data.iter().find(|&&b| b != ACK) {
            return Err(WireError::UnexpectedAckByte { got: bad });
        }
        self.acked += data.len() as u64;
        if self.acked > sent {
            return Err(WireError::TooManyAcks {
                got: self.acked,
                sent,
            });
        }
        Ok(data.len() as u64)
    }

    /// Acks counted so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DType, Leaf, Spec};
    use proptest::prelude::*;

    fn sample_spec() -> WireSpec {
        Spec::new(vec![
            Leaf::new("a", vec![2, 3], DType::Float32),
            Leaf::new("b", vec![], DType::Uint8),
        ])
        .unwrap()
        .wire()
    }

    #[test]
    fn handshake_bytes_are_exact() {
        let bytes = handshake_bytes(&sample_spec());
        let mut want = b"ECHO\x01".to_vec();
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&4u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(bytes, want);
    }

    #[test]
    fn decoder_reports_bytes_after_handshake() {
        let mut bytes = handshake_bytes(&sample_spec());
        let hs_len = bytes.len();
        bytes.extend_from_slice(&[1, 1, 1]);
        let mut d = HandshakeDecoder::new(HandshakeLimits::default());
        assert_eq!(d.feed(&bytes[..7]).unwrap(), Decoded::NeedMore);
        match d.feed(&bytes[7..]).unwrap() {
            Decoded::Done { spec, used } => {
                assert_eq!(spec, sample_spec());
                assert_eq!(used, hs_len - 7);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decoder_rejections() {
        let lim = HandshakeLimits {
            max_leaves: 4,
            max_ndim: 3,
            max_payload: 1000,
        };
        let e = parse_handshake(b"HTTP/1.1", &lim).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unexpected handshake magic b\"HTTP\"; expected b\"ECHO\": is the peer an echo server?"
        );
        let e = parse_handshake(&[0, 0xff, b'"'], &lim).unwrap_err();
        assert!(e.to_string().contains(r#"magic b"\x00\xff\"";"#), "{e}");
        assert!(matches!(parse_handshake(b"EC", &lim), Ok(None)));
        assert!(matches!(
            parse_handshake(b"EX", &lim),
            Err(WireError::BadMagic { .. })
        ));
        assert_eq!(
            parse_handshake(b"ECHO\x02", &lim).unwrap_err(),
            WireError::BadVersion { got: 2 }
        );
        let mut b = b"ECHO\x01".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_handshake(&b, &lim).unwrap_err(),
            WireError::TooManyLeaves {
                got: u32::MAX,
                max: 4
            }
        );
        let mut b = b"ECHO\x01".to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_handshake(&b, &lim).unwrap_err(), WireError::NoLeaves);
        let mut b = b"ECHO\x01".to_vec();
        for x in [1u32, 4, 9] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert!(matches!(
            parse_handshake(&b, &lim).unwrap_err(),
            WireError::TooManyDims {
                leaf: 0,
                got: 9,
                max: 3
            }
        ));
        let mut b = b"ECHO\x01".to_vec();
        for x in [1u32, 4, 2, 100, 100] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert!(matches!(
            parse_handshake(&b, &lim).unwrap_err(),
            WireError::PayloadTooLarge {
                got: Some(40000),
                max: 1000
            }
        ));
        let mut b = b"ECHO\x01".to_vec();
        for x in [1u32, u32::MAX, 3, u32::MAX, u32::MAX, u32::MAX] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert!(matches!(
            parse_handshake(
                &b,
                &HandshakeLimits {
                    max_payload: usize::MAX,
                    ..lim
                }
            )
            .unwrap_err(),
            WireError::PayloadTooLarge { got: None, .. }
        ));
        let mut b = b"ECHO\x01".to_vec();
        for x in [1u32, 4, 1, 0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(
            parse_handshake(&b, &lim).unwrap_err(),
            WireError::ZeroPayload
        );
    }

    #[test]
    fn decoder_buffer_is_bounded() {
        let lim = HandshakeLimits {
            max_leaves: 2,
            max_ndim: 2,
            max_payload: 1 << 20,
        };
        let mut d = HandshakeDecoder::new(lim);
        let mut b = b"ECHO\x01".to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        assert_eq!(d.feed(&b).unwrap(), Decoded::NeedMore);
        // A flood of bytes that never completes stays within the limit's size.
        for _ in 0..100 {
            let _ = d.feed(&[0u8; 1000]);
        }
        assert!(d.buffered() <= lim.max_handshake_len());
    }

    /// Found by the `handshake` fuzz target: the largest limits a caller can set
    /// overflowed `max_handshake_len`, and a peer's leaf or dimension count alone
    /// sized an allocation (128 GiB for `u32::MAX` leaves).
    #[test]
    fn the_largest_limits_neither_overflow_nor_let_counts_allocate() {
        let lim = HandshakeLimits {
            max_leaves: u32::MAX,
            max_ndim: u32::MAX,
            max_payload: usize::MAX,
        };
        assert_eq!(lim.max_handshake_len(), usize::MAX);
        let mut b = b"ECHO\x01".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut d = HandshakeDecoder::new(lim);
        assert_eq!(d.feed(&b).unwrap(), Decoded::NeedMore);
        for x in [4u32, u32::MAX, 7] {
            assert_eq!(d.feed(&x.to_le_bytes()).unwrap(), Decoded::NeedMore);
        }
        assert_eq!(d.buffered(), b.len() + 12);
        // The same leaf, complete, under limits that fit it exactly.
        let spec = WireSpec {
            leaves: vec![WireLeaf {
                itemsize: 4,
                shape: vec![7],
            }],
        };
        let exact = HandshakeLimits {
            max_leaves: 1,
            max_ndim: 1,
            max_payload: 28,
        };
        let bytes = handshake_bytes(&spec);
        assert_eq!(exact.max_handshake_len(), bytes.len());
        assert_eq!(
            parse_handshake(&bytes, &exact).unwrap(),
            Some((spec, bytes.len()))
        );
    }

    /// Found while fuzzing (the handshake target slowed down as its inputs grew):
    /// the decoder parsed its whole buffer again on every feed, so a server that
    /// sent the largest handshake the default limits allow (557 KB) in 10-byte
    /// pieces cost its client 18 s of CPU. Now each field is read once, however
    /// the bytes are cut.
    #[test]
    fn a_handshake_trickled_a_byte_at_a_time_reads_each_field_once() {
        let lim = HandshakeLimits::default();
        let spec = WireSpec {
            leaves: (0..300)
                .map(|i| WireLeaf {
                    itemsize: 1 + i % 4,
                    shape: vec![1; (i % 33) as usize],
                })
                .collect(),
        };
        let bytes = handshake_bytes(&spec);
        let mut d = HandshakeDecoder::new(lim);
        for (i, b) in bytes.iter().enumerate() {
            let got = d.feed(std::slice::from_ref(b)).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(got, Decoded::NeedMore, "after {} bytes", i + 1);
            } else {
                assert_eq!(
                    got,
                    Decoded::Done {
                        spec: spec.clone(),
                        used: 1
                    }
                );
            }
        }
        assert_eq!(d.progress.words, (bytes.len() - 5) / 4);
        // Fed again after the spec: the same spec, none of the new bytes used.
        assert_eq!(d.feed(&[1, 2, 3]).unwrap(), Decoded::Done { spec, used: 0 });
        assert_eq!(d.buffered(), bytes.len());
        // A refusal stands, whatever comes after it.
        let mut d = HandshakeDecoder::new(lim);
        let mut b = b"ECHO\x01".to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(d.feed(&b).unwrap_err(), WireError::NoLeaves);
        assert_eq!(d.feed(&[1, 0, 0, 0]).unwrap_err(), WireError::NoLeaves);
    }

    #[test]
    fn hello() {
        assert!(!check_hello(b"EC").unwrap());
        assert!(check_hello(&CLIENT_HELLO).unwrap());
        assert!(check_hello(b"GET /").is_err());
    }

    #[test]
    fn ack_counter_is_strict() {
        let mut c = AckCounter::default();
        assert_eq!(c.feed(&[1, 1], 5).unwrap(), 2);
        assert_eq!(
            c.feed(&[1, 2], 5).unwrap_err(),
            WireError::UnexpectedAckByte { got: 2 }
        );
        assert!(matches!(
            c.feed(&[1; 4], 5),
            Err(WireError::TooManyAcks { got: 6, sent: 5 })
        ));
    }

    fn arb_wire_spec() -> impl Strategy<Value = WireSpec> {
        prop::collection::vec(
            (
                prop::sample::select(vec![1u32, 2, 4, 8, 16]),
                prop::collection::vec(1u32..6, 0..4),
            ),
            1..6,
        )
        .prop_map(|leaves| WireSpec {
            leaves: leaves
                .into_iter()
                .map(|(itemsize, shape)| WireLeaf { itemsize, shape })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn handshake_round_trips_under_any_chunking(spec in arb_wire_spec(), cuts in prop::collection::vec(1usize..9, 0..40)) {
            let bytes = handshake_bytes(&spec);
            let mut d = HandshakeDecoder::new(HandshakeLimits::default());
            let mut pos = 0;
            let mut cuts = cuts.into_iter();
            loop {
                let n = cuts.next().unwrap_or(bytes.len()).min(bytes.len() - pos);
                match d.feed(&bytes[pos..pos + n]).unwrap() {
                    Decoded::NeedMore => { pos += n; prop_assert!(pos < bytes.len()); }
                    Decoded::Done { spec: got, used } => {
                        prop_assert_eq!(got, spec);
                        prop_assert_eq!(pos + used, bytes.len());
                        break;
                    }
                }
            }
        }

        #[test]
        fn splitter_yields_same_payloads_for_any_chunking(
            ps in 1usize..64,
            per_chunk in 1usize..8,
            count in 0usize..50,
            cuts in prop::collection::vec(1usize..200, 1..100),
            pause_every in 1usize..5,
        ) {
            let stream: Vec<u8> = (0..ps * count).map(|i| (i * 7 + i / ps) as u8).collect();
            let mut sp = PayloadSplitter::new(ps, per_chunk);
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - pos);
                let took = sp.feed(&stream[pos..pos + n]);
                pos += took;
                i += 1;
                // Flush when full, or now and then as if the socket ran dry.
                if sp.is_full() || (i % pause_every == 0 && sp.ready() > 0) {
                    let chunk = sp.take(Vec::new());
                    prop_assert_eq!(chunk.count() * ps, chunk.bytes().len());
                    out.extend(chunk.payloads().map(|p| p.to_vec()));
                }
            }
            if sp.ready() > 0 {
                out.extend(sp.take(Vec::new()).payloads().map(|p| p.to_vec()));
            }
            prop_assert_eq!(sp.partial_len(), 0);
            let want: Vec<Vec<u8>> = stream.chunks_exact(ps).map(|p| p.to_vec()).collect();
            prop_assert_eq!(out, want);
        }
    }
}

//! Property checks for the pure decoders that read untrusted bytes: the wire v1
//! handshake decoder, the client hello check, the client's ack counter, the
//! payload splitter, the control-record reader and the spec JSON loader.
//!
//! Each `check_*` function runs one input through a decoder, in several ways where
//! the decoder has several (whole or in pieces, sync or async), and panics with a
//! message if a property fails. They return what the decoder decided so a caller
//! can check more. The property tests in echo-core and the cargo-fuzz targets in
//! `fuzz/` both call them: proptest searches small structured inputs in CI, the
//! fuzzer searches raw bytes for as long as it is given.

use std::future::Future;
use std::io::{self, Read};
use std::mem::discriminant;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

use crate::control::{
    decode_record, decode_record_exact, encode_record, read_record, read_record_async,
    ControlError, Request, FIELDS, LEN_PREFIX,
};
use crate::spec::{Spec, SpecError, WireSpec};
use crate::wire::{
    check_hello, handshake_bytes, parse_handshake, AckCounter, Decoded, HandshakeDecoder,
    HandshakeLimits, PayloadSplitter, WireError, ACK, CLIENT_HELLO,
};

/// Piece sizes to cut a stream with: `cuts[i % cuts.len()]`, each at least 1 byte.
/// An empty list means one piece.
fn pieces<'a>(mut rest: &'a [u8], cuts: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = match cuts {
            [] => rest.len(),
            _ => cuts[i % cuts.len()].clamp(1, rest.len()),
        };
        i += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        Some(piece)
    })
}

/// What feeding a stream to a [`HandshakeDecoder`] came to: the spec and the bytes
/// of the stream it took, `Ok(None)` if it still wants more, or the refusal.
pub type HandshakeOutcome = Result<Option<(WireSpec, usize)>, WireError>;

/// Feeds `bytes` to a decoder in pieces cut at `cuts`, checking after every piece
/// that it buffers no more than `limits` allow, and that once it has decided, more
/// bytes do not change its decision.
fn feed_handshake(limits: HandshakeLimits, bytes: &[u8], cuts: &[usize]) -> HandshakeOutcome {
    let mut dec = HandshakeDecoder::new(limits);
    let mut fed = 0;
    for piece in pieces(bytes, cuts) {
        let got = dec.feed(piece);
        assert!(
            dec.buffered() <= limits.max_handshake_len(),
            "the handshake decoder holds {} bytes; its limits allow {}",
            dec.buffered(),
            limits.max_handshake_len()
        );
        match got {
            Ok(Decoded::NeedMore) => fed += piece.len(),
            Ok(Decoded::Done { spec, used }) => {
                assert!(
                    used <= piece.len(),
                    "the decoder says it used {used} bytes of a {}-byte piece",
                    piece.len()
                );
                let again = Decoded::Done {
                    spec: spec.clone(),
                    used: 0,
                };
                assert_eq!(dec.feed(bytes), Ok(again), "fed again after the spec");
                return Ok(Some((spec, fed + used)));
            }
            Err(e) => {
                assert_eq!(dec.feed(bytes), Err(e.clone()), "fed again after a refusal");
                return Err(e);
            }
        }
    }
    Ok(None)
}

/// Runs `bytes`, a server's handshake stream, through the handshake decoder whole
/// and in pieces cut at `cuts`, and checks that:
///
/// * the decoder never buffers more than `limits` allow;
/// * the outcome does not depend on the cuts (same spec and length, or the same
///   kind of refusal);
/// * it decides once a limit's worth of bytes has come: it wants more only while
///   fewer than [`HandshakeLimits::max_handshake_len`] bytes are in;
/// * an accepted spec is within `limits` and describes a payload of 1 to
///   `max_payload` bytes, and encoding it gives back exactly the bytes it was
///   decoded from.
pub fn check_handshake(limits: HandshakeLimits, bytes: &[u8], cuts: &[usize]) -> HandshakeOutcome {
    let whole = feed_handshake(limits, bytes, &[]);
    let cut = feed_handshake(limits, bytes, cuts);
    match (&whole, &cut) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "fed whole vs fed in pieces {cuts:?}"),
        // A refusal's details may differ (a bad magic is reported with the bytes
        // seen so far), its kind may not.
        (Err(a), Err(b)) => assert_eq!(
            discriminant(a),
            discriminant(b),
            "fed whole: {a}; fed in pieces {cuts:?}: {b}"
        ),
        (a, b) => panic!("fed whole: {a:?}; fed in pieces {cuts:?}: {b:?}"),
    }
    match &whole {
        Ok(None) => assert!(
            bytes.len() < limits.max_handshake_len(),
            "still waiting after {} bytes; the limits allow a handshake of at most {}",
            bytes.len(),
            limits.max_handshake_len()
        ),
        Ok(Some((spec, used))) => {
            assert!(!spec.leaves.is_empty(), "accepted a spec without leaves");
            assert!(
                spec.leaves.len() <= limits.max_leaves as usize,
                "accepted {} leaves; the limit is {}",
                spec.leaves.len(),
                limits.max_leaves
            );
            for (i, leaf) in spec.leaves.iter().enumerate() {
                assert!(
                    leaf.shape.len() <= limits.max_ndim as usize,
                    "accepted leaf #{i} with {} dimensions; the limit is {}",
                    leaf.shape.len(),
                    limits.max_ndim
                );
            }
            let size = spec.payload_size();
            assert!(
                size.is_some_and(|s| s > 0 && s <= limits.max_payload),
                "accepted a payload of {size:?} bytes; expected 1 to {}",
                limits.max_payload
            );
            assert_eq!(
                handshake_bytes(spec),
                &bytes[..*used],
                "re-encoding the accepted spec does not give the bytes it came from"
            );
            assert_eq!(
                parse_handshake(&bytes[..*used], &limits),
                Ok(Some((spec.clone(), *used))),
                "parse_handshake on exactly the handshake's bytes"
            );
        }
        Err(_) => {}
    }
    whole
}

/// One step of [`check_splitter`]'s reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitStep {
    /// Bytes the "socket" offers in this read (at least 1 is offered).
    pub read: usize,
    /// Read through [`PayloadSplitter::spare`] and
    /// [`commit`](PayloadSplitter::commit), as the stream driver does, instead of
    /// [`feed`](PayloadSplitter::feed).
    pub via_spare: bool,
    /// Hand out the whole payloads after this read, as if the socket ran dry (they
    /// are also handed out whenever the buffer is full).
    pub take: bool,
    /// Length of the buffer given to [`take`](PayloadSplitter::take) to continue
    /// in, filled with junk that must not leak into payloads.
    pub next_len: usize,
}

/// Feeds `stream` through a [`PayloadSplitter`] of `payload_size` bytes (1 or
/// more) and `per_chunk` payloads per buffer, reading as `steps` say (cycling; no
/// steps means the longest reads), and checks that:
///
/// * every handed-out chunk holds whole payloads only;
/// * [`ready`](PayloadSplitter::ready) and [`partial_len`](PayloadSplitter::partial_len)
///   always account for exactly the bytes buffered;
/// * the payloads handed out, concatenated, are exactly the stream's longest
///   prefix of whole payloads, whatever the reads, the buffers handed back and the
///   moments payloads are taken; the rest stays as the partial tail.
///
/// Returns the number of payloads handed out.
pub fn check_splitter(
    payload_size: usize,
    per_chunk: usize,
    stream: &[u8],
    steps: &[SplitStep],
) -> usize {
    let default = [SplitStep {
        read: usize::MAX,
        via_spare: true,
        take: false,
        next_len: 0,
    }];
    let steps = if steps.is_empty() {
        &default[..]
    } else {
        steps
    };
    let mut sp = PayloadSplitter::new(payload_size, per_chunk);
    assert_eq!(sp.payload_size(), payload_size);
    assert_eq!(sp.chunk_capacity(), payload_size * per_chunk.max(1));
    let mut out: Vec<u8> = Vec::with_capacity(stream.len());
    let mut pos = 0;
    let mut recycled: Vec<Vec<u8>> = Vec::new();
    for (i, step) in steps.iter().cycle().enumerate() {
        if pos == stream.len() {
            break;
        }
        assert!(
            i <= 4 * stream.len() + 4,
            "the splitter stopped taking bytes"
        );
        let offer = &stream[pos..pos + step.read.clamp(1, stream.len() - pos)];
        let took = if step.via_spare {
            let spare = sp.spare();
            let n = spare.len().min(offer.len());
            spare[..n].copy_from_slice(&offer[..n]);
            sp.commit(n);
            n
        } else {
            sp.feed(offer)
        };
        pos += took;
        let buffered = pos - out.len();
        assert_eq!(
            (sp.ready(), sp.partial_len()),
            (buffered / payload_size, buffered % payload_size),
            "after {pos} bytes in and {} out",
            out.len()
        );
        assert_eq!(sp.is_full(), buffered == sp.chunk_capacity());
        if (step.take || sp.is_full()) && sp.ready() > 0 {
            // Hand back an old buffer now and then, as the connection's pool does.
            let mut next = recycled.pop().unwrap_or_default();
            next.clear();
            next.resize(step.next_len, 0xa5);
            let chunk = sp.take(next);
            assert_eq!(chunk.bytes().len(), chunk.count() * payload_size);
            assert_eq!(chunk.count(), buffered / payload_size);
            assert_eq!(chunk.payloads().len(), chunk.count());
            out.extend_from_slice(chunk.bytes());
            assert_eq!(
                out,
                &stream[..out.len()],
                "payloads handed out differ from the stream"
            );
            recycled.push(chunk.into_buffer());
        }
    }
    if sp.ready() > 0 {
        out.extend_from_slice(sp.take(Vec::new()).bytes());
    }
    let whole = stream.len() / payload_size * payload_size;
    assert_eq!(out.len(), whole, "bytes handed out as whole payloads");
    assert_eq!(
        out,
        &stream[..whole],
        "payloads handed out differ from the stream"
    );
    assert_eq!(sp.partial_len(), stream.len() - whole);
    assert_eq!(sp.ready(), 0);
    whole / payload_size
}

/// A reader that hands out at most `piece` bytes per read.
struct Trickle<'a> {
    rest: &'a [u8],
    piece: usize,
}

impl Trickle<'_> {
    fn next(&mut self, room: usize) -> &[u8] {
        let n = room.min(self.piece.max(1)).min(self.rest.len());
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        head
    }
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.next(buf.len());
        buf[..got.len()].copy_from_slice(got);
        Ok(got.len())
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let got = self.get_mut().next(buf.remaining());
        buf.put_slice(got);
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose I/O is always ready (an in-memory reader) to completion
/// on this thread, without a runtime.
fn run_ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("a future over an in-memory reader did not finish");
}

/// What reading one control record came to: the strings and the record's size in
/// bytes, or the error's message.
pub type ControlOutcome = Result<(Vec<String>, usize), String>;

/// Reads a record of `count` strings allowing `max` bytes from `bytes` with each
/// reader ([`decode_record`], [`read_record`] and [`read_record_async`], the last
/// two handed at most `piece` bytes per read) and checks that:
///
/// * all three agree: the same strings, or the same error message;
/// * the stream readers consume exactly the record, nothing after it;
/// * an accepted record has `count` strings, is at most `max` bytes, and encoding
///   them gives back exactly its bytes;
/// * a record refused as too large was refused from its length prefix: nothing
///   of the oversized string was read, and the size it names exceeds `max`;
/// * a truncation names fewer bytes than it expected;
/// * [`decode_record_exact`] (and [`Request::decode`], for two strings) accepts
///   the buffer exactly when the record fills it.
pub fn check_control_record(
    bytes: &[u8],
    count: usize,
    max: usize,
    piece: usize,
) -> ControlOutcome {
    let decoded = decode_record(bytes, count, max);

    let mut sync = Trickle { rest: bytes, piece };
    let read = read_record(&mut sync, count, max);
    let sync_used = bytes.len() - sync.rest.len();
    let mut asynch = Trickle { rest: bytes, piece };
    let read_async = run_ready(read_record_async(&mut asynch, count, max));
    let async_used = bytes.len() - asynch.rest.len();

    let outcome = decoded.as_ref().map(|(s, used)| (s.clone(), *used));
    let message =
        |r: &Result<Vec<String>, ControlError>| r.as_ref().map_err(|e| e.to_string()).cloned();
    let want = outcome
        .as_ref()
        .map(|(s, _)| s.clone())
        .map_err(|e| e.to_string());
    assert_eq!(message(&read), want, "read_record vs decode_record");
    assert_eq!(
        message(&read_async),
        want,
        "read_record_async vs decode_record"
    );
    assert_eq!(
        sync_used, async_used,
        "bytes consumed by the sync and async readers"
    );

    match &decoded {
        Ok((strings, used)) => {
            assert_eq!(strings.len(), count);
            assert!(
                *used <= max,
                "accepted a {used}-byte record; the maximum is {max}"
            );
            assert_eq!(
                *used,
                strings.iter().map(|s| LEN_PREFIX + s.len()).sum::<usize>()
            );
            assert_eq!(sync_used, *used, "the reader went past the record");
            assert_eq!(
                encode_record(strings).expect("decoded strings fit a u32 prefix"),
                &bytes[..*used],
                "re-encoding the accepted strings"
            );
        }
        Err(ControlError::TooLarge {
            announced,
            at_least,
            max: m,
            ..
        }) => {
            assert_eq!(*m, max);
            assert!(
                *at_least > max as u64,
                "refused {at_least} bytes as over {max}"
            );
            assert_eq!(
                sync_used as u64,
                at_least - announced,
                "a record refused as too large was read past its length prefix"
            );
        }
        Err(ControlError::Truncated { expected, got, .. }) => {
            assert!(
                got < expected,
                "truncated, but got {got} of {expected} bytes"
            );
            assert_eq!(
                sync_used,
                bytes.len(),
                "truncated before the end of the input"
            );
        }
        Err(_) => {}
    }

    let exact = decode_record_exact(bytes, count, max).map_err(|e| e.to_string());
    let want_exact = match &decoded {
        Ok((strings, used)) if *used == bytes.len() => Ok(strings.clone()),
        Ok((_, used)) => Err(ControlError::TrailingBytes {
            used: *used,
            extra: bytes.len() - used,
        }
        .to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(exact, want_exact, "decode_record_exact");
    if count == FIELDS {
        let request = Request::decode(bytes, max).map_err(|e| e.to_string());
        assert_eq!(
            request,
            want_exact.map(|s| Request::new(s[0].clone(), s[1].clone())),
            "Request::decode"
        );
    }
    outcome.map_err(|e| e.to_string())
}

/// Loads `text` as a spec with [`Spec::from_json`] and, if it is accepted, checks
/// that:
///
/// * leaf names are unique, every leaf holds at least one byte, the leaf offsets
///   and sizes tile the payload, and the payload size is their sum;
/// * the spec's JSON ([`Spec::to_json`]) loads back as the same spec;
/// * its wire form encodes to a handshake that decodes back to it under limits
///   exactly as large as it needs, and is refused as too large with one byte less
///   of payload allowed.
pub fn check_spec_json(text: &str) -> Result<Spec, SpecError> {
    let spec = Spec::from_json(text)?;
    let leaves = spec.leaves();
    assert!(!leaves.is_empty(), "accepted a spec without leaves");
    let mut names = std::collections::HashSet::new();
    let mut offset = 0usize;
    for (i, leaf) in leaves.iter().enumerate() {
        assert!(names.insert(&leaf.name), "leaf name {:?} twice", leaf.name);
        assert_eq!(
            Some(spec.leaf_bytes(i)),
            leaf.nbytes(),
            "leaf `{}`",
            leaf.name
        );
        assert!(
            spec.leaf_bytes(i) > 0,
            "leaf `{}` holds no bytes",
            leaf.name
        );
        assert_eq!(spec.leaf_offset(i), offset, "leaf `{}`", leaf.name);
        offset += spec.leaf_bytes(i);
    }
    assert_eq!(spec.payload_size(), offset);

    let json = spec.to_json().to_string();
    assert_eq!(
        Spec::from_json(&json).as_ref(),
        Ok(&spec),
        "the spec's own JSON {json}"
    );

    let wire = spec.wire();
    assert_eq!(wire.payload_size(), Some(spec.payload_size()));
    let limits = HandshakeLimits {
        max_leaves: wire.leaves.len() as u32,
        max_ndim: wire
            .leaves
            .iter()
            .map(|l| l.shape.len() as u32)
            .max()
            .unwrap_or(0),
        max_payload: spec.payload_size(),
    };
    let bytes = handshake_bytes(&wire);
    assert_eq!(
        parse_handshake(&bytes, &limits),
        Ok(Some((wire.clone(), bytes.len()))),
        "the spec's handshake under limits it just fits"
    );
    let tighter = HandshakeLimits {
        max_payload: spec.payload_size() - 1,
        ..limits
    };
    assert!(
        matches!(
            parse_handshake(&bytes, &tighter),
            Err(WireError::PayloadTooLarge { .. })
        ),
        "the spec's handshake with one byte less of payload allowed"
    );
    Ok(spec)
}

/// Runs `bytes`, what a peer sends first on a QUIC stream, through the server's
/// client hello check the way the server reads it (a growing prefix of at most
/// the hello's length, in pieces cut at `cuts`), and checks that the decision
/// is the one the bytes call for, whatever the cuts: accepted once the whole
/// hello has come, if it is the hello; refused at the first byte that differs,
/// naming the bytes received (never more than the hello's length); undecided
/// only while a correct prefix is all there is. Returns the decision.
pub fn check_client_hello(bytes: &[u8], cuts: &[usize]) -> Result<bool, WireError> {
    let want = &CLIENT_HELLO[..];
    let bad = bytes.iter().zip(want).position(|(a, b)| a != b);
    let mut got = Vec::with_capacity(want.len());
    let mut decision = Ok(false);
    for piece in pieces(bytes, cuts) {
        let room = want.len() - got.len();
        got.extend_from_slice(&piece[..piece.len().min(room)]);
        decision = check_hello(&got);
        match &decision {
            Ok(false) => assert!(
                got.len() < want.len() && bad.is_none_or(|i| i >= got.len()),
                "{} bytes {got:?} left undecided",
                got.len()
            ),
            Ok(true) => {
                assert_eq!(got, want, "accepted {got:?}");
                break;
            }
            Err(WireError::BadHello { got: named }) => {
                let i = bad.expect("refused a correct prefix");
                assert!(i < got.len(), "refused before the byte that differs");
                assert_eq!(named, &got, "the refusal names what came");
                break;
            }
            Err(e) => panic!("unexpected refusal {e}"),
        }
    }
    match bad {
        Some(i) if i < bytes.len() => assert!(decision.is_err(), "byte {i} differs: {decision:?}"),
        _ if bytes.len() >= want.len() => assert_eq!(decision, Ok(true)),
        _ => assert_eq!(decision, Ok(false)),
    }
    decision
}

/// Feeds `bytes`, what a server sends back, to a client's [`AckCounter`] in
/// pieces cut at `cuts` with `sent` payloads sent, and checks that: acks are
/// counted exactly, never past `sent` without a refusal; the first byte that is
/// not an ack is refused, naming it, unless more acks than `sent` came before
/// it (then that is refused first, or in the same piece); and all-ack streams
/// of at most `sent` bytes are counted whole. Returns the acks counted before
/// any refusal, and the refusal.
pub fn check_ack_stream(bytes: &[u8], cuts: &[usize], sent: u64) -> (u64, Option<WireError>) {
    let first_bad = bytes.iter().position(|&b| b != ACK);
    let acks_before_bad = first_bad.unwrap_or(bytes.len()) as u64;
    let mut counter = AckCounter::default();
    let mut counted = 0u64;
    for piece in pieces(bytes, cuts) {
        match counter.feed(piece, sent) {
            Ok(n) => {
                assert_eq!(n, piece.len() as u64, "a piece of acks counted in part");
                counted += n;
                assert!(counted <= sent, "{counted} acks counted with {sent} sent");
                assert_eq!(counter.acked(), counted);
            }
            Err(e) => {
                match &e {
                    WireError::UnexpectedAckByte { got } => {
                        let i = first_bad.expect("a refused byte where all were acks");
                        assert_eq!(*got, bytes[i], "the refusal names the first bad byte");
                    }
                    WireError::TooManyAcks { got, sent: s } => {
                        assert_eq!(*s, sent);
                        assert!(*got > sent, "{got} acks called too many with {sent} sent");
                        assert!(acks_before_bad > sent, "too many acks refused early");
                    }
                    other => panic!("unexpected refusal {other}"),
                }
                assert!(counted <= sent.min(acks_before_bad));
                return (counted, Some(e));
            }
        }
    }
    assert!(first_bad.is_none(), "byte {first_bad:?} was not refused");
    assert_eq!(counted, bytes.len() as u64);
    (counted, None)
}

//! Control records: fastdaemon's request/reply protocol.
//!
//! A record is a sequence of strings, each a u32 big-endian byte length then
//! that many UTF-8 bytes. A control client sends one request record
//! `[stdin, args]` (the command line's arguments joined by single spaces) and
//! the server answers with one reply record `[stdout, stderr]`, then closes.
//!
//! Everything here comes in three forms:
//!
//! * pure: [`encode_record`] / [`decode_record`] over byte buffers (also what a
//!   datagram socket carries: one record per datagram);
//! * sync, over [`std::io::Read`] / [`std::io::Write`]: [`read_record`] /
//!   [`write_record`] — no async runtime involved, so a small CLI can use them
//!   with plain std sockets;
//! * async, over tokio's `AsyncRead` / `AsyncWrite`: [`read_record_async`] /
//!   [`write_record_async`].
//!
//! Reading is bounded: a record larger than the caller's maximum is an error
//! as soon as a length prefix says so, before anything of that size is
//! allocated, and a peer that announces a large string but sends little of it
//! only costs what it sent. Invalid UTF-8 and truncation are errors, never
//! panics.
//!
//! ```
//! use echo_core::control::{decode_record, encode_record, Request};
//!
//! let bytes = encode_record(&["from fastcore.all import *", "nbprocess_clean --stdin"]).unwrap();
//! assert_eq!(&bytes[..4], b"\x00\x00\x00\x1a");
//! let (strings, used) = decode_record(&bytes, 2, 1024).unwrap();
//! assert_eq!(strings, ["from fastcore.all import *", "nbprocess_clean --stdin"]);
//! assert_eq!(used, bytes.len());
//!
//! let request = Request::new("", "stats --json");
//! let mut wire = Vec::new();
//! request.write(&mut wire).unwrap();
//! assert_eq!(Request::read(&mut &wire[..], 1024).unwrap(), request);
//! ```

use std::io::{self, Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes in a string's length prefix.
pub const LEN_PREFIX: usize = 4;

/// A default upper bound on one record's size, length prefixes included (16 MiB).
pub const DEFAULT_MAX_RECORD: usize = 16 << 20;

/// Strings in a request (`[stdin, args]`) and in a reply (`[stdout, stderr]`).
pub const FIELDS: usize = 2;

/// Why a control record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The underlying reader or writer failed.
    #[error("control record I/O: {0}")]
    Io(#[from] io::Error),
    /// The record ended early (EOF, or the end of a datagram).
    #[error(
        "control record truncated in the {} of string #{index} of {count}: expected {expected} bytes, got {got}",
        if *in_length { "length prefix" } else { "body" }
    )]
    Truncated {
        /// Which string (0-based) was being read.
        index: usize,
        /// Strings the record should hold.
        count: usize,
        /// True if the 4-byte length prefix was cut, false if the string body was.
        in_length: bool,
        /// Bytes the part needed.
        expected: usize,
        /// Bytes that came.
        got: usize,
    },
    /// A length prefix takes the record past the allowed maximum.
    #[error("control record of at least {at_least} bytes exceeds the maximum of {max} bytes (string #{index} announces {announced} bytes)")]
    TooLarge {
        /// Which string announced the length.
        index: usize,
        /// The announced length.
        announced: u64,
        /// The record's size up to and including that string.
        at_least: u64,
        /// The limit.
        max: usize,
    },
    /// A string is not valid UTF-8.
    #[error("control record string #{index} is not valid UTF-8 (valid up to byte {valid_up_to} of {len}); expected UTF-8 text")]
    Utf8 {
        /// Which string.
        index: usize,
        /// Bytes before the first invalid sequence.
        valid_up_to: usize,
        /// The string's length in bytes.
        len: usize,
    },
    /// A string too long for a u32 length prefix (encoding only).
    #[error(
        "control record string #{index} is {len} bytes; at most {} fit a u32 length prefix",
        u32::MAX
    )]
    StringTooLong {
        /// Which string.
        index: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// Bytes left over after a whole record in a buffer that should hold exactly one
    /// (a datagram).
    #[error("{extra} unexpected bytes after a complete control record of {used} bytes")]
    TrailingBytes {
        /// The record's size.
        used: usize,
        /// Bytes after it.
        extra: usize,
    },
}

impl From<ControlError> for crate::Error {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Io(e) => crate::Error::Io(e),
            other => crate::Error::Other(other.to_string()),
        }
    }
}

/// Appends the encoding of `strings` to `out`.
pub fn encode_record_into<S: AsRef<str>>(
    strings: &[S],
    out: &mut Vec<u8>,
) -> Result<(), ControlError> {
    let total: usize = strings
        .iter()
        .map(|s| LEN_PREFIX.saturating_add(s.as_ref().len()))
        .fold(0usize, usize::saturating_add);
    out.reserve(total);
    for (index, s) in strings.iter().enumerate() {
        let s = s.as_ref().as_bytes();
        let len = u32::try_from(s.len()).map_err(|_| ControlError::StringTooLong {
            index,
            len: s.len(),
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(s);
    }
    Ok(())
}

/// The encoding of `strings`: each a u32 big-endian length then its UTF-8 bytes.
pub fn encode_record<S: AsRef<str>>(strings: &[S]) -> Result<Vec<u8>, ControlError> {
    let mut out = Vec::new();
    encode_record_into(strings, &mut out)?;
    Ok(out)
}

/// Checks a length prefix against the limit; returns the record size so far.
fn admit(index: usize, so_far: u64, announced: u32, max: usize) -> Result<u64, ControlError> {
    let at_least = so_far + LEN_PREFIX as u64 + u64::from(announced);
    if at_least > max as u64 {
        return Err(ControlError::TooLarge {
            index,
            announced: u64::from(announced),
            at_least,
            max,
        });
    }
    Ok(at_least)
}

fn utf8(index: usize, bytes: Vec<u8>) -> Result<String, ControlError> {
    String::from_utf8(bytes).map_err(|e| ControlError::Utf8 {
        index,
        valid_up_to: e.utf8_error().valid_up_to(),
        len: e.as_bytes().len(),
    })
}

/// Field `index` of a record of `count` strings, for the errors that name it.
#[derive(Debug, Clone, Copy)]
struct At {
    index: usize,
    count: usize,
}

impl At {
    /// The field's length prefix ended after `got` bytes.
    fn short_prefix(self, got: usize) -> ControlError {
        ControlError::Truncated {
            index: self.index,
            count: self.count,
            in_length: true,
            expected: LEN_PREFIX,
            got,
        }
    }

    /// The field's body ended after `got` of the `expected` bytes announced.
    fn short_body(self, expected: usize, got: usize) -> ControlError {
        ControlError::Truncated {
            index: self.index,
            count: self.count,
            in_length: false,
            expected,
            got,
        }
    }

    /// The field's text from its body as read (`len` bytes announced):
    /// `Truncated` if fewer came, `Utf8` if they are not text.
    fn text(self, len: usize, body: Vec<u8>) -> Result<String, ControlError> {
        if body.len() < len {
            return Err(self.short_body(len, body.len()));
        }
        utf8(self.index, body)
    }
}

/// Decodes `count` strings from the start of `buf`, allowing at most `max` bytes in
/// the record; returns them and the bytes used. A buffer that ends early is
/// [`ControlError::Truncated`].
pub fn decode_record(
    buf: &[u8],
    count: usize,
    max: usize,
) -> Result<(Vec<String>, usize), ControlError> {
    let mut out = Vec::with_capacity(count.min(16));
    let mut pos = 0usize;
    for index in 0..count {
        let at = At { index, count };
        let rest = &buf[pos..];
        let Some(prefix) = rest.get(..LEN_PREFIX) else {
            return Err(at.short_prefix(rest.len()));
        };
        let announced = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        admit(index, pos as u64, announced, max)?;
        pos += LEN_PREFIX;
        let len = announced as usize; // <= max, so it fits
        let rest = &buf[pos..];
        let Some(body) = rest.get(..len) else {
            return Err(at.short_body(len, rest.len()));
        };
        out.push(at.text(len, body.to_vec())?);
        pos += len;
    }
    Ok((out, pos))
}

/// Like [`decode_record`], but `buf` must hold exactly one record (a datagram).
pub fn decode_record_exact(
    buf: &[u8],
    count: usize,
    max: usize,
) -> Result<Vec<String>, ControlError> {
    let (strings, used) = decode_record(buf, count, max)?;
    if used != buf.len() {
        return Err(ControlError::TrailingBytes {
            used,
            extra: buf.len() - used,
        });
    }
    Ok(strings)
}

/// Writes one record in a single `write_all`, then flushes.
pub fn write_record<W: Write + ?Sized, S: AsRef<str>>(
    w: &mut W,
    strings: &[S],
) -> Result<(), ControlError> {
    let bytes = encode_record(strings)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads into `buf` until it is full or EOF; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The first allocation for a string body: what is announced, up to this much;
/// the buffer grows as bytes actually arrive.
const INITIAL_BODY: usize = 64 << 10;

/// Reads one record of `count` strings from a blocking reader, allowing at most
/// `max` bytes in it. Reads exactly the record, nothing after it.
pub fn read_record<R: Read + ?Sized>(
    r: &mut R,
    count: usize,
    max: usize,
) -> Result<Vec<String>, ControlError> {
    let mut out = Vec::with_capacity(count.min(16));
    let mut size = 0u64;
    for index in 0..count {
        let at = At { index, count };
        let mut prefix = [0u8; LEN_PREFIX];
        let got = read_full(r, &mut prefix)?;
        if got < LEN_PREFIX {
            return Err(at.short_prefix(got));
        }
        let announced = u32::from_be_bytes(prefix);
        size = admit(index, size, announced, max)?;
        let len = announced as usize;
        let mut body = Vec::with_capacity(len.min(INITIAL_BODY));
        r.take(len as u64).read_to_end(&mut body)?;
        out.push(at.text(len, body)?);
    }
    Ok(out)
}

/// Writes one record with a single `write_all`, then flushes.
pub async fn write_record_async<W: AsyncWrite + Unpin + ?Sized, S: AsRef<str>>(
    w: &mut W,
    strings: &[S],
) -> Result<(), ControlError> {
    let bytes = encode_record(strings)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one record of `count` strings from an async reader, allowing at most
/// `max` bytes in it. Reads exactly the record, nothing after it.
pub async fn read_record_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    count: usize,
    max: usize,
) -> Result<Vec<String>, ControlError> {
    let mut out = Vec::with_capacity(count.min(16));
    let mut size = 0u64;
    for index in 0..count {
        let at = At { index, count };
        let mut prefix = [0u8; LEN_PREFIX];
        let mut got = 0;
        while got < LEN_PREFIX {
            match r.read(&mut prefix[got..]).await? {
                0 => return Err(at.short_prefix(got)),
                k => got += k,
            }
        }
        let announced = u32::from_be_bytes(prefix);
        size = admit(index, size, announced, max)?;
        let len = announced as usize;
        let mut body = Vec::with_capacity(len.min(INITIAL_BODY));
        (&mut *r).take(len as u64).read_to_end(&mut body).await?;
        out.push(at.text(len, body)?);
    }
    Ok(out)
}

/// A control request: what the client read on stdin and its arguments joined by
/// single spaces. On the wire: `[stdin, args]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The client's standard input (empty when it was a terminal).
    pub stdin: String,
    /// The command line, arguments joined by single spaces.
    pub args: String,
}

/// A control reply: text for the client's stdout and stderr. On the wire:
/// `[stdout, stderr]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// Text for the client's standard output.
    pub stdout: String,
    /// Text for the client's standard error; empty when all went well.
    pub stderr: String,
}

macro_rules! two_strings {
    ($ty:ident, $a:ident, $b:ident) => {
        impl $ty {
            /// The record's bytes.
            pub fn encode(&self) -> Result<Vec<u8>, ControlError> {
                encode_record(&[&self.$a, &self.$b])
            }

            /// Decodes a buffer that holds exactly this record (a datagram).
            pub fn decode(buf: &[u8], max: usize) -> Result<Self, ControlError> {
                Ok(Self::from_strings(decode_record_exact(buf, FIELDS, max)?))
            }

            /// Writes the record to a blocking writer and flushes.
            pub fn write<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), ControlError> {
                write_record(w, &[&self.$a, &self.$b])
            }

            /// Reads the record from a blocking reader (at most `max` bytes).
            pub fn read<R: Read + ?Sized>(r: &mut R, max: usize) -> Result<Self, ControlError> {
                Ok(Self::from_strings(read_record(r, FIELDS, max)?))
            }

            /// Writes the record to an async writer and flushes.
            pub async fn write_async<W: AsyncWrite + Unpin + ?Sized>(
                &self,
                w: &mut W,
            ) -> Result<(), ControlError> {
                write_record_async(w, &[&self.$a, &self.$b]).await
            }

            /// Reads the record from an async reader (at most `max` bytes).
            pub async fn read_async<R: AsyncRead + Unpin + ?Sized>(
                r: &mut R,
                max: usize,
            ) -> Result<Self, ControlError> {
                Ok(Self::from_strings(read_record_async(r, FIELDS, max).await?))
            }

            fn from_strings(strings: Vec<String>) -> Self {
                let mut it = strings.into_iter();
                let $a = it.next().unwrap_or_default();
                let $b = it.next().unwrap_or_default();
                $ty { $a, $b }
            }
        }
    };
}

two_strings!(Request, stdin, args);
two_strings!(Reply, stdout, stderr);

impl Request {
    /// A request with this stdin and argument line.
    pub fn new(stdin: impl Into<String>, args: impl Into<String>) -> Self {
        Request {
            stdin: stdin.into(),
            args: args.into(),
        }
    }
}

impl Reply {
    /// A successful reply: `stdout`, nothing on stderr.
    pub fn ok(stdout: impl Into<String>) -> Self {
        Reply {
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed reply: nothing on stdout, `stderr`.
    pub fn err(stderr: impl Into<String>) -> Self {
        Reply {
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VECTOR: &[u8] =
        b"\x00\x00\x00\x1afrom fastcore.all import *\x00\x00\x00\x17nbprocess_clean --stdin";

    #[test]
    fn fastdaemon_test_vector() {
        let ss = ["from fastcore.all import *", "nbprocess_clean --stdin"];
        assert_eq!(encode_record(&ss).unwrap(), VECTOR);
        let mut w = Vec::new();
        write_record(&mut w, &ss).unwrap();
        assert_eq!(w, VECTOR);
        assert_eq!(read_record(&mut &VECTOR[..], 2, 1024).unwrap(), ss);
        let (got, used) = decode_record(VECTOR, 2, 1024).unwrap();
        assert_eq!(got, ss);
        assert_eq!(used, VECTOR.len());
        let req = Request::decode(VECTOR, 1024).unwrap();
        assert_eq!(req, Request::new(ss[0], ss[1]));
        assert_eq!(req.encode().unwrap(), VECTOR);
    }

    #[tokio::test]
    async fn fastdaemon_test_vector_async() {
        let ss = ["from fastcore.all import *", "nbprocess_clean --stdin"];
        let mut w = Vec::new();
        write_record_async(&mut w, &ss).await.unwrap();
        assert_eq!(w, VECTOR);
        let got = read_record_async(&mut &VECTOR[..], 2, 1024).await.unwrap();
        assert_eq!(got, ss);
        let reply = Reply::read_async(&mut &VECTOR[..], 1024).await.unwrap();
        assert_eq!(reply.stdout, ss[0]);
        assert_eq!(reply.stderr, ss[1]);
    }

    #[test]
    fn reads_exactly_one_record() {
        let mut bytes = Request::new("a", "b").encode().unwrap();
        bytes.extend_from_slice(b"after");
        let mut r = &bytes[..];
        assert_eq!(Request::read(&mut r, 100).unwrap(), Request::new("a", "b"));
        assert_eq!(r, b"after");
        let e = Request::decode(&bytes, 100).unwrap_err();
        assert!(
            matches!(e, ControlError::TrailingBytes { used: 10, extra: 5 }),
            "{e}"
        );
    }

    /// A reader that announces a 4 GiB string and would then supply it forever,
    /// counting what is read from it.
    struct Huge {
        read: usize,
    }

    impl Read for Huge {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let prefix = [0xff, 0xff, 0xff, 0xff];
            let n = buf.len().min(4096);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = prefix.get(self.read + i).copied().unwrap_or(b'x');
            }
            self.read += n;
            Ok(n)
        }
    }

    #[test]
    fn oversized_record_is_refused_from_its_prefix() {
        let mut r = Huge { read: 0 };
        let e = read_record(&mut r, 2, 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::TooLarge {
                    index: 0,
                    announced: 0xffff_ffff,
                    max: 1048576,
                    ..
                }
            ),
            "{e}"
        );
        assert!(r.read <= 4096, "read {} bytes past the prefix", r.read);
        // The second string takes the total over the limit.
        let bytes = encode_record(&["12345", "123456"]).unwrap();
        let e = decode_record(&bytes, 2, 18).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::TooLarge {
                    index: 1,
                    at_least: 19,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("maximum of 18 bytes"), "{e}");
        assert_eq!(decode_record(&bytes, 2, 19).unwrap().1, 19);
        assert!(matches!(
            read_record(&mut &bytes[..], 2, 18),
            Err(ControlError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn oversized_record_is_refused_async() {
        let bytes = [0u8, 0, 1, 0, b'x'];
        let e = read_record_async(&mut &bytes[..], 2, 100)
            .await
            .unwrap_err();
        assert!(matches!(e, ControlError::TooLarge { announced: 256, .. }));
    }

    #[test]
    fn a_short_body_costs_only_what_came() {
        // Announces the full limit but sends 3 bytes: truncated, and the buffer
        // for it was not sized from the announcement.
        let mut bytes = (DEFAULT_MAX_RECORD as u32 - 4).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let e = read_record(&mut &bytes[..], 1, DEFAULT_MAX_RECORD).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::Truncated {
                    index: 0,
                    in_length: false,
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let bytes = [0, 0, 0, 1, b'a', 0, 0, 0, 2, 0xc3, 0x28];
        let e = decode_record(&bytes, 2, 100).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::Utf8 {
                    index: 1,
                    valid_up_to: 0,
                    len: 2
                }
            ),
            "{e}"
        );
        assert!(matches!(
            read_record(&mut &bytes[..], 2, 100),
            Err(ControlError::Utf8 { index: 1, .. })
        ));
    }

    #[test]
    fn truncation_messages_say_where() {
        let e = decode_record(&[0, 0], 2, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "control record truncated in the length prefix of string #0 of 2: expected 4 bytes, got 2"
        );
        let e = read_record(&mut &[0u8, 0, 0, 5, b'a'][..], 2, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "control record truncated in the body of string #0 of 2: expected 5 bytes, got 1"
        );
    }

    fn strings() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(any::<String>(), 0..5)
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(ss in strings()) {
            let bytes = encode_record(&ss).unwrap();
            let (got, used) = decode_record(&bytes, ss.len(), bytes.len()).unwrap();
            prop_assert_eq!(&got, &ss);
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(read_record(&mut &bytes[..], ss.len(), bytes.len()).unwrap(), ss.clone());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(read_record_async(&mut &bytes[..], ss.len(), bytes.len())).unwrap();
            prop_assert_eq!(got, ss);
        }

        #[test]
        fn any_truncation_is_an_error(ss in prop::collection::vec(any::<String>(), 1..5), cut in any::<prop::sample::Index>()) {
            let bytes = encode_record(&ss).unwrap();
            let short = &bytes[..cut.index(bytes.len())];
            let is_truncated = |r: Result<_, ControlError>| matches!(r, Err(ControlError::Truncated { .. }));
            prop_assert!(is_truncated(decode_record(short, ss.len(), usize::MAX).map(|_| ())));
            prop_assert!(is_truncated(read_record(&mut &short[..], ss.len(), usize::MAX).map(|_| ())));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            prop_assert!(is_truncated(rt.block_on(read_record_async(&mut &short[..], ss.len(), usize::MAX)).map(|_| ())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), max in 0usize..80) {
            let _ = decode_record(&bytes, 2, max);
            let _ = read_record(&mut &bytes[..], 2, max);
        }
    }
}

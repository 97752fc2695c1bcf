//! How the fuzz targets read their input: a few header bytes that choose the
//! decoder's settings and how the bytes are cut, then the bytes themselves.
//! `scripts/fuzz-seeds.py` writes seeds in these layouts; keep the two in step.
//!
//! | target | layout |
//! |---|---|
//! | `handshake` | `[limits, ncuts, cut × (ncuts % 16), stream…]` |
//! | `splitter` | `[payload_size − 1, per_chunk, nsteps, (read, flags) × (nsteps % 16), stream…]` |
//! | `control` | `[count, max, piece, record…]` |
//! | `spec_json` | the JSON text (inputs that are not UTF-8 are skipped) |
//! | `hello` | `[ncuts, cut × (ncuts % 16), first bytes…]` |
//! | `acks` | `[sent / 4, ncuts, cut × (ncuts % 16), bytes…]` |
//!
//! A missing header byte reads as 0, so every input means something.

use echo_core::control::DEFAULT_MAX_RECORD;
use echo_core::testkit::decoders::SplitStep;
use echo_core::wire::HandshakeLimits;

/// Reads header bytes off the front of an input.
#[derive(Debug)]
pub struct Header<'a> {
    rest: &'a [u8],
}

impl<'a> Header<'a> {
    /// Starts at the input's first byte.
    pub fn new(data: &'a [u8]) -> Self {
        Header { rest: data }
    }

    /// The next byte, or 0 once the input is used up.
    pub fn byte(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((&b, tail)) => {
                self.rest = tail;
                b
            }
            None => 0,
        }
    }

    /// What follows the header.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Handshake limits chosen by a byte: the defaults, small ones (so a short input
/// can reach them), tiny ones, or the largest a caller could set.
pub fn handshake_limits(b: u8) -> HandshakeLimits {
    match b % 4 {
        0 => HandshakeLimits::default(),
        1 => HandshakeLimits {
            max_leaves: 8,
            max_ndim: 4,
            max_payload: 1 << 20,
        },
        2 => HandshakeLimits {
            max_leaves: 2,
            max_ndim: 2,
            max_payload: 64,
        },
        _ => HandshakeLimits {
            max_leaves: u32::MAX,
            max_ndim: u32::MAX,
            max_payload: usize::MAX,
        },
    }
}

/// Up to 15 piece sizes: a count byte, then one byte per piece (0 reads as 1).
pub fn cuts(h: &mut Header<'_>) -> Vec<usize> {
    let n = h.byte() % 16;
    (0..n).map(|_| usize::from(h.byte())).collect()
}

/// Up to 15 splitter steps: a count byte, then two bytes per step, the read size
/// and flags (bit 0: read through `spare`/`commit`; bit 1: take after the read;
/// bits 2-7: the next buffer's length, in sixteenths of the chunk capacity).
pub fn split_steps(h: &mut Header<'_>, capacity: usize) -> Vec<SplitStep> {
    let n = h.byte() % 16;
    (0..n)
        .map(|_| {
            let read = usize::from(h.byte());
            let flags = h.byte();
            SplitStep {
                read,
                via_spare: flags & 1 != 0,
                take: flags & 2 != 0,
                next_len: usize::from(flags >> 2) * capacity / 16,
            }
        })
        .collect()
}

/// A control record's size limit chosen by a byte: 4 bytes per step up to 1012,
/// or the default (16 MiB), or no limit.
pub fn control_max(b: u8) -> usize {
    match b {
        255 => usize::MAX,
        254 => DEFAULT_MAX_RECORD,
        _ => usize::from(b) * 4,
    }
}

//! The wire v1 handshake decoder on an arbitrary server stream, fed whole and in
//! pieces: bounded buffering, a decision within the limits, the same outcome for
//! any cuts, and accepted handshakes that re-encode to their own bytes.
#![no_main]

use echo_core::testkit::decoders::check_handshake;
use echo_fuzz::{cuts, handshake_limits, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Header::new(data);
    let limits = handshake_limits(h.byte());
    let cuts = cuts(&mut h);
    let _ = check_handshake(limits, h.rest(), &cuts);
});

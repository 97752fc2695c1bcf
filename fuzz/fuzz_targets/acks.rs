//! The client's ack counter on arbitrary bytes from a server, in pieces: acks
//! counted exactly and never past what was sent without a refusal, the first
//! byte that is not an ack refused by name, whatever the cuts.
#![no_main]

use echo_core::testkit::decoders::check_ack_stream;
use echo_fuzz::{cuts, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Header::new(data);
    let sent = u64::from(h.byte()) * 4;
    let cuts = cuts(&mut h);
    let _ = check_ack_stream(h.rest(), &cuts, sent);
});

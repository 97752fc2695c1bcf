//! The server's client hello check (QUIC streams) on arbitrary first bytes, read
//! in pieces: accepted only for the hello, refused at the first wrong byte naming
//! what came, undecided only on a correct prefix, whatever the cuts.
#![no_main]

use echo_core::testkit::decoders::check_client_hello;
use echo_fuzz::{cuts, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Header::new(data);
    let cuts = cuts(&mut h);
    let _ = check_client_hello(h.rest(), &cuts);
});

//! The control-record readers (buffer, blocking and async) on arbitrary bytes:
//! they agree, read exactly one record, accept only records within the limit that
//! re-encode to their own bytes, and refuse oversized ones from the length prefix.
#![no_main]

use echo_core::testkit::decoders::check_control_record;
use echo_fuzz::{control_max, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Header::new(data);
    let count = usize::from(h.byte() % 4);
    let max = control_max(h.byte());
    let piece = usize::from(h.byte());
    let _ = check_control_record(h.rest(), count, max, piece);
});

//! The payload splitter on an arbitrary stream read in arbitrary pieces: whole
//! payloads only, and together exactly the stream's whole-payload prefix, whatever
//! the reads, the buffers handed back and the moments payloads are taken.
#![no_main]

use echo_core::testkit::decoders::check_splitter;
use echo_fuzz::{split_steps, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = Header::new(data);
    let payload_size = usize::from(h.byte()) + 1;
    let per_chunk = usize::from(h.byte() % 16) + 1;
    let steps = split_steps(&mut h, payload_size * per_chunk);
    check_splitter(payload_size, per_chunk, h.rest(), &steps);
});

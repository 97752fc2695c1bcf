//! The spec JSON loader on arbitrary text: refusals are errors, and an accepted
//! spec is consistent, reloads from its own JSON and round-trips its handshake.
#![no_main]

use echo_core::testkit::decoders::check_spec_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = check_spec_json(text) {
            assert!(!e.to_string().is_empty());
        }
    }
});

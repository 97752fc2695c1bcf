//! Hostile bytes against the pure decoders every transport relies on: the wire v1
//! handshake decoder (clients) and the control-plane record reader. Whatever
//! comes, they never panic, never buffer past their limits, and decide (a spec or
//! an error) once a limit's worth of bytes has arrived, so a peer cannot keep
//! them waiting for more.

use echo_core::control::{read_record, ControlError};
use echo_core::testkit::kit_spec;
use echo_core::wire::{handshake_bytes, Decoded, HandshakeDecoder, HandshakeLimits};
use proptest::prelude::*;

fn small_limits() -> HandshakeLimits {
    HandshakeLimits {
        max_leaves: 8,
        max_ndim: 4,
        max_payload: 1 << 20,
    }
}

/// Feeds `bytes` cut at `cuts`; returns the outcome and checks the buffer bound
/// after every piece.
fn feed_all(
    limits: HandshakeLimits,
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Decoded, echo_core::wire::WireError> {
    let mut dec = HandshakeDecoder::new(limits);
    let mut rest = bytes;
    let mut cuts = cuts.iter().cycle();
    let mut last = Decoded::NeedMore;
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap_or(&rest.len())).clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        last = dec.feed(piece)?;
        assert!(
            dec.buffered() <= limits.max_handshake_len(),
            "decoder holds {} bytes, over its limit of {}",
            dec.buffered(),
            limits.max_handshake_len()
        );
        if matches!(last, Decoded::Done { .. }) {
            break;
        }
    }
    Ok(last)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn garbage_is_decided_within_the_limit_and_never_overbuffered(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(1usize..64, 1..16),
    ) {
        let limits = small_limits();
        match feed_all(limits, &bytes, &cuts) {
            Err(_) | Ok(Decoded::Done { .. }) => {}
            Ok(Decoded::NeedMore) => prop_assert!(
                bytes.len() < limits.max_handshake_len(),
                "still waiting after {} bytes; the limit is {}",
                bytes.len(),
                limits.max_handshake_len()
            ),
        }
    }

    #[test]
    fn garbage_after_a_valid_header_is_decided_within_the_limit(
        leaves in 0u32..u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(1usize..64, 1..16),
    ) {
        // The magic and version right, then an arbitrary leaf count and bytes.
        let mut bytes = handshake_bytes(&kit_spec(64).wire())[..5].to_vec();
        bytes.extend_from_slice(&leaves.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let limits = small_limits();
        match feed_all(limits, &bytes, &cuts) {
            Err(_) => {}
            Ok(Decoded::Done { spec, .. }) => {
                prop_assert!(spec.leaves.len() <= limits.max_leaves as usize);
            }
            Ok(Decoded::NeedMore) => prop_assert!(bytes.len() < limits.max_handshake_len()),
        }
    }

    #[test]
    fn a_mutated_handshake_decodes_within_limits_or_is_refused(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cuts in prop::collection::vec(1usize..16, 1..8),
    ) {
        let mut bytes = handshake_bytes(&kit_spec(200).wire());
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let limits = small_limits();
        if let Ok(Decoded::Done { spec, .. }) = feed_all(limits, &bytes, &cuts) {
            prop_assert!(spec.leaves.len() <= limits.max_leaves as usize);
            for leaf in &spec.leaves {
                prop_assert!(leaf.shape.len() <= limits.max_ndim as usize);
            }
        }
    }

    #[test]
    fn control_records_from_arbitrary_bytes_are_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max in 0usize..256,
    ) {
        // Refusals are fine; what is accepted stays within the limit.
        if let Ok(strings) = read_record(&mut &bytes[..], 2, max) {
            prop_assert_eq!(strings.len(), 2);
            let size: usize = strings.iter().map(|s| 4 + s.len()).sum();
            prop_assert!(size <= max, "accepted {} bytes with a limit of {}", size, max);
        }
    }
}

#[test]
fn a_control_record_claiming_4_gib_is_refused_from_its_prefix() {
    // Four bytes of prefix and nothing else: refused by size, not by waiting for
    // (or allocating) 4 GiB.
    let e = read_record(&mut &[0xffu8, 0xff, 0xff, 0xff][..], 2, 1 << 20).unwrap_err();
    assert!(
        matches!(
            e,
            ControlError::TooLarge {
                announced: 0xffff_ffff,
                ..
            }
        ),
        "expected a size refusal, got {e}"
    );
    assert!(e.to_string().contains("4294967295"), "{e}");
}

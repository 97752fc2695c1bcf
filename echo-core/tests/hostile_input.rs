//! Hostile bytes against the pure decoders every transport relies on: the wire v1
//! handshake decoder (clients), the payload splitter (servers), the control-plane
//! record reader and the spec JSON loader. Whatever comes, they never panic, never
//! buffer past their limits, and decide (a spec or an error) once a limit's worth
//! of bytes has arrived, so a peer cannot keep them waiting for more.
//!
//! The properties themselves live in `echo_core::testkit::decoders`, shared with
//! the cargo-fuzz targets in `fuzz/` (see RELIABILITY.md, "Fuzzing"): here
//! proptest feeds them small structured inputs on every CI run.

use std::collections::BTreeMap;

use echo_core::control::{encode_record, read_record, ControlError};
use echo_core::spec::{DType, Spec};
use echo_core::testkit::decoders::{
    check_ack_stream, check_client_hello, check_control_record, check_handshake, check_spec_json,
    check_splitter, SplitStep,
};
use echo_core::testkit::kit_spec;
use echo_core::wire::{handshake_bytes, HandshakeLimits, CLIENT_HELLO};
use proptest::prelude::*;
use serde_json::{json, Value};

fn small_limits() -> HandshakeLimits {
    HandshakeLimits {
        max_leaves: 8,
        max_ndim: 4,
        max_payload: 1 << 20,
    }
}

fn cuts(most: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..most, 1..16)
}

/// A spec as a nested object: leaves `{"shape", "dtype"}` under keys of one to
/// three letters, up to three levels deep.
#[derive(Debug, Clone)]
enum Tree {
    Leaf(Vec<u32>, DType),
    Node(BTreeMap<String, Tree>),
}

impl Tree {
    fn to_json(&self) -> Value {
        match self {
            Tree::Leaf(shape, dtype) => json!({"shape": shape, "dtype": dtype.name()}),
            Tree::Node(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    /// The leaves in wire order (keys sorted at every level), named by path.
    fn leaves(&self, prefix: &str, out: &mut Vec<(String, Vec<u32>, DType)>) {
        match self {
            Tree::Leaf(shape, dtype) => out.push((prefix.to_string(), shape.clone(), *dtype)),
            Tree::Node(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    v.leaves(&name, out);
                }
            }
        }
    }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = (prop::collection::vec(1u32..5, 0..4), dtype()).prop_map(|(s, d)| Tree::Leaf(s, d));
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop::collection::btree_map("[a-z]{1,3}", inner, 1..4).prop_map(Tree::Node)
    })
    .prop_map(|t| match t {
        Tree::Leaf(..) => Tree::Node(BTreeMap::from([("only".to_string(), t)])),
        node => node,
    })
}

fn assert_leaves(spec: &Spec, want: &[(String, Vec<u32>, DType)]) {
    let got: Vec<_> = spec
        .leaves()
        .iter()
        .map(|l| (l.name.clone(), l.shape.clone(), l.dtype))
        .collect();
    assert_eq!(got, want);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn garbage_is_decided_within_the_limit_and_never_overbuffered(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in cuts(64),
    ) {
        let _ = check_handshake(small_limits(), &bytes, &cuts);
    }

    #[test]
    fn garbage_after_a_valid_header_is_decided_within_the_limit(
        leaves in 0u32..u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in cuts(64),
    ) {
        // The magic and version right, then an arbitrary leaf count and bytes.
        let mut bytes = handshake_bytes(&kit_spec(64).wire())[..5].to_vec();
        bytes.extend_from_slice(&leaves.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let _ = check_handshake(small_limits(), &bytes, &cuts);
    }

    #[test]
    fn a_mutated_handshake_decodes_within_limits_or_is_refused(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cuts in cuts(16),
    ) {
        let mut bytes = handshake_bytes(&kit_spec(200).wire());
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let _ = check_handshake(small_limits(), &bytes, &cuts);
    }

    #[test]
    fn client_hellos_are_decided_at_the_first_wrong_byte_for_any_cuts(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..12),
            // The hello, or a near miss: one byte changed, cut short or extended.
            (any::<prop::sample::Index>(), any::<u8>(), 0usize..8, prop::collection::vec(any::<u8>(), 0..4))
                .prop_map(|(pos, byte, keep, tail)| {
                    let mut b = CLIENT_HELLO.to_vec();
                    if byte % 3 == 0 {
                        let i = pos.index(b.len());
                        b[i] = byte;
                    }
                    b.truncate(keep.max(1));
                    b.extend(tail);
                    b
                }),
        ],
        cuts in cuts(6),
    ) {
        let _ = check_client_hello(&bytes, &cuts);
    }

    #[test]
    fn ack_streams_are_counted_exactly_or_refused_for_any_cuts(
        bytes in prop_oneof![
            prop::collection::vec(Just(1u8), 0..64),
            prop::collection::vec(prop_oneof![9 => Just(1u8), 1 => any::<u8>()], 0..64),
        ],
        cuts in cuts(16),
        sent in 0u64..80,
    ) {
        let _ = check_ack_stream(&bytes, &cuts, sent);
    }

    #[test]
    fn control_records_from_arbitrary_bytes_are_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        count in 0usize..4,
        max in 0usize..256,
        piece in 1usize..32,
    ) {
        // Refusals are fine; what is accepted stays within the limit.
        let _ = check_control_record(&bytes, count, max, piece);
    }

    #[test]
    fn valid_control_records_are_read_back_or_refused_by_size(
        strings in prop::collection::vec(any::<String>(), 0..4),
        after in prop::collection::vec(any::<u8>(), 0..8),
        max in 0usize..160,
        piece in 1usize..32,
    ) {
        let mut bytes = encode_record(&strings).unwrap();
        let size = bytes.len();
        bytes.extend_from_slice(&after);
        match check_control_record(&bytes, strings.len(), max, piece) {
            Ok((got, used)) => {
                prop_assert!(size <= max);
                prop_assert_eq!(got, strings);
                prop_assert_eq!(used, size);
            }
            Err(e) => {
                prop_assert!(size > max, "refused a {}-byte record under a {}-byte limit: {}", size, max, e);
                prop_assert!(e.contains("exceeds the maximum"), "{}", e);
            }
        }
    }

    #[test]
    fn payloads_come_out_whole_for_any_reads_and_buffers(
        payload_size in 1usize..48,
        per_chunk in 1usize..6,
        stream in prop::collection::vec(any::<u8>(), 0..1024),
        steps in prop::collection::vec(
            (0usize..160, any::<bool>(), any::<bool>(), 0usize..400)
                .prop_map(|(read, via_spare, take, next_len)| SplitStep { read, via_spare, take, next_len }),
            0..12,
        ),
    ) {
        let n = check_splitter(payload_size, per_chunk, &stream, &steps);
        prop_assert_eq!(n, stream.len() / payload_size);
    }

    #[test]
    fn spec_json_in_both_forms_loads_in_wire_order(tree in tree()) {
        let mut want = Vec::new();
        tree.leaves("", &mut want);
        let nested = tree.to_json().to_string();
        let spec = check_spec_json(&nested).unwrap_or_else(|e| panic!("{e}: {nested}"));
        assert_leaves(&spec, &want);
        // The list form, in reverse: its order is kept as given.
        want.reverse();
        let list: Vec<Value> = want
            .iter()
            .map(|(name, shape, dtype)| json!({"name": name, "shape": shape, "dtype": dtype.name()}))
            .collect();
        let list = Value::Array(list).to_string();
        let spec = check_spec_json(&list).unwrap_or_else(|e| panic!("{e}: {list}"));
        assert_leaves(&spec, &want);
    }

    #[test]
    fn mutated_spec_json_is_loaded_consistently_or_refused(
        tree in tree(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut text: Vec<char> = tree.to_json().to_string().chars().collect();
        for (at, c) in edits {
            let i = at.index(text.len());
            text[i] = c;
        }
        if truncate {
            text.truncate(cut.index(text.len()));
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = check_spec_json(&text) {
            prop_assert!(!e.to_string().is_empty());
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

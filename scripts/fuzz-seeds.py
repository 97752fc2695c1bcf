#!/usr/bin/env python3
"""Writes seed inputs for the cargo-fuzz targets into fuzz/seeds/<target>/.

Valid handshakes, payload streams, control records, client hellos, ack streams
and spec JSON in both forms (plus a few near misses), each behind the header
bytes the target reads first.
The layouts are documented in fuzz/src/lib.rs; keep the two in step.

Usage: python3 scripts/fuzz-seeds.py [OUT_DIR]   (default: fuzz/seeds)
"""

import hashlib
import json
import struct
import sys
from pathlib import Path

ITEMSIZE = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
}

# Specs as (name, shape, dtype) leaves in wire order (names sorted, so the nested
# form flattens to the same order).
SPECS = [
    [("data", [64], "uint8")],
    [("check", [], "uint64"), ("data", [48], "uint8"), ("meta", [2], "uint32")],
    [("act", [6], "int64"), ("done", [], "bool"), ("obs", [4, 84, 84], "uint8"),
     ("reward", [], "float32")],
    [("a", [2, 3], "float32"), ("b", [], "uint8")],
    [("x", [1, 1, 1, 1], "complex128"), ("y", [3], "float16"), ("z", [2, 2], "int16")],
    [("obs.agent", [4], "float16"), ("obs.image", [2, 3], "uint8"), ("reward", [], "float32")],
]


def handshake(spec):
    out = b"ECHO\x01" + struct.pack("<I", len(spec))
    for _, shape, dtype in spec:
        out += struct.pack("<II", ITEMSIZE[dtype], len(shape))
        out += b"".join(struct.pack("<I", d) for d in shape)
    return out


def cuts_header(cuts):
    return bytes([len(cuts)] + list(cuts))


def record(*strings):
    out = b""
    for s in strings:
        b = s.encode() if isinstance(s, str) else s
        out += struct.pack(">I", len(b)) + b
    return out


def list_form(spec):
    return [{"name": n, "shape": s, "dtype": d} for n, s, d in spec]


def nested_form(spec):
    root = {}
    for name, shape, dtype in spec:
        node = root
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = {"shape": shape, "dtype": dtype}
    return root


def seeds():
    hs = {}
    for i, spec in enumerate(SPECS):
        body = handshake(spec)
        for limits in range(3):
            hs[f"spec{i}-limits{limits}"] = bytes([limits]) + cuts_header([]) + body
        hs[f"spec{i}-cut"] = bytes([1]) + cuts_header([1, 3, 7]) + body + b"\x01\x02\x03"
        hs[f"spec{i}-truncated"] = bytes([1]) + cuts_header([5]) + body[:-3]
    hs["http"] = bytes([0]) + cuts_header([]) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    hs["version2"] = bytes([0]) + cuts_header([]) + b"ECHO\x02" + struct.pack("<I", 1)
    hs["many-leaves"] = bytes([1]) + cuts_header([]) + b"ECHO\x01" + struct.pack("<I", 0xFFFFFFFF)
    hs["zero-dim"] = bytes([1]) + cuts_header([]) + b"ECHO\x01" + struct.pack("<IIII", 1, 4, 1, 0)

    split = {}
    for ps, per_chunk, steps in [
        (1, 1, []),
        (8, 4, [(3, 0b01), (5, 0b11)]),
        (20, 2, [(7, 0b10), (64, 0b01 | (8 << 2))]),
        (64, 3, [(100, 0b11 | (20 << 2)), (1, 0b00)]),
        (256, 16, [(255, 0b01), (200, 0b11 | (63 << 2))]),
    ]:
        stream = bytes((i * 7 + i // ps) & 0xFF for i in range(ps * 5 + ps // 2))
        head = bytes([ps - 1, per_chunk - 1, len(steps)])
        head += b"".join(bytes([r, f]) for r, f in steps)
        split[f"ps{ps}-per{per_chunk}-steps{len(steps)}"] = head + stream

    ctl = {}
    vector = record("from fastcore.all import *", "nbprocess_clean --stdin")
    for name, count, max_byte, piece, body in [
        ("fastdaemon", 2, 254, 0, vector),
        ("fastdaemon-trickle", 2, 100, 3, vector),
        ("fastdaemon-tight", 2, 14, 7, vector),
        ("stats", 2, 255, 1, record("", "stats --json")),
        ("reply", 2, 254, 16, record('{"batches": 3}\n', "")),
        ("unicode", 2, 254, 2, record("héllo → wörld ✓", "args 🎉")),
        ("one", 1, 254, 0, record("solo")),
        ("three", 3, 254, 5, record("a", "bb", "ccc")),
        ("none-trailing", 0, 254, 0, b"xyz"),
        ("trailing", 2, 254, 0, vector + b"after"),
        ("huge", 2, 254, 0, b"\xff\xff\xff\xff"),
        ("truncated", 2, 254, 4, vector[:-5]),
        ("bad-utf8", 2, 254, 0, record("a", b"\xc3\x28")),
    ]:
        ctl[name] = bytes([count, max_byte, piece]) + body

    js = {}
    for i, spec in enumerate(SPECS):
        js[f"spec{i}-list"] = json.dumps(list_form(spec))
        js[f"spec{i}-nested"] = json.dumps(nested_form(spec), indent=1)
    js["unnamed"] = '[{"shape": [3], "dtype": "int32"}, {"shape": [1e0], "dtype": "uint8"}]'
    js["dim-too-large"] = '{"x": {"shape": [4294967296], "dtype": "uint8"}}'
    js["overflow"] = '{"x": {"shape": [4294967295, 4294967295, 4294967295], "dtype": "float64"}}'
    js["deep"] = '{"a":' * 70 + '{"shape": [1], "dtype": "uint8"}' + "}" * 70
    js["duplicate"] = '[{"name": "a", "shape": [1], "dtype": "uint8"}, {"name": "a", "shape": [1], "dtype": "uint8"}]'

    hello = {
        "whole": bytes([0]) + b"ECHO\x01",
        "bytewise": bytes([5, 1, 1, 1, 1, 1]) + b"ECHO\x01",
        "then-data": bytes([2, 3, 9]) + b"ECHO\x01" + bytes(16),
        "short": bytes([0]) + b"ECH",
        "wrong-version": bytes([0]) + b"ECHO\x02",
        "http": bytes([0]) + b"GET / HTTP/1.1\r\n",
    }

    acks = {
        "all": bytes([8, 0]) + b"\x01" * 32,
        "pieces": bytes([8, 3, 1, 5, 2]) + b"\x01" * 30,
        "too-many": bytes([2, 0]) + b"\x01" * 9,
        "bad-byte": bytes([8, 2, 4, 4]) + b"\x01" * 5 + b"\x02" + b"\x01" * 3,
        "none-sent": bytes([0, 0]) + b"\x01",
    }

    return {
        "handshake": hs,
        "hello": hello,
        "acks": acks,
        "splitter": split,
        "control": ctl,
        "spec_json": {k: v.encode() for k, v in js.items()},
    }


def main():
    root = Path(__file__).resolve().parent.parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "fuzz" / "seeds"
    total = 0
    for target, files in seeds().items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            digest = hashlib.sha1(data).hexdigest()[:12]
            (d / f"{name}-{digest}").write_bytes(data)
            total += 1
    print(f"wrote {total} seeds under {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

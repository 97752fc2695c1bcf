#!/usr/bin/env python3
"""Interop driver for echo's Rust integration tests, built on id-echo 0.2.1.

Runs id-echo's own TcpClient / Server (installed from PyPI by
scripts/setup-python.sh) with deterministic samples, so the Rust side can
check its TCP transport byte for byte against the reference implementation.

Spec file (--spec): a nested JSON object whose leaves are
``{"shape": [..], "dtype": "<numpy dtype name>"}``. It becomes a pytree of
nested dicts of numpy arrays; optree flattens dicts with keys sorted at
every level (code-point order == UTF-8 byte order) and that flatten order is
the wire order. A payload is the leaves' bytes (native little-endian)
concatenated in that order.

Sample i of client C: ``numpy.random.default_rng(seed=C*1_000_003 + i)``;
for each leaf in flatten order draw ``rng.integers(0, 256, size=nbytes,
dtype=np.uint8)`` and view it as the leaf dtype (bool leaves: ``bytes & 1``).
A top-level leaf "meta" of dtype int32 and shape [2] is then set to [C, i].

Subcommands (exit codes: 0 ok, 1 check failed / no error raised,
2 timeout, 3 unexpected exception, 64 bad command line):
  describe           leaf paths, offsets, payload size, handshake bytes (JSON)
  gen                write the deterministic payloads to --out, no network
  send               send N samples with id-echo's TcpClient; log payloads
  send-expect-error  like send, but an exception is the expected outcome
  serve              id-echo Server on TcpTransport(port); check batches
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optree

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_EXCEPTION = 3
EXIT_USAGE = 64

SEED_STRIDE = 1_000_003

DTYPES = (
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
    "complex64", "complex128",
)

if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
    raise SystemExit("echo_interop.py assumes a little-endian host")


# --------------------------------------------------------------------------
# Spec handling
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset of this leaf inside one payload

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Spec:
    """A parsed spec: the example pytree plus its flattened leaf layout."""

    def __init__(self, tree_json: Any, source: str = "<spec>"):
        if not isinstance(tree_json, dict):
            raise ValueError(f"{source}: spec must be a JSON object, got {type(tree_json).__name__}")
        self.example = _build_example(tree_json, ())
        paths, leaves, self.treespec = optree.tree_flatten_with_path(self.example)
        if not leaves:
            raise ValueError(f"{source}: spec has no leaves")
        self.leaves: list[Leaf] = []
        off = 0
        for p, arr in zip(paths, leaves):
            leaf = Leaf(tuple(str(k) for k in p), arr.dtype, tuple(arr.shape), off)
            off += leaf.nbytes
            self.leaves.append(leaf)
        self.payload_size = off
        meta = tree_json.get("meta")
        self.meta_index = None
        if _is_leaf(meta) and meta["dtype"] == "int32" and list(meta["shape"]) == [2]:
            self.meta_index = next(i for i, l in enumerate(self.leaves) if l.path == ("meta",))

    @classmethod
    def load(cls, path: str) -> "Spec":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f), source=path)

    def handshake(self) -> bytes:
        """The bytes an id-echo server sends on accept for this spec."""
        out = [b"ECHO", bytes([1]), struct.pack("<I", len(self.leaves))]
        for l in self.leaves:
            out.append(struct.pack("<II", l.dtype.itemsize, len(l.shape)))
            out.append(struct.pack(f"<{len(l.shape)}I", *l.shape))
        return b"".join(out)

    def unflatten(self, arrays: list[np.ndarray]) -> Any:
        return optree.tree_unflatten(self.treespec, arrays)

    def sample(self, client_id: int, index: int) -> tuple[Any, bytes]:
        """Deterministic sample `index` of client `client_id`: (pytree, payload bytes)."""
        seed = client_id * SEED_STRIDE + index
        if seed < 0:
            raise ValueError(f"seed {seed} < 0: client id and sample index must be >= 0")
        rng = np.random.default_rng(seed=seed)
        arrays = []
        for l in self.leaves:
            raw = rng.integers(0, 256, size=l.nbytes, dtype=np.uint8)
            if l.dtype == np.bool_:
                raw = raw & 1
            arrays.append(raw.view(l.dtype).reshape(l.shape))
        if self.meta_index is not None:
            arrays[self.meta_index] = np.array([client_id, index], dtype=np.int32)
        payload = b"".join(a.tobytes() for a in arrays)  # exactly what TcpClient sends
        assert len(payload) == self.payload_size
        return self.unflatten(arrays), payload


def _is_leaf(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"shape", "dtype"}


def _build_example(node: Any, path: tuple[str, ...]) -> Any:
    where = ".".join(path) or "<root>"
    if _is_leaf(node):
        dtype, shape = node["dtype"], node["shape"]
        if dtype not in DTYPES:
            raise ValueError(f"leaf {where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"leaf {where}: shape must be a list of non-negative integers, got {shape!r}")
        return np.zeros(tuple(shape), dtype=np.dtype(dtype))
    if isinstance(node, dict):
        if not node:
            raise ValueError(f"node {where}: empty object (neither a leaf nor a subtree with leaves)")
        return {k: _build_example(v, path + (k,)) for k, v in node.items()}
    raise ValueError(f"node {where}: expected an object (subtree or {{\"shape\", \"dtype\"}} leaf), got {node!r}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _watchdog(seconds: float, what: str, on_fire=None) -> threading.Timer:
    """Exit with EXIT_TIMEOUT if still running after `seconds`.

    `on_fire` gets a chance to unblock the main thread first (e.g. close the
    server); the process is hard-exited 5 s later regardless, since id-echo
    calls can block forever (TcpClient.wait()/send() on a dead peer).
    """

    def fire():
        print(f"TIMEOUT after {seconds:g} s: {what()}", file=sys.stderr, flush=True)
        if on_fire is not None:
            try:
                on_fire()
            except Exception:
                pass
            time.sleep(5)
        sys.stdout.flush()
        os._exit(EXIT_TIMEOUT)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def _open_out(path: str | None, append: bool):
    if path is None:
        return None
    return open(path, "ab" if append else "wb")


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def cmd_describe(args) -> int:
    spec = Spec.load(args.spec)
    info = {
        "payload_size": spec.payload_size,
        "num_leaves": len(spec.leaves),
        "meta_index": spec.meta_index,
        "leaves": [
            {
                "path": list(l.path),
                "dtype": l.dtype.name,
                "itemsize": l.dtype.itemsize,
                "shape": list(l.shape),
                "offset": l.offset,
                "nbytes": l.nbytes,
            }
            for l in spec.leaves
        ],
        "handshake_hex": spec.handshake().hex(),
    }
    print(json.dumps(info, indent=2))
    return EXIT_OK


def cmd_gen(args) -> int:
    spec = Spec.load(args.spec)
    with _open_out(args.out, args.append) as out:
        for i in range(args.samples):
            out.write(spec.sample(args.client_id, i)[1])
    print(f"GEN {args.samples} samples x {spec.payload_size} bytes")
    return EXIT_OK


def cmd_send(args) -> int:
    from echo import TcpClient

    spec = Spec.load(args.spec)
    state = {"sent": 0, "phase": "connect"}
    _watchdog(args.timeout, lambda: f"send stuck in {state['phase']} after {state['sent']} samples sent")
    out = _open_out(args.out, args.append)
    try:
        client = TcpClient(args.host, args.port, spec.example, max_inflight_msgs=args.max_inflight)
        try:
            state["phase"] = "send"
            for i in range(args.samples):
                tree, payload = spec.sample(args.client_id, i)
                client.send(tree)
                state["sent"] += 1
                if out is not None:
                    out.write(payload)
                    out.flush()
            state["phase"] = "wait"
            client.wait()
        finally:
            state["phase"] = "close"
            client.close()
    except Exception as e:
        print(f"ERROR {_oneline(e)}", file=sys.stderr, flush=True)
        print(f"SENT {state['sent']}", flush=True)
        return EXIT_EXCEPTION
    finally:
        if out is not None:
            out.close()
    print(f"SENT {state['sent']}", flush=True)
    return EXIT_OK


def cmd_send_expect_error(args) -> int:
    from echo import TcpClient

    spec = Spec.load(args.spec)
    state = {"sent": 0, "phase": "connect"}
    # Timeout covers connect + the N samples + the paced keep-sending phase.
    _watchdog(
        args.timeout + args.keep_sending,
        lambda: f"send-expect-error stuck in {state['phase']} after {state['sent']} samples sent (no exception)",
    )
    out = _open_out(args.out, args.append)
    client = None
    try:
        client = TcpClient(args.host, args.port, spec.example, max_inflight_msgs=args.max_inflight)
        state["phase"] = "send"
        i = 0
        deadline = None
        while True:
            if i >= args.samples:
                # Past N: keep going slowly until the peer's departure shows up.
                if deadline is None:
                    deadline = time.monotonic() + args.keep_sending
                if time.monotonic() >= deadline:
                    break
                time.sleep(args.interval)
            tree, payload = spec.sample(args.client_id, i)
            client.send(tree)
            state["sent"] += 1
            i += 1
            if out is not None:
                out.write(payload)
                out.flush()
    except Exception as e:
        print(f"SENT {state['sent']}", flush=True)
        print(f"RAISED {_oneline(e)}", flush=True)
        return EXIT_OK
    finally:
        if client is not None:
            client.close()
        if out is not None:
            out.close()
    print(f"SENT {state['sent']}", flush=True)
    print(f"NO_ERROR after {state['sent']} samples", flush=True)
    return EXIT_CHECK_FAILED


def cmd_serve(args) -> int:
    from echo import Server, TcpTransport

    spec = Spec.load(args.spec)
    B = args.batch_size
    expect = None
    if args.expect is not None:
        with open(args.expect, "rb") as f:
            expect = f.read()
        if len(expect) % spec.payload_size:
            print(f"FAIL expect file {args.expect}: {len(expect)} bytes is not a multiple of "
                  f"payload size {spec.payload_size}", flush=True)
            return EXIT_CHECK_FAILED
    n_expect = None if expect is None else len(expect) // spec.payload_size
    K = args.batches
    if K is None:
        if n_expect is None or n_expect % B:
            held = "" if n_expect is None else f" ({args.expect} holds {n_expect} samples)"
            print(f"FAIL --batches is required unless --expect holds a multiple of --batch-size {B} samples{held}",
                  flush=True)
            return EXIT_CHECK_FAILED
        K = n_expect // B

    server = Server(
        spec.example,
        batch_size=B,
        transport=TcpTransport(args.port, args.num_threads),
        num_buffers=args.num_buffers,
        producer_queue_size=args.producer_queue_size,
    )
    got_batches: list[list[np.ndarray]] = []  # per batch: flat leaves, copied
    timed_out = threading.Event()

    def on_timeout():
        timed_out.set()
        server.close()  # makes a blocked sample() return None

    wd = None
    try:
        server.start()
        print(f"PORT {server.port}", flush=True)
        wd = _watchdog(args.timeout, lambda: f"received {len(got_batches)} of {K} batches", on_timeout)
        while len(got_batches) < K:
            s = server.sample()
            if s is None:
                break
            # Views into the ring: copy before the next sample() reuses them.
            got_batches.append([np.array(a, copy=True) for a in optree.tree_leaves(s.batch)])
    finally:
        server.close()
    if timed_out.is_set() or len(got_batches) < K:
        print(f"TIMEOUT received {len(got_batches)} of {K} batches", flush=True)
        sys.stdout.flush()
        os._exit(EXIT_TIMEOUT)
    wd.cancel()

    n = K * B
    # Received samples as rows of payload bytes, arrival order.
    got = np.empty((n, spec.payload_size), dtype=np.uint8)
    for li, l in enumerate(spec.leaves):
        col = np.concatenate([b[li].reshape(B, -1).view(np.uint8).reshape(B, l.nbytes) for b in got_batches]) \
            if l.nbytes else np.empty((n, 0), np.uint8)
        got[:, l.offset:l.offset + l.nbytes] = col
    if args.dump is not None:
        with open(args.dump, "wb") as f:
            f.write(got.tobytes())
    if expect is None:
        print(f"OK {n} samples (not checked)", flush=True)
        return EXIT_OK
    exp = np.frombuffer(expect, dtype=np.uint8).reshape(n_expect, spec.payload_size)
    return _compare(spec, got, exp, args.order)


def _meta_of(spec: Spec, row: np.ndarray):
    if spec.meta_index is None:
        return None
    l = spec.leaves[spec.meta_index]
    return row[l.offset:l.offset + 8].view(np.int32).tolist()


def _compare(spec: Spec, got: np.ndarray, exp: np.ndarray, order: str) -> int:
    n = len(got)
    if len(exp) != n:
        print(f"FAIL count: received {n} samples, expect file holds {len(exp)}", flush=True)
        return EXIT_CHECK_FAILED
    if order == "any":
        key = lambda a: sorted(range(len(a)), key=lambda r: a[r].tobytes())
        got, exp = got[key(got)], exp[key(exp)]
    elif order == "per-client":
        if spec.meta_index is None:
            print("FAIL --order per-client needs a top-level int32[2] 'meta' leaf", flush=True)
            return EXIT_CHECK_FAILED
        off = spec.leaves[spec.meta_index].offset
        cid = lambda a: a[:, off:off + 4].copy().view(np.int32)[:, 0]
        # Stable sort by client id keeps each client's own order.
        got = got[np.argsort(cid(got), kind="stable")]
        exp = exp[np.argsort(cid(exp), kind="stable")]
    bad = np.flatnonzero(np.any(got != exp, axis=1)) if spec.payload_size else np.array([], int)
    if len(bad) == 0:
        print(f"OK {n} samples", flush=True)
        return EXIT_OK
    i = int(bad[0])
    leaves = [l for l in spec.leaves if np.any(got[i, l.offset:l.offset + l.nbytes] != exp[i, l.offset:l.offset + l.nbytes])]
    l = leaves[0]
    g = got[i, l.offset:l.offset + l.nbytes].tobytes()
    e = exp[i, l.offset:l.offset + l.nbytes].tobytes()
    print(f"FAIL {len(bad)} of {n} samples differ (order={order}); first at sample {i}, "
          f"leaves {[x.name for x in leaves]}", flush=True)
    print(f"  leaf {l.name} ({l.dtype.name}{list(l.shape)}): expected {e[:32].hex()}"
          f"{'...' if len(e) > 32 else ''} got {g[:32].hex()}{'...' if len(g) > 32 else ''}", flush=True)
    if spec.meta_index is not None:
        print(f"  meta [client, seq]: expected {_meta_of(spec, exp[i])} got {_meta_of(spec, got[i])}", flush=True)
    return EXIT_CHECK_FAILED


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 64, not 2 (2 means timeout here)
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _at_least_2(s: str) -> int:
    v = int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (id-echo panics otherwise), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="echo_interop.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("describe", help="print leaf layout, payload size and handshake bytes as JSON")
    d.add_argument("--spec", required=True)
    d.set_defaults(func=cmd_describe)

    g = sub.add_parser("gen", help="write deterministic payloads without sending")
    g.add_argument("--spec", required=True)
    g.add_argument("--client-id", type=_nonneg_int, required=True)
    g.add_argument("--samples", type=_nonneg_int, required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--append", action="store_true", help="append to --out instead of truncating")
    g.set_defaults(func=cmd_gen)

    for name, func, hlp in (
        ("send", cmd_send, "send N samples with id-echo's TcpClient, then wait() and close()"),
        ("send-expect-error", cmd_send_expect_error, "send until id-echo's TcpClient raises; exit 0 if it did"),
    ):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--spec", required=True)
        s.add_argument("--samples", type=_nonneg_int, required=True)
        s.add_argument("--client-id", type=_nonneg_int, required=True)
        s.add_argument("--out", help="raw payloads actually sent, in send order")
        s.add_argument("--append", action="store_true", help="append to --out instead of truncating")
        s.add_argument("--max-inflight", type=_pos_int, default=32, help="TcpClient max_inflight_msgs (default 32)")
        s.add_argument("--timeout", type=float, default=60.0, help="give up (exit 2) after this many seconds")
        if name == "send-expect-error":
            s.add_argument("--keep-sending", type=float, default=20.0,
                           help="after the N samples, keep sending for up to this many seconds (default 20; 0 = stop)")
            s.add_argument("--interval", type=float, default=0.01,
                           help="sleep between sends in the keep-sending phase (default 0.01 s)")
        s.set_defaults(func=func)

    v = sub.add_parser("serve", help="run id-echo's Server, receive K batches, compare with --expect")
    v.add_argument("--spec", required=True)
    v.add_argument("--batch-size", type=_pos_int, required=True)
    v.add_argument("--batches", type=_pos_int, help="batches to receive (default: samples in --expect / batch size)")
    v.add_argument("--expect", help="raw concatenated payloads expected, in arrival order")
    v.add_argument("--order", choices=("exact", "per-client", "any"), default="exact",
                   help="exact: arrival order == file order (one client); per-client: each client's order "
                        "(grouped by meta[0]); any: as multisets")
    v.add_argument("--dump", help="write received payloads (arrival order) here")
    v.add_argument("--port", type=int, default=0, help="TCP port (default 0 = ephemeral; id-echo binds 0.0.0.0)")
    v.add_argument("--num-threads", type=_pos_int, default=8, help="TcpTransport num_threads (default 8)")
    v.add_argument("--num-buffers", type=_at_least_2, default=3, help="Server num_buffers (>= 2, default 3)")
    v.add_argument("--producer-queue-size", type=_pos_int, default=8, help="Server producer_queue_size (default 8)")
    v.add_argument("--timeout", type=float, default=60.0, help="exit 2 if not done after this many seconds")
    v.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # includes pyo3's PanicException from id-echo
        print(f"ERROR {_oneline(e)}", file=sys.stderr, flush=True)
        return EXIT_EXCEPTION


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)

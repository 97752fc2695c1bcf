#!/usr/bin/env python3
"""id-echo (PyPI id-echo 0.2.1) side of echo-tcp's benchmark
(`cargo run --release -p echo-tcp --example bench_tcp`).

  serve   id-echo's own Server on TcpTransport(port=0): prints `PORT <p>`,
          consumes batches as fast as it can (no copy) until stdin closes,
          then prints `SAMPLES <n>` (samples in full batches consumed).
  client  id-echo's Python TcpClient against any wire v1 server: sends the same
          pre-built sample for --seconds after a short warm-up, wait()s for
          every ack, prints `RESULT samples=<n> secs=<t>`.

Sample layout for a payload of P bytes (P a multiple of 4, >= 8), the same
spec the Rust side builds: {"obs": float32[P/4 - 1], "reward": float32[]}.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np


def example(payload: int) -> dict:
    if payload % 4 or payload < 8:
        raise SystemExit(f"--payload must be a multiple of 4 and >= 8, got {payload}")
    return {
        "obs": np.arange(payload // 4 - 1, dtype=np.float32),
        "reward": np.array(1.0, dtype=np.float32),
    }


def serve(args) -> int:
    from echo import Server, TcpTransport

    server = Server(example(args.payload), batch_size=args.batch_size, transport=TcpTransport(0))
    server.start()
    print(f"PORT {server.port}", flush=True)

    def stop_on_stdin_eof():
        sys.stdin.read()
        server.close()

    threading.Thread(target=stop_on_stdin_eof, daemon=True).start()
    n = 0
    while server.sample() is not None:
        n += args.batch_size
    print(f"SAMPLES {n}", flush=True)
    return 0


def client(args) -> int:
    from echo import TcpClient

    tree = example(args.payload)
    c = TcpClient(args.host, args.port, tree, max_inflight_msgs=args.max_inflight)
    warm_until = time.perf_counter() + args.warmup
    while time.perf_counter() < warm_until:
        for _ in range(64):
            c.send(tree)
    c.wait()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    while time.perf_counter() < deadline:
        for _ in range(16):
            c.send(tree)
        n += 16
    c.wait()
    dt = time.perf_counter() - t0
    c.close()
    print(f"RESULT samples={n} secs={dt:.6f}", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="id-echo Server sink")
    s.add_argument("--payload", type=int, required=True, help="bytes per sample")
    s.add_argument("--batch-size", type=int, required=True)
    s.set_defaults(func=serve)
    c = sub.add_parser("client", help="id-echo TcpClient load")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--payload", type=int, required=True, help="bytes per sample")
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--warmup", type=float, default=0.3)
    c.add_argument("--max-inflight", type=int, default=32)
    c.set_defaults(func=client)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

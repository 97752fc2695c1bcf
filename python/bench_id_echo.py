#!/usr/bin/env python3
"""Reference throughput: id-echo 0.2.1 TcpClient -> id-echo Server over TCP.

One client process sends the same pre-built sample as fast as it can for
--seconds, then wait()s for all acks; a separate server process (this script
with --role server) consumes batches without copying. Prints one result line:

  RESULT payload=<bytes>B max_inflight=<k> batch=<b> samples=<n> secs=<t>
         samples_per_s=<x> MiB_per_s=<y> server_samples=<m>

Samples: payload 20 -> {"obs": f32[4], "reward": f32[1]} (id-echo README's
example); any other size P (multiple of 4, >= 8) -> {"obs": f32[P/4-1],
"reward": f32[1]}.

  .venv/bin/python python/bench_id_echo.py --payload 20 --seconds 5
  .venv/bin/python python/bench_id_echo.py --payload 16384 --seconds 5

--raw replaces TcpClient by a plain socket that writes --chunk payloads per
sendall() and keeps at most --max-inflight unacked: an upper bound for what
the id-echo *server* ingests when the Python client is not the bottleneck.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np


def example(payload: int) -> dict:
    if payload % 4 or payload < 8:
        raise SystemExit("--payload must be a multiple of 4 and >= 8")
    return {
        "obs": np.arange(payload // 4 - 1, dtype=np.float32),
        "reward": np.array([1.0], dtype=np.float32),
    }


def run_server(args) -> int:
    from echo import Server, TcpTransport

    server = Server(example(args.payload), batch_size=args.batch_size, transport=TcpTransport(0))
    server.start()
    print(f"PORT {server.port}", flush=True)
    n = 0
    try:
        # Consume until the client side tells us to stop (stdin closes).
        import threading

        def stop_on_stdin_eof():
            sys.stdin.read()
            server.close()

        threading.Thread(target=stop_on_stdin_eof, daemon=True).start()
        while (s := server.sample()) is not None:
            n += args.batch_size
    finally:
        server.close()
    print(f"SERVER_SAMPLES {n}", flush=True)
    return 0


class RawClient:
    """Minimal wire-v1 sender: checks the handshake, sends payloads in chunks."""

    def __init__(self, port: int, tree: dict, max_inflight: int, chunk: int):
        import socket
        import struct
        import threading

        import optree

        leaves = optree.tree_leaves(tree)
        self.payload = b"".join(l.tobytes() for l in leaves)
        self.chunk = chunk
        self.window = max(max_inflight, chunk)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        want = b"ECHO\x01" + struct.pack("<I", len(leaves)) + b"".join(
            struct.pack("<II", l.dtype.itemsize, l.ndim) + struct.pack(f"<{l.ndim}I", *l.shape) for l in leaves)
        got = b""
        while len(got) < len(want):
            d = self.sock.recv(len(want) - len(got))
            assert d, "EOF during handshake"
            got += d
        assert got == want, f"handshake {got.hex()} != {want.hex()}"
        self.sent = 0
        self.acked = 0
        self.cv = threading.Condition()
        threading.Thread(target=self._acks, daemon=True).start()

    def _acks(self):
        while True:
            d = self.sock.recv(65536)
            if not d:
                return
            assert d.count(1) == len(d), f"non-ack bytes from server: {d[:16].hex()}"
            with self.cv:
                self.acked += len(d)
                self.cv.notify_all()

    def send_chunk(self):
        with self.cv:
            self.cv.wait_for(lambda: self.sent - self.acked + self.chunk <= self.window)
        self.sock.sendall(self.payload * self.chunk)
        self.sent += self.chunk

    def wait(self):
        with self.cv:
            self.cv.wait_for(lambda: self.acked == self.sent)

    def close(self):
        self.sock.close()


def run_client(args) -> int:
    from echo import TcpClient

    srv = subprocess.Popen(
        [sys.executable, __file__, "--role", "server", "--payload", str(args.payload),
         "--batch-size", str(args.batch_size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = srv.stdout.readline().split()
        assert line and line[0] == "PORT", f"server said {line!r}"
        port = int(line[1])
        tree = example(args.payload)
        if args.raw:
            client = RawClient(port, tree, args.max_inflight, args.chunk)
            step, send = args.chunk, client.send_chunk
        else:
            client = TcpClient("127.0.0.1", port, tree, max_inflight_msgs=args.max_inflight)
            step = 256

            def send():
                for _ in range(256):
                    client.send(tree)
        # Warm up briefly, then measure.
        for _ in range(max(1, 1024 // step)):
            send()
        client.wait()
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        while True:
            send()
            n += step
            if time.perf_counter() >= deadline:
                break
        client.wait()
        dt = time.perf_counter() - t0
        client.close()
    finally:
        srv.stdin.close()
        out = srv.stdout.read()
        srv.wait(timeout=30)
    server_samples = next((l.split()[1] for l in out.splitlines() if l.startswith("SERVER_SAMPLES")), "?")
    print(
        f"RESULT {'raw-socket chunk=' + str(args.chunk) if args.raw else 'TcpClient'} payload={args.payload}B max_inflight={args.max_inflight} batch={args.batch_size} "
        f"samples={n} secs={dt:.2f} samples_per_s={n / dt:,.0f} "
        f"MiB_per_s={n * args.payload / dt / 2**20:,.1f} server_samples={server_samples}",
        flush=True,
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("client", "server"), default="client")
    p.add_argument("--payload", type=int, default=20, help="bytes per sample (default 20)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-inflight", type=int, default=32, help="TcpClient max_inflight_msgs (default 32)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--raw", action="store_true", help="plain-socket sender instead of TcpClient")
    p.add_argument("--chunk", type=int, default=64, help="--raw: payloads per sendall (default 64)")
    args = p.parse_args()
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())

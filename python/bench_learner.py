#!/usr/bin/env python3
"""The learner side from Python: id-echo's Server against echo_rs.Server.

The same Python learner loop takes batches from each server in turn, in this
process; the same load (N client processes, each an echo_rs.Client on tcp://
sending one pre-built payload with 32 unacknowledged for --seconds) feeds both.
Reports samples/s taken by the learner, and this process's CPU (server and
learner together) per sample, median of --reps interleaved runs.

    bash scripts/setup-python.sh
    VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release -m echo-py/Cargo.toml
    .venv/bin/python python/bench_learner.py            # about 1 minute
    .venv/bin/python python/bench_learner.py --quick    # smoke run

It refuses a debug build of echo_rs (what the tests install) unless
--allow-debug is given.

The learner touches every batch (the first element of each leaf), as a real one
would read it, and keeps no reference to it once the next one is taken.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def example(size):
    """{"obs": float32[size/4 - 1], "reward": float32[]}: `size` bytes, as bench_tcp."""
    return {"obs": np.zeros(size // 4 - 1, np.float32), "reward": np.zeros((), np.float32)}


def spec(size):
    return [("obs", [size // 4 - 1], "float32"), ("reward", [], "float32")]


def client_main(port, size, seconds):
    """One load process: sends until the deadline, waits for every ack."""
    import echo_rs._native as native

    c = native.Client(f"tcp://127.0.0.1:{port}", spec(size), max_inflight=32)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        c.send(payload)
        sent += 1
    c.wait()
    c.close()
    print(sent)


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(kind, size, clients, seconds, batch):
    ex = example(size)
    if kind == "id-echo":
        from echo import Server, TcpTransport

        server = Server(ex, batch_size=batch, transport=TcpTransport(0))
        server.start()
    else:
        import echo_rs

        server = echo_rs.Server(ex, batch_size=batch, listen=["tcp://127.0.0.1:0"])
    # The same two calls on both servers.
    port, take = server.port, server.sample
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", str(port), str(size), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    sent = []

    def stop_when_done():
        for p in procs:
            out, _ = p.communicate()
            sent.append(int(out.strip() or 0))
        server.close()

    stopper = threading.Thread(target=stop_when_done)
    stopper.start()
    # Measure from the first batch to the last taken before the clients stop.
    taken, first, last, cpu0, cpu1, n_at_last = 0, None, None, None, None, 0
    checksum = 0.0
    end = None
    while True:
        s = take()
        if s is None:
            break
        now = time.monotonic()
        b = s.batch
        checksum += float(b["obs"][0, 0]) + float(b["reward"][0])
        n = len(b["reward"])
        del s, b
        if first is None:
            first, cpu0, end = now, cpu(), now + seconds - 0.3
            continue
        taken += n
        if now <= end:
            last, cpu1, n_at_last = now, cpu(), taken
    # Not left running into the interpreter's exit (a thread inside the
    # extension then cannot take the GIL back).
    stopper.join()
    if last is None or n_at_last == 0:
        raise SystemExit(f"{kind} {size} B: too few batches to measure")
    rate = n_at_last / (last - first)
    cpu_us = (cpu1 - cpu0) / n_at_last * 1e6
    return rate, cpu_us, sum(sent), checksum


def fmt_rate(r):
    return f"{r / 1e6:.2f} M/s" if r >= 1e6 else f"{r / 1e3:.1f} k/s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,16384,1048576")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one short run per cell")
    p.add_argument("--allow-debug", action="store_true", help="measure a debug build of echo_rs anyway")
    p.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        port, size, seconds = args.client
        client_main(int(port), int(size), float(seconds))
        return
    import echo_rs._native as native

    if native.DEBUG_BUILD and not args.allow_debug:
        raise SystemExit(
            "echo_rs is a debug build; install a release one first: "
            "VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release -m echo-py/Cargo.toml"
        )
    if args.quick:
        args.reps, args.seconds = 1, 1.0
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = ["id-echo", "echo_rs"]
    print(
        f"Python learner loop, {args.clients} echo_rs.Client processes on tcp:// (max_inflight 32), "
        f"{args.seconds} s per run, median of {args.reps} interleaved run(s); "
        f"CPU: this process (server + learner) per sample. {os.cpu_count()} CPUs"
        f"{'; echo_rs DEBUG build' if native.DEBUG_BUILD else ''}."
    )
    print()
    print("| sample | id-echo Server | CPU µs/sample | echo_rs.Server | CPU µs/sample | echo_rs / id-echo |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        batch = 8 if size >= 1 << 20 else 256
        results = {k: [] for k in kinds}
        for _ in range(args.reps):
            for k in kinds:
                rate, cpu_us, sent, _ = run(k, size, args.clients, args.seconds, batch)
                results[k].append((rate, cpu_us))
                print(f"  {k} {size} B: {fmt_rate(rate)}, {cpu_us:.2f} µs/sample, {sent} sent", file=sys.stderr)
        med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in results.items()}
        label = f"{size} B" if size < 1024 else (f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB")
        a, b = med["id-echo"], med["echo_rs"]
        print(
            f"| {label} | {fmt_rate(a[0])} | {a[1]:.2f} | {fmt_rate(b[0])} | {b[1]:.2f} | {b[0] / a[0]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: wall time of one control round trip, process start to exit.

Starts echo-server (--listen mem://ctl-bench --control 0, plus a Unix control
socket), then times N runs of each client process asking `health`:

  echo-ctl PORT health              (Rust, std networking)
  echo-ctl PATH health              (same, Unix socket)
  python ctl_client.py PORT health  (Python, standard library only)
  python -c pass                    (the interpreter's own start-up)
  /bin/true                         (the cost of spawning any process from here)

Runs are interleaved so machine noise hits every client alike. Each run is
timed from just before spawn to just after exit (subprocess.run), and its
output checked. Prints mean / p50 / p90 / min in milliseconds as Markdown.

    cargo build --release -p echo-ctl --bin echo-ctl && cargo build --release --bin echo-server
    python3 python/ctl_bench.py --bin-dir target/release --runs 300
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def start_server(server_bin, tmp):
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
        f.write('{"obs": {"shape": [4], "dtype": "float32"}}')
    sock = os.path.join(tmp, "ctl.sock")
    # Two servers: one with a TCP control port, one with a Unix control socket.
    procs, addrs = [], []
    for control in ("0", sock):
        p = subprocess.Popen(
            [server_bin, "--spec", spec, "--listen", f"mem://ctl-bench-{len(procs)}", "--control", control],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 30
        while True:
            line = p.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise SystemExit(f"echo-server exited or hung before printing its control line")
            if line.startswith("control "):
                addrs.append(line.split(" ", 1)[1].strip())
                break
        procs.append(p)
    return procs, addrs


def timed(cmd, expect):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or (expect is not None and r.stdout != expect):
        raise SystemExit(f"{cmd}: status {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}")
    return dt


def summary(xs):
    xs = sorted(xs)
    ms = lambda v: v * 1e3
    return (ms(statistics.fmean(xs)), ms(xs[len(xs) // 2]), ms(xs[int(len(xs) * 0.9)]), ms(xs[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", required=True, help="directory holding release echo-server and echo-ctl")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--python", default=sys.executable, help="interpreter for the Python client")
    a = ap.parse_args()
    server_bin = os.path.join(a.bin_dir, "echo-server")
    ctl_bin = os.path.join(a.bin_dir, "echo-ctl")
    client_py = os.path.join(HERE, "ctl_client.py")
    with tempfile.TemporaryDirectory() as tmp:
        procs, (port, path) = start_server(server_bin, tmp)
        try:
            cases = {
                f"echo-ctl PORT health (TCP)": [ctl_bin, port, "health"],
                f"echo-ctl PATH health (Unix)": [ctl_bin, path, "health"],
                f"python ctl_client.py PORT health (TCP)": [a.python, client_py, port, "health"],
                "python -c pass (interpreter start)": [a.python, "-c", "pass"],
                "/bin/true (spawn floor)": ["/bin/true"],
            }
            times = {k: [] for k in cases}
            for _ in range(10):  # warm-up: page cache, server paths
                for k, cmd in cases.items():
                    timed(cmd, b"ok\n" if "health" in cmd else None)
            for _ in range(a.runs):
                for k, cmd in cases.items():
                    times[k].append(timed(cmd, b"ok\n" if "health" in cmd else None))
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
    print(f"runs per client: {a.runs}; python: {a.python} ({sys.version.split()[0]})\n")
    print("| client | mean ms | p50 ms | p90 ms | min ms |")
    print("|---|---|---|---|---|")
    rows = {k: summary(v) for k, v in times.items()}
    for k, (mean, p50, p90, mn) in rows.items():
        print(f"| `{k}` | {mean:.2f} | {p50:.2f} | {p90:.2f} | {mn:.2f} |")
    rust = rows["echo-ctl PORT health (TCP)"]
    py = rows["python ctl_client.py PORT health (TCP)"]
    print(f"\nPython / echo-ctl (TCP): {py[0] / rust[0]:.1f}x by mean, {py[1] / rust[1]:.1f}x by p50")


if __name__ == "__main__":
    main()

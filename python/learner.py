#!/usr/bin/env python3
"""A learner in Python on echo_rs: serves one or more URLs, takes whole batches
of rollout steps as numpy arrays (views into echo's ring, no copy) and prints
metrics per batch. The Python twin of examples/learner.rs.

    .venv/bin/python python/learner.py --listen quic://127.0.0.1:4433 --batches 100
    .venv/bin/python python/actor.py --url 'quic://127.0.0.1:4433?ca=...' --actors 4 --steps 6400

(the learner prints the URL to give the actors: for QUIC it names the server's
self-signed certificate). id-echo's own actors reach a tcp:// listener:
`python/actor.py --port N` without --url.

Every step is checked: leaves "actor" and "step" (python/actor.py fills them)
must name each actor's steps once each, and at the end 0..k-1 with no gap,
which catches a lost or repeated sample (in any order, so actors may spread
steps over several QUIC streams).

Options: --listen URL (repeatable; default tcp://127.0.0.1:5555), --spec FILE
(default examples/rl_spec.json), --batch-size N, --batches N (close after N,
then take what the actors had sent), --print-every N. Ctrl-C closes the same
way. Exit status 0, or 1 if a step was missing or repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from actor import DEFAULT_SPEC, build_example  # noqa: E402  (same directory)

import echo_rs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", action="append", help="URL to serve (repeatable)")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, help="close after this many batches")
    p.add_argument("--print-every", type=int, default=1)
    args = p.parse_args()
    listen = args.listen or ["tcp://127.0.0.1:5555"]

    example = build_example(json.loads(args.spec.read_text()))
    server = echo_rs.Server(example, batch_size=args.batch_size, listen=listen)
    for url in server.urls:
        print(f"listening on {url}", flush=True)

    seen: dict[int, set[int]] = {}
    bad = 0
    batches = samples = 0
    started = last_t = time.perf_counter()
    last_n = 0
    closing = False
    try:
        while True:
            try:
                sample = server.sample()
            except KeyboardInterrupt:
                if closing:
                    raise
                print("Ctrl-C: closing, taking what the actors had sent", flush=True)
                server.close()
                closing = True
                continue
            if sample is None:
                break
            b = sample.batch
            n = len(b["step"])
            for actor, step in zip(b["actor"].tolist(), b["step"].tolist()):
                steps = seen.setdefault(actor, set())
                if step in steps:
                    bad += 1
                steps.add(step)
            mean_reward = float(np.mean(b["reward"]))
            episodes = int(np.count_nonzero(b["done"]))
            batches += 1
            samples += n
            if batches % args.print_every == 0 or n < args.batch_size:
                now = time.perf_counter()
                rate = (samples - last_n) / max(now - last_t, 1e-9)
                m = sample.info
                print(
                    f"batch {batches:>5}  {n:>4} samples  {rate:>9.0f} samples/s  "
                    f"connections {m['active_connections']}  store {m['store_size']}  "
                    f"mean reward {mean_reward:.3f}  episodes ended {episodes}",
                    flush=True,
                )
                last_t, last_n = now, samples
            del sample, b  # hands the slots back to the ring
            if args.batches is not None and batches >= args.batches and not closing:
                server.close()
                closing = True
    finally:
        server.close()
    for actor, steps in sorted(seen.items()):
        if len(steps) != max(steps) + 1:
            print(f"actor {actor}: steps missing below {max(steps)}", file=sys.stderr)
            bad += 1
    secs = time.perf_counter() - started
    per = ", ".join(f"{k} {t['samples']} samples" for k, t in server.metrics()["transports"].items())
    print(f"done: {batches} batches, {samples} samples in {secs:.1f} s; {per}; problems: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

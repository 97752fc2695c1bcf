#!/usr/bin/env python3
"""Rollout actors for examples/learner.rs (or python/learner.py), using id-echo's
own Python TcpClient, or with --url echo_rs.Client on any transport.

Each actor (a thread with its own TcpClient connection) plays a toy episodic
environment and sends one rollout step per call: a pytree of numpy arrays
built from the spec file the learner uses (examples/rl_spec.json by default).
Then it waits for every step to be acknowledged and closes.

    .venv/bin/python python/actor.py --host 127.0.0.1 --port 5555 --actors 4 --steps 6400
    .venv/bin/python python/actor.py --url 'quic://127.0.0.1:4433?ca=CERT' --actors 4 --steps 6400

Spec file: a nested JSON object whose leaves are {"shape": [...], "dtype": "..."}.
optree flattens dicts with keys sorted, which is the order the Rust spec uses.

What a step holds (so a learner or a test can check it): leaf "actor" = the
actor's index, "step" = the step's index, "action" = step % n_actions (n_actions
= the last dimension of "policy.logits", else 6), "reward" = step / 100,
"done" = (step % EPISODE == EPISODE - 1); every element of any other leaf is
(actor + step) % 100 (bool leaves: odd or not). Leaves a spec lacks are skipped.

Exit codes: 0 all steps sent and acknowledged; 1 the learner went away or
refused us (spec mismatch, connection refused or closed); 2 timed out waiting
for acknowledgements; 64 bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from echo import ConnectionClosedError, TcpClient

EPISODE = 100
DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "examples" / "rl_spec.json"


def build_example(spec: Any, path: str = "") -> Any:
    """Nested dict of zero arrays following the spec's structure."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec at {path or '<root>'}: expected an object, got {type(spec).__name__}")
    if "shape" in spec and "dtype" in spec:
        return np.zeros(spec["shape"], dtype=np.dtype(spec["dtype"]))
    return {k: build_example(v, f"{path}.{k}" if path else k) for k, v in spec.items()}


def leaves(tree: Any, path: str = ""):
    """(dotted path, array) for every leaf, in place (no copies)."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from leaves(tree[k], f"{path}.{k}" if path else k)
    else:
        yield path, tree


class Actor(threading.Thread):
    def __init__(self, index: int, args: argparse.Namespace, spec: Any):
        super().__init__(name=f"actor-{index}", daemon=True)
        self.index = index
        self.args = args
        self.step_tree = build_example(spec)
        self.sent = 0
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self.client: Any = None  # TcpClient, or echo_rs.Client with --url
        logits = dict(leaves(self.step_tree)).get("policy.logits")
        self.n_actions = int(logits.shape[-1]) if logits is not None and logits.ndim else 6

    def fill(self, step: int) -> None:
        for path, arr in leaves(self.step_tree):
            if path == "actor":
                arr[...] = self.index
            elif path == "step":
                arr[...] = step
            elif path == "action":
                arr[...] = step % self.n_actions
            elif path == "reward":
                arr[...] = step / 100
            elif path == "done":
                arr[...] = step % EPISODE == EPISODE - 1
            elif arr.dtype == np.bool_:
                arr[...] = (self.index + step) % 2 == 1
            else:  # observations, policy outputs: a cheap stand-in
                arr[...] = (self.index + step) % 100

    def run(self) -> None:
        start = time.perf_counter()
        try:
            if self.args.url:
                import echo_rs  # built into the venv by scripts/test-python-binding.sh

                self.client = echo_rs.Client(self.args.url, self.step_tree, max_inflight=self.args.max_inflight)
            else:
                self.client = TcpClient(
                    self.args.host, self.args.port, self.step_tree, max_inflight_msgs=self.args.max_inflight
                )
            for step in range(self.args.steps):
                self.fill(step)
                self.client.send(self.step_tree)
                self.sent += 1
            self.client.wait()
        except BaseException as e:  # reported by main()
            self.error = e
        finally:
            self.elapsed = time.perf_counter() - start
            if self.client is not None:
                self.client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--url", help="any echo URL (tcp://, unix://, grpc(s)://, quic://...): echo_rs.Client instead of id-echo's")
    p.add_argument("--actors", type=int, default=4, help="concurrent actors, one connection each")
    p.add_argument("--steps", type=int, default=6400, help="steps per actor")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="spec JSON (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for all acks")
    args = p.parse_args()
    if args.actors < 1 or args.steps < 0 or args.max_inflight < 1:
        p.error("--actors and --max-inflight must be >= 1, --steps >= 0")

    spec = json.loads(args.spec.read_text())
    actors = [Actor(i, args, spec) for i in range(args.actors)]
    payload = sum(a.nbytes for _, a in leaves(actors[0].step_tree))
    target = args.url or f"{args.host}:{args.port}"
    print(f"{args.actors} actors x {args.steps} steps of {payload} bytes to {target}", flush=True)
    start = time.perf_counter()
    for a in actors:
        a.start()
    deadline = start + args.timeout
    for a in actors:
        a.join(max(0.0, deadline - time.perf_counter()))
    elapsed = time.perf_counter() - start

    if any(a.is_alive() for a in actors):
        # id-echo's wait() blocks forever if the learner stops acknowledging.
        stuck = [a.index for a in actors if a.is_alive()]
        print(f"timed out after {args.timeout:.0f} s waiting for actors {stuck}", file=sys.stderr)
        return 2
    failed = False
    for a in actors:
        if a.error is not None:
            failed = True
            closed = isinstance(a.error, ConnectionClosedError) or type(a.error).__name__ == "ConnectionClosedError"
            kind = "learner went away" if closed else type(a.error).__name__
            print(f"actor {a.index}: {kind} after {a.sent} steps: {a.error}", file=sys.stderr)
        else:
            print(f"actor {a.index}: {a.sent} steps in {a.elapsed:.2f} s ({a.sent / max(a.elapsed, 1e-9):.0f} steps/s)")
    total = sum(a.sent for a in actors)
    print(
        f"total: {total} steps, {total * payload / 1e6:.1f} MB in {elapsed:.2f} s "
        f"({total / max(elapsed, 1e-9):.0f} steps/s, {total * payload / 1e6 / max(elapsed, 1e-9):.1f} MB/s)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

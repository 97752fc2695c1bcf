"""Tests of the echo_rs Python package against real peers.

Run by scripts/test-python-binding.sh (which builds the module into the
project's venv first): id-echo's own TcpClient from PyPI, the gRPC client in
python/grpc_client.py and echo_rs.Client (QUIC, Unix sockets) send to an
echo_rs.Server, and echo_rs.Client sends to id-echo's own Server; every sample
must come out of the batches exactly once, byte for byte, in the example's
pytree shape.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import numpy as np
import optree

import echo_rs
from echo import TcpClient  # id-echo, the reference client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Several dtypes and shapes, a nested dict and a scalar: optree flattens the
# keys sorted (act, obs.image, obs.vec, reward), as id-echo's client does.
EXAMPLE = {
    "obs": {"vec": np.zeros(5, np.float32), "image": np.zeros((2, 3), np.uint8)},
    "act": np.zeros(2, np.int64),
    "reward": np.zeros((), np.float32),
}


def make(client, seq):
    """Client `client`'s sample `seq`: every leaf encodes both numbers."""
    return {
        "obs": {
            "vec": np.arange(5, dtype=np.float32) + client * 1000 + seq,
            "image": np.full((2, 3), (client * 31 + seq) % 256, np.uint8),
        },
        "act": np.array([client, seq], np.int64),
        "reward": np.array(seq / 2, np.float32),
    }


def check_batch(test, batch, n, view=True):
    """Checks shapes and dtypes, and that views of the ring are read-only;
    returns the (client, seq) pairs after checking each sample's every leaf
    against what was sent."""
    test.assertEqual(batch["obs"]["vec"].shape, (n, 5))
    test.assertEqual(batch["obs"]["image"].shape, (n, 2, 3))
    test.assertEqual(batch["obs"]["image"].dtype, np.uint8)
    test.assertEqual(batch["act"].shape, (n, 2))
    test.assertEqual(batch["reward"].shape, (n,))
    if view:
        test.assertFalse(batch["act"].flags.writeable)
    seen = []
    for k in range(n):
        client, seq = (int(v) for v in batch["act"][k])
        want = make(client, seq)
        got = optree.tree_map(lambda a: a[k], batch)
        for w, g in zip(optree.tree_leaves(want), optree.tree_leaves(got)):
            np.testing.assert_array_equal(g, w)
        seen.append((client, seq))
    return seen


def send(port, client, count, errors):
    try:
        c = TcpClient("127.0.0.1", port, data_sample=EXAMPLE, max_inflight_msgs=16)
        for seq in range(count):
            c.send(make(client, seq))
        c.wait()
        c.close()
    except Exception as e:  # reported by the test thread
        errors.append(f"client {client}: {e!r}")


class TcpFromIdEcho(unittest.TestCase):
    def test_every_sample_arrives_once_in_its_pytree_shape(self):
        per_client, total = 192, 3 * 192  # 36 whole batches of 16
        with echo_rs.Server(EXAMPLE, batch_size=16, listen=["tcp://127.0.0.1:0"]) as server:
            self.assertTrue(server.urls[0].startswith("tcp://127.0.0.1:"))
            errors = []
            clients = [
                threading.Thread(target=send, args=(server.port, c, per_client, errors)) for c in range(3)
            ]
            for t in clients:
                t.start()
            seen = []
            while len(seen) < total:
                self.assertEqual(errors, [])
                sample = server.sample(timeout=30)
                self.assertIsNotNone(sample)
                seen += check_batch(self, sample.batch, 16)
            for t in clients:
                t.join(30)
            self.assertEqual(errors, [])
            self.assertEqual(sorted(seen), [(c, s) for c in range(3) for s in range(per_client)])
            # Per client, in the order sent (one connection each).
            for c in range(3):
                self.assertEqual([s for cc, s in seen if cc == c], list(range(per_client)))
            self.assertEqual(sample.info["samples_inserted_total"], total)
            self.assertEqual(server.metrics()["transports"]["tcp"]["samples"], total)

    def test_a_client_with_another_spec_is_refused_and_others_go_on(self):
        with echo_rs.Server(EXAMPLE, batch_size=4, listen=["tcp://127.0.0.1:0"]) as server:
            other = dict(EXAMPLE, act=np.zeros(3, np.int64))
            with self.assertRaisesRegex(ValueError, "spec mismatch"):
                c = TcpClient("127.0.0.1", server.port, data_sample=other)
                c.send(other)
                c.wait()
            errors = []
            send(server.port, 7, 8, errors)
            self.assertEqual(errors, [])
            got = []
            for _ in range(2):
                got += check_batch(self, server.sample(timeout=30).batch, 4)
            self.assertEqual(got, [(7, s) for s in range(8)])


class Batches(unittest.TestCase):
    def test_arrays_point_into_the_ring_and_hold_their_slots(self):
        # Two batches in the ring: while the learner holds batch 0's arrays,
        # writers fill batch 1 and then must wait; batch 0 stays as it was.
        server = echo_rs.Server(EXAMPLE, batch_size=4, num_buffers=2)
        for seq in range(4):
            server.submit(make(1, seq))
        first = server.sample(timeout=10)
        before = optree.tree_map(np.array, first.batch)
        # The arrays are views of the batch's leaf buffers, not copies.
        base = first.batch["obs"]["vec"]
        while base is not None and not isinstance(base, echo_rs._native.LeafBuffer):
            base = getattr(base, "base", None)
        self.assertIsNotNone(base, "the array is not a view of the batch's leaf buffer")
        self.assertEqual(len(base), 4 * 5 * 4)  # batch x vec x float32

        done = threading.Event()

        def writer():
            for seq in range(4, 12):
                server.submit(make(1, seq))
            done.set()

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        # Batch 1 fills; the next four samples have nowhere to go while batch 0 is held.
        self.assertFalse(done.wait(0.5), "a writer went past a batch the learner still holds")
        for held, copied in zip(optree.tree_leaves(first.batch), optree.tree_leaves(before)):
            np.testing.assert_array_equal(held, copied)
        self.assertEqual(check_batch(self, first.batch, 4), [(1, s) for s in range(4)])
        # Every reference to the batch's arrays goes, the loop variable too.
        del first, base, held
        second = server.sample(timeout=10)
        self.assertEqual(check_batch(self, second.batch, 4), [(1, s) for s in range(4, 8)])
        del second
        self.assertTrue(done.wait(10), "dropping the batches did not free their slots")
        t.join(10)
        third = server.sample(timeout=10)
        self.assertEqual(check_batch(self, third.batch, 4), [(1, s) for s in range(8, 12)])
        del third
        server.close()

    def test_close_hands_out_the_rest_then_none(self):
        server = echo_rs.Server(EXAMPLE, batch_size=4)
        for seq in range(6):
            server.submit(make(2, seq))
        self.assertEqual(check_batch(self, server.sample(timeout=10).batch, 4), [(2, s) for s in range(4)])
        server.close()
        server.close()  # idempotent
        last = server.sample(timeout=10)
        self.assertEqual(check_batch(self, last.batch, 2), [(2, 4), (2, 5)])
        self.assertIsNone(server.sample(timeout=10))
        self.assertEqual(list(server.dataset_iter()), [])

    def test_dataset_iter_copies_when_asked(self):
        server = echo_rs.Server(EXAMPLE, batch_size=2, num_buffers=3)
        for seq in range(6):
            server.submit(make(3, seq))
        server.close()
        kept = [s.batch for s in server.dataset_iter(copy=True)]
        self.assertEqual(len(kept), 3)
        self.assertTrue(kept[0]["act"].flags.writeable)
        got = [p for b in kept for p in check_batch(self, b, 2, view=False)]
        self.assertEqual(got, [(3, s) for s in range(6)])

    def test_bad_configuration_and_input_are_clear_errors(self):
        with self.assertRaisesRegex(ValueError, "dtype .* is not supported; expected one of"):
            echo_rs.Server({"s": np.zeros(2, "U3")}, batch_size=2)
        with self.assertRaisesRegex(TypeError, "leaf 'x.0': expected a numpy array, got int"):
            echo_rs.Server({"x": [1, 2]}, batch_size=2)
        with self.assertRaisesRegex(ValueError, "no transport registered for scheme \"bogus\""):
            echo_rs.Server(EXAMPLE, batch_size=2, listen=["bogus://x"])
        with self.assertRaisesRegex(TypeError, "list of URLs"):
            echo_rs.Server(EXAMPLE, batch_size=2, listen="tcp://127.0.0.1:0")
        server = echo_rs.Server(EXAMPLE, batch_size=2)
        with self.assertRaisesRegex(ValueError, "leaf 'act': expected int64 of shape \\(2,\\), got int64 of shape \\(3,\\)"):
            server.submit(dict(make(0, 0), act=np.zeros(3, np.int64)))
        with self.assertRaises(TimeoutError):
            server.sample(timeout=0.1)
        with self.assertRaisesRegex(ValueError, "timeout must be"):
            server.sample(timeout=-1)
        server.close()


def finishes(test, fn, secs=30):
    """Runs `fn` in a thread; fails if it has not returned within `secs`."""
    errors = []

    def run():
        try:
            fn()
        except Exception as e:
            errors.append(repr(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(secs)
    test.assertFalse(t.is_alive(), f"{fn.__name__} did not return within {secs} s")
    test.assertEqual(errors, [])


class Shutdown(unittest.TestCase):
    def test_close_then_sample_to_the_end_delivers_every_acknowledged_sample(self):
        # The ring (11 batches of 4) holds all 42; the client waits for every
        # ack before the learner takes anything, then the learner closes.
        server = echo_rs.Server(EXAMPLE, batch_size=4, num_buffers=11, listen=["tcp://127.0.0.1:0"])
        errors = []
        send(server.port, 4, 42, errors)
        self.assertEqual(errors, [])
        server.close()
        seen, sizes = [], []
        while (sample := server.sample(timeout=30)) is not None:
            n = len(sample.batch["reward"])
            sizes.append(n)
            seen += check_batch(self, sample.batch, n)
        self.assertEqual(seen, [(4, s) for s in range(42)])
        self.assertEqual(sizes[-1], 2)  # the partial last batch

    def test_leaving_the_with_block_while_clients_send_into_a_full_ring_returns(self):
        server = echo_rs.Server(EXAMPLE, batch_size=4, num_buffers=2, listen=["tcp://127.0.0.1:0"])
        port = server.port

        ended = []

        # (id-echo's TcpClient would wait forever here: once its window is
        # full, a sender waits for acks that its reader, having seen the
        # connection end, no longer counts.)
        def flood():
            try:
                c = echo_rs.Client(f"tcp://127.0.0.1:{port}", EXAMPLE)
                for seq in range(100_000):
                    c.send(make(6, seq))
            except echo_rs.ConnectionClosedError as e:
                ended.append(e)  # the server went away, as it should

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()

        def learner():
            with server:
                self.assertIsNotNone(server.sample(timeout=30))
                while server.metrics()["push_blocked_count"] == 0:
                    time.sleep(0.01)
                # Leaves with the ring full and the client still sending.

        finishes(self, learner)
        sender.join(30)
        self.assertFalse(sender.is_alive(), "the client was not told the server left")
        self.assertEqual(len(ended), 1)

    def test_dropping_a_server_with_a_full_ring_does_not_hang(self):
        self.drop_with_a_full_ring(close_first=False)

    def test_dropping_a_closed_server_that_was_not_drained_does_not_hang(self):
        self.drop_with_a_full_ring(close_first=True)

    def drop_with_a_full_ring(self, close_first):
        server = echo_rs.Server(EXAMPLE, batch_size=2, num_buffers=2, listen=["tcp://127.0.0.1:0"])
        for seq in range(4):
            server.submit(make(1, seq))
        # A client's sample waits in its queue for ring space (acknowledged).
        errors = []
        send(server.port, 2, 1, errors)
        self.assertEqual(errors, [])
        if close_first:
            server.close()  # a shutdown that waits for the ring to drain

        def drop():
            nonlocal server
            server = None
            gc.collect()

        finishes(self, drop)


class Pytrees(unittest.TestCase):
    def test_names_that_join_alike_and_the_port_of_the_tcp_listener(self):
        example = {"a.b": np.zeros(1, np.int8), "a": {"b": np.zeros(2, np.int8)}}
        with echo_rs.Server(example, batch_size=1, listen=["quic://127.0.0.1:0", "tcp://127.0.0.1:0"]) as server:
            self.assertEqual(server.port, int(server.urls[1].rsplit(":", 1)[1]))
            server.submit({"a.b": np.ones(1, np.int8), "a": {"b": np.full(2, 2, np.int8)}})
            batch = server.sample(timeout=10).batch
            np.testing.assert_array_equal(batch["a"]["b"], [[2, 2]])
            np.testing.assert_array_equal(batch["a.b"], [[1]])
            del batch

    def test_a_sample_of_another_structure_is_refused(self):
        server = echo_rs.Server(EXAMPLE, batch_size=2)
        renamed = {"obs": make(0, 0)["obs"], "action": np.zeros(2, np.int64), "reward": np.zeros((), np.float32)}
        with self.assertRaisesRegex(ValueError, "expected a sample shaped like"):
            server.submit(renamed)
        server.close()


class Clients(unittest.TestCase):
    def receive(self, server, n):
        """The (client, seq) pairs of `n` samples in whole batches."""
        seen = []
        while len(seen) < n:
            seen += check_batch(self, server.sample(timeout=30).batch, server.batch_size)
        return seen

    def test_quic_with_streams_and_unix_clients_deliver_every_sample(self):
        with tempfile.TemporaryDirectory() as d:
            listen = ["quic://127.0.0.1:0", f"unix://{d}/s.sock"]
            # Room in the ring for all 80 samples: they are all acknowledged
            # before the first batch is taken.
            with echo_rs.Server(EXAMPLE, batch_size=8, num_buffers=10, listen=listen) as server:
                quic_url, unix_url = server.urls
                self.assertIn("ca=", quic_url)  # the server's self-signed certificate
                with echo_rs.Client(quic_url + "&streams=3", EXAMPLE, max_inflight=8) as quic, \
                        echo_rs.Client(unix_url, EXAMPLE) as unix:
                    for seq in range(40):
                        quic.send(make(1, seq))
                        unix.send(make(2, seq))
                    quic.wait()
                    unix.wait()
                    self.assertEqual((quic.sent, quic.acked, unix.sent, unix.acked), (40, 40, 40, 40))
                seen = self.receive(server, 80)
                self.assertEqual(sorted(seen), [(c, s) for c in (1, 2) for s in range(40)])
                # One stream keeps order; three streams need not.
                self.assertEqual([s for c, s in seen if c == 2], list(range(40)))
                metrics = server.metrics()["transports"]
                self.assertEqual((metrics["quic"]["samples"], metrics["unix"]["samples"]), (40, 40))

    def test_our_client_speaks_id_echos_wire_to_its_server(self):
        from echo import Server as IdEchoServer, TcpTransport

        reference = IdEchoServer(EXAMPLE, batch_size=4, transport=TcpTransport(0))
        reference.start()
        try:
            with echo_rs.Client(f"tcp://127.0.0.1:{reference.port}", EXAMPLE) as c:
                for seq in range(8):
                    c.send(make(5, seq))
                c.wait()
            got = []
            for _ in range(2):
                got += check_batch(self, reference.sample().batch, 4, view=False)
            self.assertEqual(got, [(5, s) for s in range(8)])
        finally:
            reference.close()

    def test_clear_errors_for_a_wrong_spec_a_closed_client_and_a_wrong_sample(self):
        with echo_rs.Server(EXAMPLE, batch_size=4, listen=["tcp://127.0.0.1:0"]) as server:
            with self.assertRaisesRegex(ValueError, "spec"):
                echo_rs.Client(server.urls[0], dict(EXAMPLE, act=np.zeros(3, np.int64)))
            c = echo_rs.Client(server.urls[0], EXAMPLE)
            with self.assertRaisesRegex(ValueError, "leaf 'obs.vec': expected float32 of shape \\(5,\\)"):
                c.send(dict(make(0, 0), obs={"vec": np.zeros(6, np.float32), "image": np.zeros((2, 3), np.uint8)}))
            c.send(make(0, 0))
            c.close()
            c.close()
            with self.assertRaises(echo_rs.ConnectionClosedError):
                c.send(make(0, 1))
            self.assertTrue(issubclass(echo_rs.ConnectionClosedError, ConnectionError))
        with self.assertRaises(ConnectionError):
            echo_rs.Client(server.urls[0], EXAMPLE, connect_timeout=5)


class LearnerAndActorScripts(unittest.TestCase):
    def test_python_learner_and_actors_over_quic_streams(self):
        learner = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "python", "learner.py"), "--listen", "quic://127.0.0.1:0",
             "--batch-size", "32", "--batches", "8", "--print-every", "8"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            first = learner.stdout.readline()
            self.assertTrue(first.startswith("listening on quic://"), first)
            url = first.split(" ", 2)[2].strip()
            actors = subprocess.run(
                [sys.executable, os.path.join(REPO, "python", "actor.py"), "--url", url + "&streams=2",
                 "--actors", "4", "--steps", "64", "--timeout", "60"],
                capture_output=True, text=True, timeout=90,
            )
            self.assertEqual(actors.returncode, 0, actors.stderr)
            out, _ = learner.communicate(timeout=60)
        finally:
            learner.kill()
        self.assertEqual(learner.returncode, 0, out)
        self.assertIn("done: 8 batches, 256 samples", out)
        self.assertIn("quic 256 samples; problems: 0", out)


class GrpcFromPython(unittest.TestCase):
    def test_grpc_and_tcp_listeners_feed_one_server(self):
        stubs = tempfile.mkdtemp()
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(REPO, "proto"),
             "--python_out=" + stubs, "--grpc_python_out=" + stubs, os.path.join(REPO, "proto", "echo.proto")],
            check=True,
        )
        spec = {"x": np.zeros(3, np.float32), "n": np.zeros((), np.int32)}
        with echo_rs.Server(spec, batch_size=5, listen=["tcp://127.0.0.1:0", "grpc://127.0.0.1:0"]) as server:
            self.assertEqual([u.split(":")[0] for u in server.urls], ["tcp", "grpc"])
            target = server.urls[1].split("://", 1)[1]
            out = os.path.join(stubs, "sent.bin")
            run = subprocess.run(
                [sys.executable, os.path.join(REPO, "python", "grpc_client.py"), "--stubs", stubs,
                 "--target", target, "push", "--count", "20", "--out", out],
                check=True, capture_output=True, text=True, timeout=60,
            )
            report = json.loads(run.stdout)
            self.assertEqual((report["sent"], report["acked"]), (20, 20))
            with open(out, "rb") as f:
                sent = f.read()
            got = b""
            for _ in range(4):
                sample = server.sample(timeout=30)
                # optree order: n, then x; the payload is the leaves' bytes in that order.
                for k in range(5):
                    got += sample.batch["n"][k].tobytes() + sample.batch["x"][k].tobytes()
            self.assertEqual(got, sent)
            self.assertEqual(server.metrics()["transports"]["grpc"]["samples"], 20)


if __name__ == "__main__":
    unittest.main()

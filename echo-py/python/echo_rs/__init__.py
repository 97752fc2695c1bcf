"""echo's learner side from Python.

A :class:`Server` receives samples from rollout workers on any of echo's
transports (``tcp://``, ``unix://``, ``grpc://``, ``grpcs://``, ``quic://``)
and hands the learner whole batches: a pytree shaped like the example sample,
each leaf a numpy array of ``(batch_size, *leaf.shape)`` that points straight
into echo's batch ring (no copy after the network).

id-echo's Python ``TcpClient`` sends to a ``tcp://`` listener unchanged::

    import numpy as np, echo_rs
    example = {"obs": np.zeros(84, np.float32), "reward": np.float32(0)}
    with echo_rs.Server(example, batch_size=256, listen=["tcp://0.0.0.0:5555"]) as server:
        for sample in server.dataset_iter():
            train(sample.batch["obs"], sample.batch["reward"])

Lifetime: a batch's arrays keep its ring slots, so writers cannot overwrite
them while you read. The slots go back once every array of the batch is gone
(drop your references, or take ``copy=True`` batches). Holding on to
``num_buffers`` batches at once stops the flow until one is dropped.

Waiting calls (``Server.sample`` and ``submit``, ``Client.send`` and
``wait``) release the GIL. ``sample`` sees Ctrl-C within 50 ms; ``submit``
(while the ring is full) and ``Client.send`` (while ``max_inflight`` samples
are unacknowledged) see it once they return.
Before Python 3.14, a thread still inside one of them when the interpreter
exits is killed as it takes the GIL back, which aborts the process: join such
threads (or close the server) before exiting, rather than leaving them as
daemon threads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import optree

from echo_rs import _native

__all__ = ["Server", "Sample", "Client", "ConnectionClosedError"]

#: Sending after ``close``, or after the server went away (a ``ConnectionError``).
ConnectionClosedError = _native.ConnectionClosedError


class Sample(NamedTuple):
    """A batch (a pytree of numpy arrays) and the server's metrics when it was taken."""

    batch: Any
    info: dict


def _leaf_name(path: tuple, index: int) -> str:
    name = ".".join(str(p) for p in path)
    return name if name else f"leaf{index}"


def _flatten_example(example: Any):
    """The example's leaves as ``(name, shape, dtype name)`` in optree's order,
    their ``(dtype, shape)``, and its treedef."""
    paths, leaves, treedef = optree.tree_flatten_with_path(example)
    spec, kinds, names = [], [], set()
    for i, (path, leaf) in enumerate(zip(paths, leaves)):
        name = _leaf_name(path, i)
        if name in names:  # {"a.b": x, "a": {"b": y}}: names only need to differ
            name = f"{name}#{i}"
        names.add(name)
        if isinstance(leaf, np.generic):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, np.ndarray):
            raise TypeError(f"leaf {name!r}: expected a numpy array, got {type(leaf).__name__}")
        dtype = leaf.dtype
        if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
            raise TypeError(f"leaf {name!r}: big-endian dtype {dtype.str}")
        spec.append((name, list(leaf.shape), dtype.name))
        kinds.append((name, dtype, tuple(leaf.shape)))
    return spec, kinds, treedef


def _payload(data: Any, kinds: list, treedef: Any) -> bytes:
    """One sample's bytes: its leaves in optree's order, the pytree's structure
    and each leaf's dtype and shape checked against the example's."""
    leaves, structure = optree.tree_flatten(data)
    if structure != treedef:
        raise ValueError(f"expected a sample shaped like {treedef}, got {structure}")
    parts = []
    for leaf, (name, dtype, shape) in zip(leaves, kinds):
        a = np.asarray(leaf)
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(
                f"leaf {name!r}: expected {dtype} of shape {shape}, got {a.dtype} of shape {a.shape}"
            )
        parts.append(np.ascontiguousarray(a).tobytes())
    return b"".join(parts)


class Server:
    """Receives samples shaped like ``example`` and batches them.

    Args:
        example: a pytree of numpy arrays (or numpy scalars) with the shape and
            dtype of one sample. Leaves are flattened in optree's order (dict
            keys sorted), as id-echo's clients flatten them.
        batch_size: samples per batch.
        listen: URLs to listen on; port 0 picks a free port (see ``urls``).
            Empty: in-process only, fed by ``submit``.
        num_buffers: batches in the ring (at least 2).
        queue_size: chunks each connection may queue before it waits.
        threads: runtime threads for the transports.
        max_connections: connections (streams, on QUIC) at once, over all
            transports; default: echo's.
    """

    def __init__(
        self,
        example: Any,
        batch_size: int,
        listen: Sequence[str] = (),
        *,
        num_buffers: int = 3,
        queue_size: int = 8,
        threads: int = 2,
        max_connections: int | None = None,
    ):
        if isinstance(listen, str):
            raise TypeError("listen is a list of URLs, not one string")
        spec, self._leaves, self._treedef = _flatten_example(example)
        self._native = _native.Server(
            spec,
            batch_size,
            list(listen),
            num_buffers=num_buffers,
            queue_size=queue_size,
            threads=threads,
            max_connections=max_connections,
        )

    @property
    def urls(self) -> list[str]:
        """The bound URLs, in the order given, with real ports."""
        return self._native.urls

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self._native.batch_size

    @property
    def port(self) -> int:
        """The first ``tcp://`` listener's port (id-echo's ``Server.port``), or
        else the first ``quic://`` one's."""
        for scheme in ("tcp", "quic"):
            for url in self.urls:
                parts = urlsplit(url)
                if parts.scheme == scheme and parts.port is not None:
                    return parts.port
        raise ValueError(f"no tcp:// or quic:// listener among {self.urls}")

    def sample(self, timeout: float | None = None) -> Sample | None:
        """Waits for the next whole batch; ``None`` once the server is closed
        and every sample has been handed out (the last batch may be shorter).

        The arrays are read-only views into the ring (see the module docs).
        ``timeout`` in seconds raises ``TimeoutError``; Ctrl-C interrupts.
        """
        native = self._native.sample(timeout)
        if native is None:
            return None
        n = len(native)
        arrays = [
            np.frombuffer(buf, dtype=dtype).reshape((n, *shape))
            for buf, (_, dtype, shape) in zip(native.leaves(), self._leaves)
        ]
        batch = optree.tree_unflatten(self._treedef, arrays)
        return Sample(batch=batch, info=self.metrics())

    def dataset_iter(self, *, copy: bool = False) -> Iterator[Sample]:
        """Yields batches until the server is closed and drained. ``copy=True``
        copies each batch so its ring slots are free at once."""
        while True:
            sample = self.sample()
            if sample is None:
                return
            if copy:
                sample = Sample(optree.tree_map(np.array, sample.batch), sample.info)
            yield sample
            # Not held here while the next one is awaited.
            del sample

    def submit(self, data: Any) -> None:
        """Feeds one sample (a pytree like the example) in-process."""
        self._native.submit(_payload(data, self._leaves, self._treedef))

    def metrics(self) -> dict:
        """The server's metrics: store, connections, queues, and per transport."""
        return json.loads(self._native.metrics_json())

    def close(self) -> None:
        """Starts a graceful shutdown and returns at once: listeners stop,
        connections close, and what they had queued still reaches the ring.
        Keep calling ``sample`` (or iterate ``dataset_iter``) to take the rest,
        until it returns ``None``; a full ring waits for you. Safe to call twice.
        """
        self._native.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        """Closes and takes whatever is left, discarding it (the learner left
        the block, so nobody will read it); returns once the server is down."""
        self.close()
        while self._native.sample(None) is not None:
            pass


class Client:
    """Sends samples shaped like ``example`` to a server at ``url``, on any
    transport: ``tcp://``, ``unix://``, ``grpc://`` and ``grpcs://`` (``ca``,
    ``domain``, ``token`` in the query), ``quic://`` (``ca`` or ``pin``,
    ``streams=N``). For actors whose network is not trusted (QUIC is always
    encrypted) or that are not on TCP; on ``tcp://`` it speaks the same wire as
    id-echo's ``TcpClient``.

    The server's spec is checked on connect. ``send`` waits while
    ``max_inflight`` samples are unacknowledged; ``wait`` until all are;
    after ``close`` or once the server left, ``send`` raises
    ``ConnectionClosedError``.
    """

    def __init__(self, url: str, example: Any, *, max_inflight: int = 32, connect_timeout: float = 10.0):
        spec, self._leaves, self._treedef = _flatten_example(example)
        self._native = _native.Client(url, spec, max_inflight=max_inflight, connect_timeout=connect_timeout)

    def send(self, data: Any) -> None:
        """Sends one sample (a pytree like the example)."""
        self._native.send(_payload(data, self._leaves, self._treedef))

    def wait(self) -> None:
        """Waits until every sample sent is acknowledged."""
        self._native.wait()

    def close(self) -> None:
        """Flushes and closes; safe to call twice."""
        self._native.close()

    @property
    def sent(self) -> int:
        """Samples sent so far."""
        return self._native.counts()[0]

    @property
    def acked(self) -> int:
        """Samples the server acknowledged so far."""
        return self._native.counts()[1]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

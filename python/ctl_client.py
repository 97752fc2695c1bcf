#!/usr/bin/env python3
"""A control-plane client in plain Python (standard library only).

Written from the protocol, not from echo's code: fastdaemon's records are
sequences of strings, each a big-endian u32 length then that many UTF-8
bytes. The client sends [stdin, args] and reads [stdout, stderr].

    ctl_client.py PORT_OR_PATH [--host HOST] [--dgram] [ARGS...]

Used by echo's tests (a foreign client against echo-server) and as the
Python side of the echo-ctl benchmark (python/ctl_bench.py). Exit status as
echo-ctl: 0 ok, 1 the server wrote to stderr, 2 usage, 3 unreachable.
"""

import argparse
import os
import socket
import struct
import sys

_LEN = struct.Struct("!L")


def send_record(w, strings):
    w(b"".join(_LEN.pack(len(b)) + b for b in (s.encode("utf-8") for s in strings)))


def _recv_exact(r, n):
    data = r(n)
    if data is None or len(data) != n:
        raise EOFError(f"record truncated: expected {n} bytes, got {0 if data is None else len(data)}")
    return data


def recv_record(r, count=2):
    out = []
    for _ in range(count):
        (n,) = _LEN.unpack(_recv_exact(r, _LEN.size))
        out.append(_recv_exact(r, n).decode("utf-8"))
    return out


def transfer(data, port, host=None, dgram=False, timeout=30.0):
    if isinstance(port, int):
        with socket.create_connection((host or "localhost", port), timeout=timeout) as s:
            return _stream(s, data)
    if not dgram:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(port)
            return _stream(s, data)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind(f"\0echo-ctl-py-{os.getpid()}")  # abstract name: the server replies here
        s.connect(port)
        buf = bytearray()
        send_record(buf.extend, data)
        s.send(bytes(buf))
        reply = s.recv(1 << 20)
        view = memoryview(reply)
        pos = 0

        def r(n):
            nonlocal pos
            chunk = bytes(view[pos:pos + n])
            pos += n
            return chunk

        return recv_record(r)


def _stream(s, data):
    with s.makefile("wb") as f:
        send_record(f.write, data)
    with s.makefile("rb") as f:
        return recv_record(f.read)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("port", help="TCP port (a number) or Unix socket path")
    p.add_argument("--host", default=None, help="host for a TCP port (default: localhost)")
    p.add_argument("--dgram", action="store_true", help="Unix datagram socket")
    args, rest = p.parse_known_args(argv)
    try:
        port = int(args.port)
    except ValueError:
        port = args.port
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    try:
        stdout, stderr = transfer((stdin, " ".join(rest)), port, args.host, args.dgram)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        print(f"ctl_client.py: {e}", file=sys.stderr)
        return 3
    sys.stderr.write(stderr)
    sys.stdout.write(stdout)
    return 1 if stderr else 0


if __name__ == "__main__":
    sys.exit(main())

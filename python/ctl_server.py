#!/usr/bin/env python3
"""A small control-plane server in plain Python (standard library only).

Speaks fastdaemon's record protocol, written from the protocol: each request
is [stdin, args] (strings: big-endian u32 length, UTF-8 bytes), each reply
[stdout, stderr]. echo-ctl's tests run it to check echo-ctl against a server
that is not echo's.

    ctl_server.py (--tcp | --unix PATH | --dgram PATH) [--timeout SECONDS]

Prints one line `listening ADDR` (ADDR: the TCP port, or the path) once it
accepts requests. Replies, by the request's args:

    fail WORDS...   stdout "some output\\n", stderr "failed: WORDS...\\n"
    close           closes the connection without replying
    big N           stdout of N bytes ("x" repeated)
    anything else   stdout: JSON {"stdin": ..., "args": ...} and a newline

Exits after --timeout seconds (default 60) so a crashed test leaves nothing
behind.
"""

import argparse
import json
import os
import socket
import struct
import sys
import threading

_LEN = struct.Struct("!L")


def encode(strings):
    return b"".join(_LEN.pack(len(b)) + b for b in (s.encode("utf-8") for s in strings))


def read_record(read, count=2):
    out = []
    for _ in range(count):
        head = read(_LEN.size)
        if len(head) != _LEN.size:
            raise EOFError("truncated length")
        (n,) = _LEN.unpack(head)
        if n > 1 << 20:
            raise ValueError(f"string of {n} bytes is too large")
        body = read(n)
        if len(body) != n:
            raise EOFError("truncated string")
        out.append(body.decode("utf-8"))
    return out


def answer(stdin, args):
    words = args.split(" ")
    if words[0] == "fail":
        return "some output\n", f"failed: {' '.join(words[1:])}\n"
    if words[0] == "close":
        return None
    if words[0] == "big" and len(words) == 2:
        return "x" * int(words[1]), ""
    return json.dumps({"stdin": stdin, "args": args}) + "\n", ""


def serve_stream(listener):
    def handle(conn):
        with conn:
            conn.settimeout(10)
            try:
                f = conn.makefile("rb")
                stdin, args = read_record(f.read)
                reply = answer(stdin, args)
                if reply is not None:
                    conn.sendall(encode(reply))
            except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
                print(f"ctl_server.py: bad request: {e}", file=sys.stderr, flush=True)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve_dgram(sock):
    while True:
        data, peer = sock.recvfrom(1 << 20)
        pos = 0

        def read(n):
            nonlocal pos
            chunk = data[pos:pos + n]
            pos += n
            return chunk

        try:
            reply = answer(*read_record(read))
        except (EOFError, ValueError, UnicodeDecodeError) as e:
            print(f"ctl_server.py: bad datagram: {e}", file=sys.stderr, flush=True)
            continue
        if reply is not None and peer:
            sock.sendto(encode(reply), peer)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1, ephemeral port")
    g.add_argument("--unix", metavar="PATH", help="Unix stream socket")
    g.add_argument("--dgram", metavar="PATH", help="Unix datagram socket")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()

    t = threading.Timer(a.timeout, lambda: os._exit(2))
    t.daemon = True
    t.start()

    if a.tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        print(f"listening {s.getsockname()[1]}", flush=True)
        serve_stream(s)
    elif a.unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(a.unix)
        s.listen(16)
        print(f"listening {a.unix}", flush=True)
        serve_stream(s)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(a.dgram)
        print(f"listening {a.dgram}", flush=True)
        serve_dgram(s)


if __name__ == "__main__":
    main()

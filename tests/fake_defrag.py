"""A stand-in for `python -m exporter defrag` that a test controls over a Unix socket.

Run as `python fake_defrag.py SOCKET defrag --output json ... --cluster NAME`: it connects to SOCKET,
sends its arguments as one JSON line, and waits. The test answers with {"stdout": ..., "exit": ...};
the child prints that stdout (the JSON report the real engine would print) and exits with that code.
If the test goes away without answering, the child exits 99 with no report: it never outlives a
failed test by more than its socket timeout.
"""

import json
import socket
import sys


def main() -> int:
    path, *argv = sys.argv[1:]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(120)
        sock.connect(path)
        sock.sendall(json.dumps(argv).encode() + b"\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    order = json.loads(reply) if reply else {"stdout": "", "exit": 99}
    sys.stdout.write(order["stdout"])
    sys.stdout.flush()
    return int(order["exit"])


if __name__ == "__main__":
    raise SystemExit(main())

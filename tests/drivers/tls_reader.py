"""
A TLS client on Python's ``ssl`` module that only reads, for tests: it
connects to 127.0.0.1, reads until the server has sent ``--bytes`` bytes or
closes, and prints::

    HANDSHAKE version=TLSv1.2
    RESULT bytes=N sha256=HEX

OpenSSL under Python's ``ssl`` takes part in a server's renegotiation by
itself, or refuses it with ``--refuse-renegotiation``.  Any failure prints
``ERROR ... after N bytes`` and exits 1; the run is bounded by
``--timeout``.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import ssl
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--tls-max", choices=("1.2", "1.3"), default="1.2")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--refuse-renegotiation",
        action="store_true",
        help="answer a HelloRequest with a no_renegotiation alert",
    )
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca)
    if args.refuse_renegotiation:
        context.options |= ssl.OP_NO_RENEGOTIATION
    context.maximum_version = (
        ssl.TLSVersion.TLSv1_2 if args.tls_max == "1.2" else ssl.TLSVersion.TLSv1_3
    )
    deadline = time.monotonic() + args.timeout
    digest = hashlib.sha256()
    got = 0
    try:
        with socket.create_connection(("127.0.0.1", args.port), args.timeout) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                print(f"HANDSHAKE version={conn.version()}", flush=True)
                while got < args.bytes:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{got} of {args.bytes} bytes in time")
                    conn.settimeout(left)
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    digest.update(chunk)
                    got += len(chunk)
    except Exception as e:
        print(f"ERROR {e!r} after {got} bytes", flush=True)
        return 1
    print(f"RESULT bytes={got} sha256={digest.hexdigest()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
The ``twisted-rekey`` command (also ``python -m twisted_rekey``).

``info`` says what this installation can do (which OpenSSL functions were
reached, and how); ``probe HOST:PORT`` asks a real server how it takes key
updates and renegotiations.  Both print one line per fact, or JSON.

This module must never print a traceback for bad input or for anything a
server or the network does: one line on stderr and a documented exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from ._probe import (
    EXIT_INTERNAL,
    EXIT_KEY_UPDATE_UNAVAILABLE,
    EXIT_NO_CONNECTION,
    EXIT_OK,
    EXIT_REKEY_BROKE,
    EXIT_USAGE,
    ProbeError,
    ProbeOptions,
    ProbeReport,
    parse_target,
    probe,
)

__all__ = ["main"]

_PROG = "twisted-rekey"

_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  info: key update is available; probe: connected and probed (a server
     refusing client renegotiation is a finding, not a failure)
  {EXIT_REKEY_BROKE}  probe: a rekey broke the connection (alert or close after our
     TLS 1.3 KeyUpdate, or a renegotiation failing other than by refusal)
  {EXIT_USAGE}  usage error (bad option, HOST:PORT, or CA file)
  {EXIT_NO_CONNECTION}  probe: cannot resolve or connect, or no handshake succeeded
     (certificate verification failures included)
  {EXIT_KEY_UPDATE_UNAVAILABLE}  key update (TLS 1.3) is not available in this build
  {EXIT_INTERNAL}  internal error (a bug: please report it)
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in ("twisted_rekey", "pyOpenSSL", "cryptography", "Twisted"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def _info(args: argparse.Namespace) -> int:
    from . import __file__ as package_file
    from ._binding import capabilities

    caps = capabilities()
    versions = _versions()
    try:
        import twisted

        twisted_version: str | None = str(twisted.__version__)
    except ImportError:
        twisted_version = None
    data: dict[str, Any] = {
        "key_update": caps.key_update,
        "renegotiation": caps.renegotiation,
        "abbreviated_renegotiation": caps.abbreviated_renegotiation,
        "functions": {
            r.name: {"available": r.available, "how": r.how, "reason": r.reason or None}
            for r in caps.functions
        },
        "openssl": caps.openssl_version,
        "openssl_module": caps.module_path,
        "cryptography": caps.cryptography_version,
        "pyopenssl": versions["pyOpenSSL"],
        "twisted": twisted_version,
        "twisted_rekey": versions["twisted_rekey"],
        "twisted_rekey_path": package_file,
        "python": sys.version.split()[0],
    }
    code = EXIT_OK if caps.key_update else EXIT_KEY_UPDATE_UNAVAILABLE
    if args.json:
        print(json.dumps(data, indent=2))
        return code

    def yes(flag: bool) -> str:
        return "available" if flag else "NOT available"

    lines = [
        f"key update (TLS 1.3):        {yes(caps.key_update)}",
        f"renegotiation (TLS 1.2):     {yes(caps.renegotiation)}",
        f"abbreviated renegotiation:   {yes(caps.abbreviated_renegotiation)}",
    ]
    for r in caps.functions:
        how = f"found via {r.how}" if r.available else f"unavailable: {r.reason}"
        lines.append(f"  {r.name + ':':30} {how}")
    lines += [
        f"OpenSSL:        {caps.openssl_version} (in {caps.module_path})",
        f"cryptography:   {caps.cryptography_version}",
        f"pyOpenSSL:      {versions['pyOpenSSL']}",
        f"Twisted:        {twisted_version or 'not installed'}",
        f"twisted_rekey:  {versions['twisted_rekey']} ({package_file})",
        f"Python:         {data['python']}",
    ]
    print("\n".join(lines))
    return code


def _print_report(report: ProbeReport) -> None:
    name = report.servername
    target = f"{report.host}:{report.port}"
    print(f"target: {target} (name checked: {name})")
    if report.verification != "verified":
        print("WARNING: certificate verification is disabled (--insecure)")
    if not report.key_update_available:
        print("WARNING: key update is not available in this build")
    for result in report.results:
        label = f"TLS {result.requested}"
        if result.error:
            print(f"{label}: {result.error}")
        for finding in result.findings:
            print(f"{label}: {finding.text}")


def _probe(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as e:
        print(f"{_PROG} probe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        print(f"{_PROG} probe: error: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.wait is not None and args.wait <= 0:
        print(f"{_PROG} probe: error: --wait must be positive", file=sys.stderr)
        return EXIT_USAGE
    versions: Sequence[str] = ("1.3", "1.2")
    if args.tls_version:
        versions = (args.tls_version,)
    options = ProbeOptions(
        host=host,
        port=port,
        servername=args.servername,
        cafile=args.cafile,
        insecure=args.insecure,
        versions=versions,
        timeout=args.timeout,
        wait=min(args.timeout, 1.0) if args.wait is None else args.wait,
        payload=args.send.encode("utf-8"),
    )
    try:
        report = probe(options)
    except ProbeError as e:
        if args.json:
            print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
        print(f"{_PROG} probe: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    code = report.exit_code
    if code == EXIT_NO_CONNECTION:
        errors = "; ".join(
            f"TLS {r.requested}: {r.error}" for r in report.results if r.error
        )
        print(f"{_PROG} probe: no handshake succeeded ({errors})", file=sys.stderr)
    return code


def _own_version() -> str:
    from . import __version__

    return str(__version__)


def _parser() -> _Parser:
    parser = _Parser(
        prog=_PROG,
        description="Rotate TLS traffic keys: inspect this installation, "
        "or probe a server's KeyUpdate and renegotiation support.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_own_version()}",
        help="print the version of twisted_rekey and exit",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )

    info = commands.add_parser(
        "info",
        help="what this build can do (exit 0 if key update is available, "
        f"{EXIT_KEY_UPDATE_UNAVAILABLE} if not)",
        description="Report which OpenSSL functions twisted_rekey reached, how, "
        "and the versions in use.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)

    pr = commands.add_parser(
        "probe",
        help="ask a TLS server how it takes KeyUpdate and renegotiation",
        description="Connect to HOST:PORT (one connection per TLS version) and "
        "report: negotiated version and cipher; for TLS 1.3 whether the server "
        "accepts our KeyUpdate and answers a requested one (and how fast); for "
        "TLS 1.2 whether it supports secure renegotiation and allows a "
        "client-initiated one.  The --send payload is written after each key "
        "change; an echo server proves it decrypted it under the new keys.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument(
        "target", metavar="HOST:PORT", help="server, [v6addr]:PORT for IPv6"
    )
    pr.add_argument(
        "--servername",
        metavar="NAME",
        help="name for SNI and certificate verification (default: HOST)",
    )
    trust = pr.add_mutually_exclusive_group()
    trust.add_argument(
        "--cafile", metavar="PEM", help="trusted CA certificates (default: system)"
    )
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the certificate (flagged in the output)",
    )
    version_group = pr.add_mutually_exclusive_group()
    version_group.add_argument(
        "--tls-version",
        choices=("1.2", "1.3"),
        help="probe only this version (default: 1.3 then 1.2)",
    )
    version_group.add_argument(
        "--tls1_3",
        dest="tls_version",
        action="store_const",
        const="1.3",
        help="same as --tls-version 1.3",
    )
    version_group.add_argument(
        "--tls1_2",
        dest="tls_version",
        action="store_const",
        const="1.2",
        help="same as --tls-version 1.2",
    )
    pr.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="bound on each connect, handshake and wait (default: 5)",
    )
    pr.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="how long to wait for an answer the server may never send (to "
        "data it does not echo; alerts after a key change) (default: 1, at "
        "most --timeout)",
    )
    pr.add_argument(
        "--send",
        default="twisted-rekey probe\n",
        metavar="TEXT",
        help="payload sent after each key change and checked for an echo "
        "(default: a short line; '' sends nothing)",
    )
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(run=_probe)
    return parser


def code_for_broken_pipe() -> int:
    # Point stdout at devnull so the interpreter's final flush stays quiet.
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line; returns the exit code.

    .. versionadded:: 0.1.0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (``| head``) went away: nothing left to say.
        return code_for_broken_pipe()
    except Exception as e:
        print(f"{_PROG}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    return code


if __name__ == "__main__":
    sys.exit(main())

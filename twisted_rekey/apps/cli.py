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

from .probe import (
    EXIT_EXPOSED,
    EXIT_INTERNAL,
    EXIT_KEY_UPDATE_UNAVAILABLE,
    EXIT_NO_CONNECTION,
    EXIT_OK,
    EXIT_REKEY_BROKE,
    EXIT_USAGE,
    LIMITS_MAX,
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    ProbeError,
    ProbeOptions,
    ProbeReport,
    VersionResult,
    batch_exit_code,
    parse_target,
    probe,
)

__all__ = ["main"]

_PROG = "twisted-rekey"

# Concurrent probes with --targets: each is one blocking connection at a time.
_JOBS_MAX = 64

_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  info: key update is available; probe: probed, no exposure found (a
     server refusing client renegotiation is a finding, not a failure)
  {EXIT_REKEY_BROKE}  probe: a rekey broke the connection (alert or close after our
     TLS 1.3 KeyUpdate, or a renegotiation failing after the server took it up)
  {EXIT_USAGE}  usage error (bad option, target, targets file or CA file)
  {EXIT_NO_CONNECTION}  probe: no TLS connection (name not resolved, port closed,
     timeout, not TLS, no handshake succeeded, certificate not verified)
  {EXIT_KEY_UPDATE_UNAVAILABLE}  key update (TLS 1.3) is not available in this build
  {EXIT_INTERNAL}  internal error (a bug: please report it)
  {EXIT_EXPOSED}  probe: an exposure graded medium or high (client-initiated
     renegotiation allowed; no secure renegotiation, RFC 5746)
With --targets, the code of the target that matters most (in the order
5, 2, 3, 1, 6, 4, 0).
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
    from twisted_rekey import __file__ as package_file
    from twisted_rekey import capabilities

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


_TAGS = {
    "ok": "[ok]",
    "info": "[info]",
    "note": "[note]",
    "warn": "[warn]",
    "fail": "[FAIL]",
    "low": "[LOW]",
    "medium": "[MEDIUM]",
    "high": "[HIGH]",
}

_VERDICTS = {
    EXIT_OK: "probed: no exposure found",
    EXIT_REKEY_BROKE: "a rekey broke the connection",
    EXIT_NO_CONNECTION: "no TLS connection",
    EXIT_KEY_UPDATE_UNAVAILABLE: "key update is not available in this build",
    EXIT_EXPOSED: "exposure found",
}


def _print_report(report: ProbeReport) -> None:
    if report.verified:
        checked = f"verifying the certificate and name: {report.servername}"
    else:
        checked = f"SNI {report.servername}; certificate and name NOT verified"
    print(f"target: {report.label} ({checked})")
    if not report.verified:
        print("WARNING: certificate verification is disabled (--insecure)")
    if not report.key_update_available:
        print("WARNING: key update is not available in this build")
    if report.status != "probed" and not report.results:
        print(f"{report.status}: {report.error}")
    for result in report.results:
        label = f"TLS {result.requested}"
        if result.connected:
            print(f"{label}: negotiated {result.protocol} {result.cipher}")
        else:
            print(f"{label}: {result.status}: {result.error}")
        for finding in result.findings:
            print(f"{label}: {_TAGS[finding.severity]:8} {finding.text}")
    code = report.exit_code
    graded = [f for f in report.findings if f.severity in ("fail", "medium", "high")]
    why = "; ".join(f"{f.name}={f.result}" for f in graded)
    print(f"verdict: {_VERDICTS[code]}{f' ({why})' if why else ''}; exit code {code}")


def _cell(result: VersionResult | None, names: Sequence[str]) -> str:
    if result is None:
        return "-"
    if not result.connected:
        return result.status
    values = []
    for name in names:
        finding = result.find(name)
        if finding is not None:
            mark = "!" if finding.severity in ("fail", "medium", "high") else ""
            values.append(f"{finding.result}{mark}")
    return ",".join(values) or "connected"


def _print_summary(reports: Sequence[ProbeReport]) -> None:
    rows = [("TARGET", "STATUS", "TLS 1.3 KEYUPDATE", "TLS 1.2 RENEGOTIATION", "EXIT")]
    for report in reports:
        by_version = {r.requested: r for r in report.results}
        rows.append(
            (
                report.label,
                report.status,
                _cell(by_version.get("1.3"), ("key_update", "key_update_requested")),
                _cell(
                    by_version.get("1.2"),
                    ("secure_renegotiation", "client_renegotiation"),
                ),
                str(report.exit_code),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


class _Progress:
    """One self-rewriting line on a terminal's stderr; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()

    def update(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            line = f"probed {self.done}/{self.total}: {label}"
            sys.stderr.write(f"\r\x1b[K{line[:200]}")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _read_targets(path: str) -> list[str]:
    """The targets of a file, one a line (``#`` comments, blank lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise ValueError(f"--targets {path}: {why}") from None
    targets = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            parse_target(text)
        except ValueError as e:
            raise ValueError(f"--targets {path} line {number}: {e}") from None
        targets.append(text)
    if not targets:
        raise ValueError(f"--targets {path}: no targets in it")
    return targets


def _probe(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(REPORT_SCHEMA, indent=2))
        return EXIT_OK
    try:
        if args.targets is not None:
            if args.target is not None:
                raise ValueError("give a target or --targets FILE, not both")
            targets = _read_targets(args.targets)
        elif args.target is None:
            raise ValueError("a target (HOST:PORT or URL) or --targets FILE is needed")
        else:
            targets = [args.target]
        parsed = [parse_target(t) for t in targets]
        if args.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if args.wait is not None and args.wait <= 0:
            raise ValueError("--wait must be positive")
        if not 1 <= args.jobs <= _JOBS_MAX:
            raise ValueError(f"--jobs must be between 1 and {_JOBS_MAX}")
    except ValueError as e:
        print(f"{_PROG} probe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    versions: Sequence[str] = ("1.3", "1.2")
    if args.tls_version:
        versions = (args.tls_version,)
    options = [
        ProbeOptions(
            host=host,
            port=port,
            servername=args.servername,
            cafile=args.cafile,
            insecure=args.insecure,
            versions=versions,
            timeout=args.timeout,
            wait=min(args.timeout, 1.0) if args.wait is None else args.wait,
            payload=args.send.encode("utf-8"),
            limits=args.limits,
            target=text,
        )
        for text, (host, port) in zip(targets, parsed)
    ]
    try:
        if args.targets is None:
            reports = [probe(options[0])]
        else:
            reports = _probe_many(options, args.jobs)
    except ProbeError as e:
        print(f"{_PROG} probe: error: {e}", file=sys.stderr)
        return e.exit_code
    codes = [r.exit_code for r in reports]
    if args.json:
        if args.targets is None:
            data: Any = reports[0].as_dict()
        else:
            data = {
                "schema_version": SCHEMA_VERSION,
                "reports": [r.as_dict() for r in reports],
                "exit_code": batch_exit_code(codes),
            }
        print(json.dumps(data, indent=2))
    else:
        for number, report in enumerate(reports):
            if number:
                print()
            _print_report(report)
        if args.targets is not None:
            _print_summary(reports)
    if args.targets is None and reports[0].status != "probed":
        error = reports[0].error or reports[0].status
        if not error.startswith("cannot"):
            error = f"no handshake succeeded ({error})"
        print(f"{_PROG} probe: {error}", file=sys.stderr)
    return batch_exit_code(codes)


def _probe_many(options: Sequence[ProbeOptions], jobs: int) -> list[ProbeReport]:
    """Probe every target, at most *jobs* at once; reports in input order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    progress = _Progress(len(options))
    reports: list[ProbeReport | None] = [None] * len(options)
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(probe, o): i for i, o in enumerate(options)}
            for future in as_completed(futures):
                index = futures[future]
                reports[index] = future.result()
                progress.update(options[index].target or "")
    finally:
        progress.finish()
    return [r for r in reports if r is not None]


def _own_version() -> str:
    from twisted_rekey import __version__

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
        description="Connect to TARGET (one connection per TLS version) and "
        "report, each finding graded (ok, info, note, warn, FAIL, LOW, MEDIUM, "
        "HIGH): negotiated version and cipher; for TLS 1.3 whether the server "
        "accepts our KeyUpdate and answers a requested one (at once, or only "
        "with its next write); for TLS 1.2 whether it supports secure "
        "renegotiation and allows client-initiated ones (a denial-of-service "
        "exposure).  The --send payload is written after each key change; an "
        "echo server proves it decrypted it under the new keys.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="HOST:PORT, [v6addr]:PORT, or a URL such as https://host[:port]/",
    )
    pr.add_argument(
        "--targets",
        metavar="FILE",
        help="probe every target in FILE (one a line; # starts a comment) "
        "and end with a summary table",
    )
    pr.add_argument(
        "--jobs",
        type=int,
        default=4,
        metavar="N",
        help=f"with --targets: probe at most N targets at once (default: 4, "
        f"at most {_JOBS_MAX})",
    )
    pr.add_argument(
        "--limits",
        action="store_true",
        help="also measure how many KeyUpdates the server accepts per second "
        f"and in a row before it drops the connection (at most {LIMITS_MAX} "
        "each, on two more TLS 1.3 connections), and the rotation floor to "
        "use against it",
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
    pr.add_argument(
        "--json",
        action="store_true",
        help=f"machine-readable output (schema version {SCHEMA_VERSION}; see --schema)",
    )
    pr.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of the --json output and exit",
    )
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

"""
What every benchmark shares: paired statistics over alternating rounds, the
description of the machine, throwaway certificates, and the printed rows.

A figure is a ratio of a measure to its baseline taken in the same round
(the order of the variants rotating from round to round), so that a slow
spell of a shared machine hits both alike; its median and interquartile
range over the rounds are what is printed, never a single run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every row a run prints starts with this, then the figure's name.
ROW = "FIGURE"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def iqr(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for one value)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def paired(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios of *values* to *baseline* (NaN where it is zero)."""
    return [v / b if b else math.nan for v, b in zip(values, baseline)]


def orders(variants: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """Each round's order: rotated by one each round, reversed every other."""
    n = len(variants)
    for r in range(rounds):
        order = [variants[(i + r) % n] for i in range(n)]
        yield order if r % 2 == 0 else order[::-1]


@dataclass
class Figure:
    """One row of the table: a ratio to its baseline, over paired rounds."""

    name: str
    what: str
    ratios: list[float]
    goal: str = ""
    unit: str = "x"
    extra: dict[str, Any] = field(default_factory=dict)
    #: The same pairing for CPU time per byte, where there is one: on a
    #: shared machine it varies far less than throughput.
    cpu: list[float] | None = None

    def line(self) -> str:
        q1, q3 = iqr(self.ratios)
        text = (
            f"{ROW} {self.name}: {self.what} = {median(self.ratios):.3f}{self.unit} "
            f"(IQR {q1:.3f} to {q3:.3f}, n={len(self.ratios)})"
        )
        if self.cpu is not None:
            c1, c3 = iqr(self.cpu)
            text += f"; CPU per byte {median(self.cpu):.3f}x (IQR {c1:.3f} to {c3:.3f})"
        if self.goal:
            text += f"; goal {self.goal}"
        for key, value in self.extra.items():
            text += f"; {key} {value}"
        return text

    def json(self) -> dict[str, Any]:
        q1, q3 = iqr(self.ratios)
        cpu: dict[str, Any] = {}
        if self.cpu is not None:
            c1, c3 = iqr(self.cpu)
            cpu = {"cpu_median": median(self.cpu), "cpu_q1": c1, "cpu_q3": c3}
        return {
            "name": self.name,
            "what": self.what,
            "median": median(self.ratios),
            "q1": q1,
            "q3": q3,
            "n": len(self.ratios),
            "goal": self.goal,
            **cpu,
            **self.extra,
        }


def environment() -> dict[str, str]:
    """Versions and machine, printed at the top of every run."""
    import cryptography
    import OpenSSL

    import twisted
    from twisted_rekey import __version__
    from twisted_rekey._binding import openssl_version

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "load average": load,
        "twisted_rekey": __version__,
        "twisted": twisted.__version__,
        "pyOpenSSL": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "openssl": openssl_version(),
        "commit": _commit(),
    }


def _commit() -> str:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class Certificates:
    """A throwaway CA and a certificate for localhost and 127.0.0.1."""

    def __init__(self) -> None:
        import trustme

        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1")

    def serverOptions(self, tls12: bool = False, sessions: bool = False) -> Any:
        from twisted.internet import ssl

        private = ssl.PrivateCertificate.loadPEM(
            self.cert.private_key_and_cert_chain_pem.bytes()
        )
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            enableSessions=sessions,
        )
        if tls12:
            # Not lowerMaximumSecurityTo: Twisted 23.10 excludes the maximum
            # itself too (twisted#10232).  CertificateOptions builds its
            # Context once and keeps it.
            from OpenSSL import SSL

            options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
        return options

    def clientOptions(self) -> Any:
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(
            "localhost", ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())
        )

    def contexts(self) -> tuple[Any, Any]:
        """A pyOpenSSL server and client Context, from files (which every
        pyOpenSSL release accepts)."""
        import tempfile

        from OpenSSL import SSL

        if not hasattr(self, "_files"):
            self._files = tempfile.TemporaryDirectory(prefix="twisted-rekey-bench-")
            self.writeTo(self._files.name)
        server = SSL.Context(SSL.TLS_METHOD)
        server.use_certificate_chain_file(os.path.join(self._files.name, "server.pem"))
        server.use_privatekey_file(os.path.join(self._files.name, "server.pem"))
        client = SSL.Context(SSL.TLS_METHOD)
        client.load_verify_locations(os.path.join(self._files.name, "ca.pem"))
        client.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        return server, client

    def writeTo(self, directory: str) -> None:
        self.cert.private_key_and_cert_chain_pem.write_to_path(
            os.path.join(directory, "server.pem")
        )
        self.ca.cert_pem.write_to_path(os.path.join(directory, "ca.pem"))

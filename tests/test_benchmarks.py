"""
The benchmark command runs end to end: ``python -m benchmarks --quick``
prints a row for every figure of docs/performance.rst.  Only the structure
of its output is checked, never a timing (those belong to the full run on
a quiet machine).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIGURES = [
    "send-1KiB-vs-pyopenssl",
    "keyupdate-1MiB-vs-bare",
    "keyupdate-64KiB-vs-bare",
    "keyupdate-requested-1MiB-vs-plain",
    "keyupdate-requested-64KiB-vs-plain",
    "renegotiation-full-4MiB-vs-bare",
    "renegotiation-resumed-4MiB-vs-bare",
    "watching-vs-plain",
    # The full run adds 1000 streams (benchmarks/__main__.py, FULL).
    *(f"streams-{n}-policy-vs-plain" for n in (1, 10, 100)),
    *(
        f"connections-{n}-{mode}-server-cpu"
        for n in (50, 100)
        for mode in ("watch", "policy", "bare")
    ),
    "memory-watch-per-idle-connection",
    "memory-policy-per-idle-connection",
    "cold-start-pyc",
    "cold-start-nopyc",
]

_ROW = re.compile(
    r"^FIGURE (?P<name>[\w-]+): .+ = (?P<median>\S+?)(x| ms| pt| KiB) "
    r"\(IQR (?P<q1>\S+) to (?P<q3>\S+), n=(?P<n>\d+)\)"
)


def test_quick_run_prints_every_figure(tmp_path: Path) -> None:
    saved = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        match = _ROW.match(line)
        if match:
            rows[match["name"]] = match
    assert sorted(rows) == sorted(FIGURES), out.stdout
    for name, row in rows.items():
        assert int(row["n"]) >= 1, name
        for key in ("median", "q1", "q3"):
            float(row[key])  # a number, NaN allowed when a window moved nothing
    # The throughput figures measured something in every round.
    assert not math.isnan(float(rows["keyupdate-1MiB-vs-bare"]["median"]))
    for key in ("python", "twisted", "pyOpenSSL", "cryptography", "openssl"):
        assert f"  {key}: " in out.stdout
    assert "done in " in out.stdout
    kept = json.loads(saved.read_text())
    assert sorted(f["name"] for f in kept["figures"]) == sorted(FIGURES)


def _memory(connections: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--connections", str(connections)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "PYTHONPATH": str(ROOT)},
    )


def test_memory_benchmark_runs() -> None:
    """
    ``python -m benchmarks.memory`` runs every mode in its own interpreter
    and prints one row each; its figures are not checked here.  A bad
    argument is a usage error.
    """
    out = _memory(5)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plain Twisted TLS: ")
    assert [line.split(":")[0] for line in lines[1:]] == ["mixin", "policy"]
    for line in lines[1:]:
        assert re.search(r": [+-][\d,]+ B per connection beyond plain \(samples ", line)
    bad = _memory(0)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr

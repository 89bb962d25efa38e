"""
Cold start: how long a fresh process takes from ``import twisted_rekey`` to
a usable ``key_update`` (importing the package, then resolving and
verifying ``SSL_key_update``), with the bytecode cache and without it.

Each sample is a new interpreter (the resolution is cached per process, so
only a new process shows its real cost).  "Without .pyc" points
``PYTHONPYCACHEPREFIX`` at an empty directory and sets
``PYTHONDONTWRITEBYTECODE``, so that every module (pyOpenSSL's and
Twisted's too) is compiled from source, as on a first run or a read-only
install.  Samples of every variant are interleaved; the baseline is
importing pyOpenSSL itself in the same conditions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

_PROBE = r"""
import json, time
t0 = time.perf_counter()
import OpenSSL.SSL
t1 = time.perf_counter()
result = {"import_pyopenssl": t1 - t0}
if MODE in ("resolve", "capabilities"):
    import twisted_rekey
    t2 = time.perf_counter()
    from twisted_rekey import _binding
    res, func = _binding.function("SSL_key_update")
    assert func is not None, res.reason
    t3 = time.perf_counter()
    result.update(import_twisted_rekey=t2 - t1, first_resolve=t3 - t2)
    if MODE == "capabilities":
        caps = twisted_rekey.capabilities()
        result["capabilities"] = time.perf_counter() - t3
        result["how"] = sorted({f.how for f in caps.functions})
print(json.dumps(result))
"""


def _sample(mode: str, pyc: bool) -> dict[str, Any]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        if not pyc:
            env.update(PYTHONPYCACHEPREFIX=empty, PYTHONDONTWRITEBYTECODE="1")
        out = subprocess.run(
            [sys.executable, "-c", f"MODE = {mode!r}\n" + _PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env=env,
        )
    return dict(json.loads(out.stdout))


def measure(runs: int) -> dict[str, list[dict[str, Any]]]:
    """Per variant (mode/pyc), one dict of timings per fresh interpreter."""
    from ._common import orders

    variants = ["resolve/pyc", "resolve/nopyc", "capabilities/pyc"]
    # Warm the bytecode cache, so that "with .pyc" means it.
    _sample("capabilities", True)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for order in orders(variants, runs):
        for v in order:
            mode, pyc = v.split("/")
            samples[v].append(_sample(mode, pyc == "pyc"))
    return samples


def figures(samples: dict[str, list[dict[str, Any]]]) -> list[Any]:
    from ._common import Figure, median

    figs = []
    for pyc in ("pyc", "nopyc"):
        rows = samples[f"resolve/{pyc}"]
        ours = [1000 * (r["import_twisted_rekey"] + r["first_resolve"]) for r in rows]
        base = [1000 * r["import_pyopenssl"] for r in rows]
        imports = [1000 * r["import_twisted_rekey"] for r in rows]
        label = "with .pyc" if pyc == "pyc" else "without .pyc"
        figs.append(
            Figure(
                f"cold-start-{pyc}",
                f"import twisted_rekey to usable key_update, {label}, ms",
                ours,
                "<= 50 ms",
                unit=" ms",
                extra={
                    "import": f"{median(imports):.1f} ms",
                    "resolve": (
                        f"{median([1000 * r['first_resolve'] for r in rows]):.1f} ms"
                    ),
                    "pyOpenSSL import (baseline)": f"{median(base):.1f} ms",
                },
            )
        )
    caps = samples["capabilities/pyc"]
    figs[0].extra["rest of capabilities()"] = (
        f"{median([1000 * r['capabilities'] for r in caps]):.2f} ms"
    )
    figs[0].extra["found by"] = ",".join(caps[0]["how"])
    return figs

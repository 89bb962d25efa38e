"""
The small size of ``benchmarks/stress.py``, in CI: many connections
rotating both ways with every byte checked, the fault cases, and hostile
peers dropped while a bystander keeps echoing.  It checks outcomes only;
the figures it prints are not asserted (they depend on the machine).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest_twisted

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "stress.py"


def _stress() -> Any:
    spec = importlib.util.spec_from_file_location("stress", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("stress", module)
    spec.loader.exec_module(module)
    return module


@pytest_twisted.ensureDeferred
async def test_small_stress_run() -> None:
    stress = _stress()
    size = stress.SMALL
    r = await stress.run(size)
    print(r.report())
    assert r.connections == 2 * size.connections
    assert r.failed == {}
    assert r.digests_matched == r.connections
    assert r.bytes_checked == 2 * r.connections * size.stream
    # Both sides rotate, on both versions (TLS 1.2: the server renegotiates).
    for key in ("TLS 1.3 client", "TLS 1.3 server", "TLS 1.2 server"):
        assert r.rotations[key] >= size.connections, key
    assert r.faults["reset while a request waits"] == "PeerRefused"
    assert r.faults["keyUpdate after loseConnection"] == "ConnectionStateError"
    assert r.faults["client renegotiation refused"] == "PeerRefused"
    for closer in ("client", "server"):
        assert r.faults[f"{closer} closes during renegotiation"].startswith("closed")
    for case, h in r.hostile.items():
        assert h["ok"], (case, h)
    # Per message: the server stops at the bound, not at the end of the read.
    assert r.hostile["one write of 2427 KeyUpdates"]["processed"] == 33
    assert r.hostile["update_requested on every record"]["processed"] <= 65
    assert r.hostile["renegotiating in a loop"]["processed"] <= 3
    assert r.bystander_echoes > 0 and not r.bystander_lost
    assert r.delayed_calls_left == 0

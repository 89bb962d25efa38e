"""
``examples/pyopenssl_socket.py`` runs as written and prints its proofs: the
server read our KeyUpdate and the client read its answer (TLS 1.3), or the
server read a second ClientHello and the exported keys changed (TLS 1.2).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from twisted_rekey import capabilities

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pyopenssl_socket.py"


def run_example(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        # Runs from elsewhere, as a user would: nothing borrowed from tests/.
        cwd=EXAMPLE.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


@pytest.mark.skipif(not capabilities().key_update, reason="no key update here")
def test_tls13_key_update() -> None:
    lines = run_example()
    assert re.match(r"connected: TLSv1\.3 \S+ to 127\.0\.0\.1:\d+$", lines[0])
    assert lines[1:] == [
        "echo before: 87 bytes intact",
        "client: key_update(request_peer=True) sent",
        'proof: server read our KeyUpdate ("TLSv1.3 read client key update")',
        "proof: server's answer was pending until its echo "
        "(get_key_update_type: NOT_REQUESTED)",
        'proof: client read the server\'s KeyUpdate ("TLSv1.3 read server key update")',
        "echo after: 86 bytes intact under the new keys",
        "OK: keys rotated, every byte echoed",
    ]


def test_tls12_renegotiation() -> None:
    lines = run_example("--tls1_2")
    assert re.match(r"connected: TLSv1\.2 \S+ to 127\.0\.0\.1:\d+$", lines[0])
    assert "client: rekey() started a renegotiation" in lines
    assert "proof: renegotiation complete (total_renegotiations: 1)" in lines
    assert "proof: server read a second ClientHello" in lines
    (changed,) = [x for x in lines if x.startswith("proof: keying material changed")]
    before, after = re.findall(r"([0-9a-f]{16})\.\.\.", changed)
    assert before != after
    (same,) = [x for x in lines if "server exports the same" in x]
    assert after in same
    assert lines[-1] == "OK: keys rotated, every byte echoed"


def test_failure_is_reported() -> None:
    """A bad option is refused before anything runs (argparse, exit 2)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tls1_1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "unrecognized arguments: --tls1_1" in done.stderr

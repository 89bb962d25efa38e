"""
The Twisted examples in ``examples/`` run as written: ``twisted_mixin.py``
by itself, ``echo_client.py`` against a real ``twistd -n rekey-echo``.
(``pyopenssl_socket.py`` has its own test, ``test_example_pyopenssl.py``.)
Each runs from the examples directory, as a user would, and is bounded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_plugins import FAST, client_stats, rekey_echo, run_echo_client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_twisted_mixin_runs_by_itself() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "twisted_mixin.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=EXAMPLES,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert "client: keyUpdate(requestPeer=True) answered" in lines
    # The answer to our request, and at least one rotation of the server's
    # own policy.
    assert lines.count("client: the server rotated its sending keys") >= 2, lines
    sent, received = map(int, re.findall(r"\d+", lines[-1]))
    assert sent >= 1 and received >= 2


def test_echo_client_against_rekey_echo(tmp_path: Path) -> None:
    with rekey_echo(tmp_path, *FAST) as server:
        lines = run_echo_client(server.port, tmp_path / "state" / "localhost.pem")
        # The defaults: 8 chunks of 64 KiB, a rotation after each.
        assert re.match(r"connected: TLSv1\.3 \S+ to 127\.0\.0\.1:\d+$", lines[0])
        assert lines[1:9] == [
            f"chunk {i}: 65536 bytes echoed intact, keys rotated" for i in range(1, 9)
        ]
        assert lines[-1] == "OK: 524288 bytes echoed intact, 8 rotations answered"
        stats = client_stats(lines)
        assert stats["keyUpdatesRequested"] == 8
        assert stats["keyUpdatesReceived"] >= 8
        server.wait_for("closed: ")
        # Answers are logged at most once a second, with their number.
        answered = re.findall(r"answered (\d+) KeyUpdate request", server.log)
        assert sum(map(int, answered)) == 8


def test_echo_client_verifies_the_server(tmp_path: Path) -> None:
    with rekey_echo(tmp_path) as server:
        # Verification on: the wrong name is refused, exit 1, one line.
        done = subprocess.run(
            [
                sys.executable,
                str(EXAMPLES / "echo_client.py"),
                "--port",
                str(server.port),
                "--cafile",
                str(tmp_path / "state" / "localhost.pem"),
                "--servername",
                "example.com",
                "--timeout",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=EXAMPLES,
        )
        assert done.returncode == 1
        assert done.stderr.startswith("FAILED: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

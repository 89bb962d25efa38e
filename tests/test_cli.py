"""
``python -m twisted_rekey``: the ``info`` command, the help text's exit codes,
and the probe's handling of bad input (one line on stderr, a documented exit
code, never a traceback).  Probes against real servers are in
``test_probe.py``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import OpenSSL
import pytest

import twisted
import twisted_rekey
from twisted_rekey import capabilities
from twisted_rekey.apps.probe import parse_target

# Every run is bounded: a hung CLI fails the test instead of the suite.
_RUN_TIMEOUT = 30


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted_rekey", *args],
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- info ------------------------------------------------------------------------


def test_info_human() -> None:
    caps = capabilities()
    done = run_cli("info")
    assert done.returncode == (0 if caps.key_update else 4), done.stderr
    out = done.stdout
    expected = "available" if caps.key_update else "NOT available"
    assert f"key update (TLS 1.3):        {expected}" in out
    for resolution in caps.functions:
        line = next(x for x in out.splitlines() if f"{resolution.name}:" in x)
        if resolution.available:
            assert f"found via {resolution.how}" in line
        else:
            assert "unavailable:" in line
    assert caps.openssl_version in out
    assert f"cryptography:   {caps.cryptography_version}" in out
    assert str(Path(twisted_rekey.__file__)) in out
    assert "Twisted:" in out


def test_info_json() -> None:
    caps = capabilities()
    done = run_cli("info", "--json")
    assert done.returncode == (0 if caps.key_update else 4)
    data = json.loads(done.stdout)
    assert data["key_update"] is caps.key_update
    assert data["renegotiation"] is caps.renegotiation
    assert data["abbreviated_renegotiation"] is caps.abbreviated_renegotiation
    assert data["openssl"] == caps.openssl_version
    assert data["cryptography"] == caps.cryptography_version
    assert data["twisted_rekey_path"] == twisted_rekey.__file__
    assert data["pyopenssl"] == OpenSSL.__version__
    assert data["twisted"] == twisted.__version__
    assert set(data["functions"]) == {r.name for r in caps.functions}
    key_update = data["functions"]["SSL_key_update"]
    assert key_update["how"] in ("cffi", "dynamic", "symtab", None)
    assert key_update["available"] is (key_update["how"] is not None)


def test_info_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """``main()`` is the console script's entry point; it returns the code."""
    from twisted_rekey.apps.cli import main

    code = main(["info", "--json"])
    assert code == (0 if capabilities().key_update else 4)
    assert json.loads(capsys.readouterr().out)["key_update"] is (code == 0)


def test_help_documents_exit_codes() -> None:
    for args in (["--help"], ["probe", "--help"], ["info", "--help"]):
        done = run_cli(*args)
        assert done.returncode == 0
        for code in ("0", "1", "2", "3", "4", "5"):
            assert f"\n  {code}  " in done.stdout, (args, done.stdout)
    probe_help = run_cli("probe", "--help").stdout
    for option in ("--servername", "--cafile", "--insecure", "--tls-version"):
        assert option in probe_help
    for option in ("--tls1_2", "--tls1_3", "--timeout", "--json", "--send"):
        assert option in probe_help


def test_no_command_is_a_usage_error() -> None:
    done = run_cli()
    assert done.returncode == 2
    assert "usage:" in done.stderr


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "must be a number"),
        ("127.0.0.1:http", "must be a number"),
        ("127.0.0.1:0", "between 1 and 65535"),
        ("127.0.0.1:65536", "between 1 and 65535"),
        ("::1:443", "brackets"),
        ("[::1]443", "[ADDRESS]:PORT"),
        (":443", "no host"),
    ],
)
def test_bad_target(target: str, message: str) -> None:
    done = run_cli("probe", target)
    assert done.returncode == 2
    assert message in assert_one_line_error(done)
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "127.0.0.1:1", "--tls-version", "1.1"],
        ["probe", "127.0.0.1:1", "--tls1_2", "--tls1_3"],
        ["probe", "127.0.0.1:1", "--timeout", "soon"],
        ["probe", "127.0.0.1:1", "--timeout", "0"],
        ["probe", "127.0.0.1:1", "--insecure", "--cafile", "x.pem"],
        ["probe", "127.0.0.1:1", "--cafile", "/nonexistent/ca.pem"],
        ["frobnicate"],
    ],
)
def test_usage_errors_are_one_line(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert_one_line_error(done)


def test_cafile_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    done = run_cli("probe", "127.0.0.1:1", "--cafile", str(junk))
    assert done.returncode == 2
    assert "cannot load CA certificates" in assert_one_line_error(done)


def _closed_port(family: socket.AddressFamily, host: str) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_connection_refused() -> None:
    port = _closed_port(socket.AF_INET, "127.0.0.1")
    done = run_cli("probe", f"127.0.0.1:{port}", "--timeout", "2")
    assert done.returncode == 3
    line = assert_one_line_error(done)
    assert f"cannot connect to 127.0.0.1:{port}" in line
    assert "refused" in line.lower()


def test_connection_refused_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = _closed_port(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    done = run_cli("probe", f"[::1]:{port}", "--timeout", "2", "--json")
    assert done.returncode == 3
    assert f"[::1]:{port}" in assert_one_line_error(done)
    assert json.loads(done.stdout)["exit_code"] == 3


def test_unresolvable_name() -> None:
    # .invalid never resolves (RFC 6761); a resolver that cannot be reached
    # fails the same way, with one line.
    done = run_cli("probe", "no-such-host.invalid:443", "--timeout", "2")
    assert done.returncode == 3
    assert "cannot resolve 'no-such-host.invalid'" in assert_one_line_error(done)


def test_handshake_timeout() -> None:
    """A server that accepts and then says nothing: bounded by --timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        done = run_cli("probe", f"127.0.0.1:{port}", "--timeout", "0.5")
    assert done.returncode == 3
    line = assert_one_line_error(done)
    assert "no handshake succeeded" in line
    assert "timed out during the handshake" in line
    assert "TLS 1.3" in done.stdout and "TLS 1.2" in done.stdout


def test_not_tls() -> None:
    """A server that answers with something that is not TLS."""
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def answer() -> None:
            for _ in range(2):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" * 4)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        done = run_cli("probe", f"127.0.0.1:{port}", "--timeout", "2")
        thread.join(10)
    assert not thread.is_alive()
    assert done.returncode == 3
    assert "handshake failed" in assert_one_line_error(done)


def test_parse_target() -> None:
    assert parse_target("example.test:443") == ("example.test", 443)
    assert parse_target("[::1]:8443") == ("::1", 8443)
    assert parse_target("127.0.0.1:1") == ("127.0.0.1", 1)
    with pytest.raises(ValueError, match="no port"):
        parse_target("example.test")


def test_internal_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug inside the probe still ends in one line and exit code 5."""
    from twisted_rekey.apps import cli

    def broken(options: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "probe", broken)
    assert cli.main(["probe", "127.0.0.1:1"]) == 5
    err = capsys.readouterr().err
    assert err == "twisted-rekey: internal error: RuntimeError: simulated bug\n"

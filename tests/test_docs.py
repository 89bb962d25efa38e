"""
The documentation builds, and the README says what is true.

The Sphinx build runs with warnings as errors and every cross-reference
checked (nitpicky), the way a release would build it, with the inventories of
Python, Twisted, pyOpenSSL and cryptography shipped in docs/inventories/: it
must never need the network.  The README's two examples are run, not just read: the
pyOpenSSL one as a client of a local server, the Twisted one as a server
that a pyOpenSSL client rotates keys with.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from OpenSSL import SSL

from twisted_rekey import key_update

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# The commands a fresh machine runs, exactly as the project promises them.
EXAMPLE_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && "
    ".venv/bin/twistd -n rekey-echo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[tests,lint,docs]' && "
    ".venv/bin/python -m pytest"
)


def _build(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    sphinx = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    return subprocess.run(
        [*sphinx, "docs", str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _check_build(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        pytest.fail(
            "the documentation does not build with warnings as errors:\n"
            + result.stdout
            + result.stderr
        )


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    _check_build(_build(out))
    return out


def test_docs_build(built_docs: Path) -> None:
    api = (built_docs / "api.html").read_text(encoding="utf-8")
    import twisted_rekey

    # The reference follows __all__, lazily served names and __version__
    # included.
    missing = [
        name
        for name in twisted_rekey.__all__
        if f'id="twisted_rekey.{name}"' not in api
    ]
    assert not missing, f"public names missing from the API reference: {missing}"
    # The pages say which release they document, and carry its changelog.
    index = (built_docs / "index.html").read_text(encoding="utf-8")
    assert f"twisted_rekey {twisted_rekey.__version__}" in index
    changelog = (built_docs / "changelog.html").read_text(encoding="utf-8")
    assert f"twisted_rekey {twisted_rekey.__version__} (" in changelog


def test_docs_link_through_shipped_inventories(built_docs: Path) -> None:
    """
    Links into the other projects' documentation come from inventories in
    the repository (a build never fetches one), and they resolve.
    """
    namespace: dict[str, Any] = {"__file__": str(ROOT / "docs" / "conf.py")}
    exec((ROOT / "docs" / "conf.py").read_text(encoding="utf-8"), namespace)
    mapping = namespace["intersphinx_mapping"]
    assert {"python", "twisted", "pyopenssl", "cryptography"} <= mapping.keys()
    for name, (_url, inventory) in mapping.items():
        path = Path(inventory)
        assert path.is_file(), f"{name}: {path} is not shipped"
        assert ROOT / "docs" in path.parents
    assert namespace["nitpicky"] is True

    pages = "".join(p.read_text(encoding="utf-8") for p in built_docs.glob("*.html"))
    for link in (
        "https://www.pyopenssl.org/en/stable/api/ssl.html#OpenSSL.SSL.Connection",
        "https://docs.twisted.org/en/stable/api/twisted.internet.defer.Deferred.html",
        "https://docs.python.org/3/library/enum.html#enum.IntEnum",
    ):
        assert f'href="{link}"' in pages, link


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def _block(containing: str) -> str:
    found = [b for b in _python_blocks() if containing in b]
    assert len(found) == 1, f"expected one README example with {containing!r}"
    return found[0]


def test_readme_commands() -> None:
    blocks = re.findall(r"^```sh\n(.*?)\n```", README, re.MULTILINE | re.DOTALL)
    assert EXAMPLE_COMMAND in blocks
    assert TEST_COMMAND in blocks
    # CI runs the same: the extras the README installs, then pytest.
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[tests,lint,docs]'" in ci
    assert '"$venv/bin/python" -m pytest' in ci


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    where = tmp_path_factory.mktemp("readme")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(where / "server.pem"))
    return where


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo_server(certificates: Path) -> Iterator[int]:
    """A Python ``ssl`` echo server (a TLS stack other than ours)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certificates / "server.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        try:
            raw, _ = listener.accept()
            raw.settimeout(30)
            with ctx.wrap_socket(raw, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
        thread.join(35)


def test_readme_pyopenssl_example(certificates: Path, echo_server: int) -> None:
    source = _block("key_update(conn")
    assert "8443" in source
    done = subprocess.run(
        [sys.executable, "-c", source.replace("8443", str(echo_server))],
        cwd=certificates,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello" in done.stdout


def _connect(port: int, cafile: Path, deadline: float) -> Any:
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    # Blocking, as pyOpenSSL wants it, but bounded by the kernel.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 15, 0))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_PEER)
    ctx.load_verify_locations(str(cafile))
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    conn.do_handshake()
    return conn


def _read_exactly(conn: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += conn.recv(size - len(data))
    return data


def test_readme_twisted_example(certificates: Path) -> None:
    port = _free_port()
    source = _block("RekeyProtocolMixin")
    assert "8443" in source
    server = subprocess.Popen(
        [sys.executable, "-u", "-c", source.replace("8443", str(port))],
        cwd=certificates,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        conn = _connect(port, certificates / "ca.pem", time.monotonic() + 30)
        conn.sendall(b"before\n")
        assert _read_exactly(conn, 7) == b"before\n"
        key_update(conn, request_peer=True)
        conn.sendall(b"after\n")
        assert _read_exactly(conn, 6) == b"after\n"
        conn.shutdown()
        conn.close()
        # The example serves until stopped.  Its hook printed (unbuffered)
        # before it echoed "after", so the line is already in the pipe.
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "asked us to as well: True" in output, output

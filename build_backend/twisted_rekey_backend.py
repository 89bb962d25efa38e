"""
twisted_rekey's build backend: setuptools, with one change to editable
installs.

For twistd to find rekey-echo and rekey-tunnel, a ``twisted/plugins/``
directory holding the plugin module must sit in a ``sys.path`` entry:
Twisted's plugin loader lists ``twisted/plugins`` under every entry, and
cannot see through the import hook setuptools otherwise uses for an editable
install.  setuptools' editable install therefore puts the repository root on
``sys.path``, which makes everything at the root importable too (``import
examples``, ``import docs``, ``import benchmarks``).

This backend builds the same editable wheel, then points its ``.pth`` file at
``build/__editable__.twisted_rekey/`` instead: a directory holding two links,
``twisted_rekey`` and ``twisted/plugins``, to the directories of the checkout.
Only what a regular install provides is importable, and, the links being
directories, a module added to the checkout is importable without
reinstalling.  Where directory links cannot be made (Windows without the
privilege), the wheel is left as setuptools made it.

Every other hook (wheel, sdist, metadata) is setuptools' own, unchanged.
This module must never change what a wheel or an sdist contains.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the other hooks, unchanged)

_ROOT = Path(__file__).resolve().parent.parent
_TREE = _ROOT / "build" / "__editable__.twisted_rekey"
# link in the tree -> directory of the checkout
_LINKS = {"twisted_rekey": "twisted_rekey", "twisted/plugins": "twisted/plugins"}


def _make_tree() -> bool:
    if _TREE.is_symlink() or _TREE.is_file():
        _TREE.unlink()
    elif _TREE.exists():
        shutil.rmtree(_TREE)
    try:
        for link, source in _LINKS.items():
            where = _TREE / link
            where.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(_ROOT / source, where, target_is_directory=True)
    except OSError:
        shutil.rmtree(_TREE, ignore_errors=True)
        return False
    return True


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _points_at_root(content: bytes) -> bool:
    lines = [line.strip() for line in content.decode("utf-8").splitlines()]
    paths = [line for line in lines if line and not line.startswith("#")]
    return len(paths) == 1 and Path(paths[0]).resolve() == _ROOT


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    name: str = _setuptools.build_editable(
        wheel_directory, config_settings, metadata_directory
    )
    wheel = Path(wheel_directory) / name
    with zipfile.ZipFile(wheel) as archive:
        infos = archive.infolist()
        contents = {info.filename: archive.read(info) for info in infos}
    pth = [
        n
        for n, data in contents.items()
        if "/" not in n and n.endswith(".pth") and _points_at_root(data)
    ]
    # Another layout of setuptools' (a link tree with editable_mode=strict,
    # an import hook) already keeps the root off sys.path: leave it.
    if len(pth) != 1 or not _make_tree():
        return name
    contents[pth[0]] = f"{_TREE}\n".encode()
    (record,) = [n for n in contents if n.endswith(".dist-info/RECORD")]
    rows = []
    for row in contents[record].decode("utf-8").splitlines():
        path = row.rsplit(",", 2)[0]
        if path == pth[0]:
            data = contents[path]
            row = f"{path},{_record_hash(data)},{len(data)}"
        rows.append(row)
    contents[record] = ("\n".join(rows) + "\n").encode()
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as archive:
        for info in infos:
            archive.writestr(info, contents[info.filename])
    os.replace(rewritten, wheel)
    return name

"""
What a user or a packager gets from an install, an sdist or a release: the
version, the project's URLs, what an install makes importable, twistd's view
of the plugins, the plugin cache, the changelog rendered from its fragments,
and an sdist that carries everything its own tests read.

Every command runs as a subprocess from a directory outside the checkout, so
that the current directory puts nothing on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

import twisted_rekey

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The command Twisted's documentation gives to regenerate the plugin cache.
REGENERATE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# Directories whose every file the sdist must carry (tests read them).
SHIPPED = (
    "tests",
    "docs",
    "examples",
    "benchmarks",
    "newsfragments",
    "build_backend",
    ".ci",
)


def _run(
    args: list[str], cwd: Path, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """
    What the environment says of the installed distribution, asked from
    outside the checkout: run from it, its ``twisted_rekey.egg-info`` (which
    a build leaves there) would answer instead.
    """
    script = (
        "import json\n"
        "from importlib import metadata\n"
        "d = metadata.distribution('twisted_rekey')\n"
        "print(json.dumps({'version': d.version,\n"
        "    'urls': d.metadata.get_all('Project-URL') or [],\n"
        "    'direct_url': json.loads(d.read_text('direct_url.json') or '{}')}))\n"
    )
    done = _run([sys.executable, "-I", "-c", script], tmp_path_factory.mktemp("m"))
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    found["urls"] = dict(entry.split(", ", 1) for entry in found["urls"])
    return found


def test_version(tmp_path: Path, installed: dict[str, Any]) -> None:
    done = _run([sys.executable, "-m", "twisted_rekey", "--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"twisted-rekey {installed['version']}\n"
    assert twisted_rekey.__version__ == installed["version"]


def test_project_urls(installed: dict[str, Any]) -> None:
    urls = installed["urls"]
    assert {"Homepage", "Documentation", "Source", "Changelog", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_readme_links_are_absolute_and_reach_real_pages(
    installed: dict[str, Any],
) -> None:
    """
    The README is also the index's page, where a relative link leads
    nowhere; each link into the repository names a file that exists.
    """
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links
    assert [link for link in links if not link.startswith("https://")] == []
    repository = installed["urls"]["Source"]
    for link in links:
        if link.startswith(repository + "/"):
            path = re.sub(r"^/(blob|tree)/main/", "", link[len(repository) :])
            assert (ROOT / path.split("#")[0]).exists(), link
    # From the index first, from a checkout second.
    index = README.index("pip install twisted_rekey")
    assert index < README.index("pip install -e .")


def test_only_the_package_and_the_plugins_are_importable(tmp_path: Path) -> None:
    """
    An install, editable or not, adds ``twisted_rekey`` and the plugin
    module, and nothing else of the checkout, to what Python can import.
    """
    script = (
        "import importlib.util, json\n"
        "names = ['examples', 'docs', 'benchmarks', 'tests', 'build_backend',\n"
        "         'twisted_rekey_backend', 'conftest', 'peers', 'memorypair',\n"
        "         'tls13', 'newsfragments']\n"
        "found = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "import twisted_rekey, twisted.plugins.twisted_rekey_plugins as p\n"
        "print(json.dumps({'found': found, 'plugins': p.__file__}))\n"
    )
    # -I: neither the current directory nor PYTHONPATH on sys.path.
    done = _run([sys.executable, "-I", "-c", script], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["found"] == []
    assert Path(result["plugins"]).name == "twisted_rekey_plugins.py"


def test_editable_install_twistd_lists_the_plugins(
    tmp_path: Path, installed: dict[str, Any]
) -> None:
    """
    In the editable install the README makes, twistd still finds the
    plugins, although the checkout itself is not on ``sys.path``.
    """
    if not installed["direct_url"].get("dir_info", {}).get("editable"):
        pytest.skip("twisted_rekey is not installed in editable mode here")
    done = _run([sys.executable, "-I", "-c", "import examples"], tmp_path)
    assert done.returncode != 0
    assert "No module named 'examples'" in done.stderr
    done = _run([TWISTD, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+rekey-echo\s", done.stdout, re.M)
    assert re.search(r"^\s+rekey-tunnel\s", done.stdout, re.M)
    # The package runs from this checkout, through the link the editable
    # install made.
    assert Path(twisted_rekey.__file__).resolve().parent == ROOT / "twisted_rekey"


def _plugins_directory(tmp_path: Path) -> Path:
    done = _run(
        [
            sys.executable,
            "-I",
            "-c",
            "import twisted.plugins.twisted_rekey_plugins as p; print(p.__file__)",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip()).parent


# Lists the plugins as twistd does, with Twisted's log on stdout (twistd logs
# the plugin cache's troubles the same way once its log has begun).
LIST_PLUGINS = (
    "import sys\n"
    "from twisted.application.service import IServiceMaker\n"
    "from twisted.plugin import getPlugins\n"
    "from twisted.python import log\n"
    "log.startLogging(sys.stdout)\n"
    "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
)


def test_plugin_cache_regenerated_for_a_read_only_environment(
    tmp_path: Path,
) -> None:
    """
    A user who cannot write where the plugins are installed gets "Unable to
    write to plugin cache" each time the plugins are listed, until the owner
    of the environment runs the command the documentation gives; after it,
    that user lists them without a word about the cache.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv(1) to run as another user")
    plugins = _plugins_directory(tmp_path)
    cache = plugins / "dropin.cache"
    tmp_path.chmod(0o777)
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "HOME": str(tmp_path)}
    if _run([*as_nobody, sys.executable, "-c", "pass"], tmp_path).returncode:
        pytest.skip("the other user cannot run this environment's python")
    if plugins.stat().st_uid != 0:
        pytest.skip(f"{plugins} is not owned by root")

    cache.unlink(missing_ok=True)
    try:
        stale = _run(
            [*as_nobody, sys.executable, "-c", LIST_PLUGINS], tmp_path, env=env
        )
        assert stale.returncode == 0, stale.stderr
        assert "Unable to write to plugin cache" in stale.stdout, stale.stdout
        assert "'rekey-echo'" in stale.stdout
        assert not cache.exists()

        done = _run([sys.executable, "-c", REGENERATE], tmp_path)
        assert done.returncode == 0, done.stderr
        assert b"twisted_rekey_plugins" in cache.read_bytes()

        fresh = _run(
            [*as_nobody, sys.executable, "-c", LIST_PLUGINS], tmp_path, env=env
        )
        assert fresh.returncode == 0, fresh.stderr
        assert "plugin cache" not in fresh.stdout, fresh.stdout
        assert "'rekey-echo'" in fresh.stdout
        assert "'rekey-tunnel'" in fresh.stdout
    finally:
        # Leave a cache the owner wrote, as after the documented step.
        _run([sys.executable, "-c", REGENERATE], tmp_path)


def test_changelog_draft(tmp_path: Path) -> None:
    """
    ``towncrier build --draft`` renders the next release's section, every
    fragment in it (a misnamed fragment fails the build).
    """
    done = _run(
        [sys.executable, "-m", "towncrier", "build", "--draft", "--dir", str(ROOT)],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    fragments = [
        p
        for p in (ROOT / "newsfragments").iterdir()
        if p.is_file() and not p.name.startswith(("README", "."))
    ]
    for fragment in fragments:
        kind = fragment.name.split(".")[-2]
        if kind != "misc":
            text = " ".join(fragment.read_text(encoding="utf-8").split())
            assert text in " ".join(done.stdout.split()), fragment.name
    if not fragments:
        assert "No significant changes" in done.stdout
    changelog = (ROOT / "CHANGELOG.rst").read_text(encoding="utf-8")
    assert ".. towncrier release notes start" in changelog
    assert re.search(r"^twisted_rekey 0\.1\.0 \(", changelog, re.M)


def _tracked(under: str) -> set[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    done = _run(["git", "ls-files", "-z", "--", under], ROOT)
    if done.returncode != 0:
        return None
    return {name for name in done.stdout.split("\0") if name}


def test_sdist_ships_what_its_tests_need(tmp_path: Path) -> None:
    """
    The sdist holds every tracked file of the directories its tests read
    (by pattern, so a new test file or folder ships too) and no build
    leftovers.  From a checkout only: an unpacked sdist has no git to ask.
    """
    tracked = {name for under in SHIPPED for name in _tracked(under) or ()}
    if not tracked:
        pytest.skip("not a git checkout")
    done = _run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), "."],
        ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (sdist,) = tmp_path.glob("twisted_rekey-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    missing = sorted(
        name for name in tracked if (ROOT / name).is_file() and name not in names
    )
    assert missing == []
    for wanted in (
        "tests/conftest.py",
        "tests/peers.py",
        "tests/memorypair.py",
        "tests/tls13.py",
        "CHANGELOG.rst",
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "twisted/plugins/twisted_rekey_plugins.py",
        "twisted_rekey/py.typed",
        "twisted_rekey/apps/echo.py",
        "twisted_rekey/apps/tunnel.py",
    ):
        assert wanted in names
    leftovers = [
        name
        for name in names
        if "__pycache__" in name
        or name.endswith((".pyc", "dropin.cache"))
        or name.startswith(("build/", "docs/_build/"))
    ]
    assert leftovers == []


def test_wheel_ships_the_package_its_apps_and_the_plugins(tmp_path: Path) -> None:
    """
    The wheel holds every module of the package, the applications'
    subpackage included, and the twistd plugin file that names them.
    """
    modules = _tracked("twisted_rekey")
    if not modules:
        pytest.skip("not a git checkout")
    done = _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), "."],
        ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("twisted_rekey-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    wanted = {name for name in modules if name.endswith((".py", "py.typed"))}
    wanted.add("twisted/plugins/twisted_rekey_plugins.py")
    assert sorted(wanted - names) == []
    assert "twisted_rekey/apps/echo.py" in names

"""
How long a fresh process takes from ``import twisted_rekey`` to a usable
``key_update``: importing the package, then resolving and verifying
``SSL_key_update`` (and everything ``capabilities()`` reports).

Each sample is a new interpreter (the resolution is cached per process, so
only a new process shows its real cost).  Samples of the three variants are
interleaved, so machine noise hits them alike; medians are printed, with the
ratio to the baseline of importing pyOpenSSL alone.  If pyelftools is
installed, a naive walk over the same symbol table is measured beside it.

Usage: python benchmarks/bench_resolve.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TARGET_MS = 50.0

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
if MODE == "pyelftools":
    from elftools.elf.elffile import ELFFile
    from cryptography.hazmat.bindings import _rust
    t2 = time.perf_counter()
    with open(_rust.__file__, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        found = [s for s in symtab.iter_symbols() if s.name == "SSL_key_update"]
    assert found
    result["naive_walk"] = time.perf_counter() - t2
print(json.dumps(result))
"""


def _sample(mode: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", f"MODE = {mode!r}\n" + _PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(out.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    modes = ["baseline", "resolve", "capabilities"]
    try:
        import elftools  # noqa: F401

        modes.append("pyelftools")
    except ImportError:
        pass
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:  # interleaved: noise hits every variant alike
            samples[mode].append(_sample(mode))

    def median_ms(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[mode]) * 1000

    base = median_ms("baseline", "import_pyopenssl")
    imp = median_ms("resolve", "import_twisted_rekey")
    res = median_ms("resolve", "first_resolve")
    caps = median_ms("capabilities", "capabilities")
    ours = imp + res
    print(f"runs per variant: {args.runs} (medians, fresh interpreter each)")
    print(f"import OpenSSL.SSL (baseline, not ours):   {base:8.2f} ms")
    print(f"import twisted_rekey (after pyOpenSSL):    {imp:8.2f} ms")
    print(f"first key_update resolution + checks:      {res:8.2f} ms")
    print(f"rest of capabilities() after that:         {caps:8.2f} ms")
    print(f"import -> usable key_update:               {ours:8.2f} ms")
    print(f"  ratio to importing pyOpenSSL itself:     {ours / base:8.2f}x")
    print(f"  found by: {samples['capabilities'][0].get('how')}")
    if "pyelftools" in samples:
        naive = median_ms("pyelftools", "naive_walk")
        print(f"naive pyelftools walk of .symtab:          {naive:8.2f} ms")
        print(f"  speed-up of our lookup over it:          {naive / res:8.1f}x")
    verdict = "within" if ours <= TARGET_MS else "OVER"
    print(f"target {TARGET_MS:.0f} ms: {verdict}")
    return 0 if ours <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())

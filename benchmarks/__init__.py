"""
twisted_rekey's benchmarks: ``python -m benchmarks [--quick]``.

Every figure is measured against its baseline in the same run, in
alternating rounds, over loopback only; see ``docs/performance.rst``.
"""

"""asv benchmark suites for bilevel (see docs/performance.md).

Run with ``asv run --python=same --quick --bench bench_core`` from the repository root,
or the same measurements without asv: ``python -m benchmarks.run_core``.
"""

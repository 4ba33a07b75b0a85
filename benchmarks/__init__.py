"""asv benchmark suites for bilevel (see docs/performance.md).

Run with ``asv run --python=same --quick --bench bench_core`` from the repository root,
or the same measurements without asv: ``python -m benchmarks.run_core``.
"""

import os
import sys

# asv runs the suites in a clean environment (no PYTHONPATH): measure the checkout these
# benchmarks live in, whether or not bilevel is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

"""``pipeline`` with the test-only ops registered: ``python tests/run_with_testops.py run ...``.

``tests/`` goes on PYTHONPATH first, so that every process of the run (lanes and transform
processes, by forkserver or spawn) can import ``testops`` when it unpickles one of its ops.
"""

from __future__ import annotations

import os
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)

if __name__ == "__main__":
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [TESTS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    import testops  # noqa: F401  (registers _crash and _sleep)

    from pipeline.cli import main

    raise SystemExit(main())

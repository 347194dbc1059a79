"""``vlmrun-cache serve`` with uvicorn's access log off, for the benchmark's log-off row while
``serve`` has no ``access_log`` setting of its own.

    python bench/no_access_log.py serve --port N ...     # the same arguments as vlmrun-cache

Everything else is ``serve`` as it is: its one ``uvicorn.run`` call gets ``access_log=False``,
so uvicorn gives its access logger no handler and its protocols skip the line (an argument
``serve`` passes itself wins). bench/common.py uses the proxy's own setting once it has one.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.cli import main

if __name__ == "__main__":
    uvicorn.run = functools.partial(uvicorn.run, access_log=False)
    raise SystemExit(main(sys.argv[1:]))

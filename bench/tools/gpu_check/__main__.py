"""Entry point of ``python -m bench.tools.gpu_check`` (``make gpu-check``)."""

from __future__ import annotations

import sys

from bench.tools.gpu_check.runner import main

if __name__ == "__main__":
    sys.exit(main())

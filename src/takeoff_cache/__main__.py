"""``python -m takeoff_cache``: the command line, where its script is not on PATH.

A companion whose install is a virtual environment or a container can name its
tool as ``/opt/venv/bin/python -m takeoff_cache`` (``--companion-tool``).
"""

import sys

from takeoff_cache.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m workbench``: the ``workbench`` command line (see :mod:`workbench.batch.cli`)."""

import sys

from workbench.batch.cli import main

if __name__ == "__main__":  # guarded: Dask's worker processes re-import the main module
    sys.exit(main())

"""`python -m petlkit ...`: the `petlkit` command without its installed script (e.g. with
PYTHONPATH=src on a machine where the package is not installed)."""

import sys

from petlkit.cli import main

sys.exit(main())

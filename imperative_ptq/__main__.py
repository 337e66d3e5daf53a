"""``python -m imperative_ptq``: the command line (see :mod:`imperative_ptq.cli`)."""

import sys

from .cli import main

sys.exit(main())

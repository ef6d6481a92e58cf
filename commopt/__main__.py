"""``python -m commopt ...`` runs the command line (see :mod:`commopt.cli`)."""

import sys

from commopt.cli import main

sys.exit(main())

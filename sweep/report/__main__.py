"""``python -m sweep.report``."""

import sys

from .build import cli

sys.exit(cli())

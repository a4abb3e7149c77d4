"""``python -m reftkit``: the command line of :mod:`reftkit.cli`."""
import sys

from .cli import main

sys.exit(main())

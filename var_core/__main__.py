"""``python -m var_core``: command-line entry (see ``var_core.cli``)."""

import sys

from .cli import main

sys.exit(main())

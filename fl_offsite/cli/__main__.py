"""``python -m fl_offsite.cli``: the same as the ``fl-offsite`` command."""

import sys

from . import main

sys.exit(main())

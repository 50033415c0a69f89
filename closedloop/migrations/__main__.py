"""``python -m closedloop.migrations revision MESSAGE [--url URL]``: autogenerate a revision draft."""

import sys

from closedloop.migrations import _main

sys.exit(_main(sys.argv[1:]))

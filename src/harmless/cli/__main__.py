"""``python -m harmless.cli``."""

import sys

from harmless.cli import main

sys.exit(main())

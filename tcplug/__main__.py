"""``python -m tcplug`` is the same as ``tcplug``."""

import sys

from tcplug.cli import main

sys.exit(main())

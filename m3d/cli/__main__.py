"""`python -m m3d.cli`: the `m3d` command."""

import sys

from .main import main

sys.exit(main())

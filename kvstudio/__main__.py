"""`python -m kvstudio ...`: the same as the `kvstudio` command (handy inside a venv or a checkout)."""

import sys

from kvstudio.cli.dispatch import main

sys.exit(main())

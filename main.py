"""`python main.py` from a source checkout does what `kvstudio` does."""

import sys

from kvstudio.cli.dispatch import main

if __name__ == "__main__":
    sys.exit(main())

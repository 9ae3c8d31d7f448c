"""``python -m samkit``: the samkit command line."""

import sys

from samkit.cli import main

if __name__ == "__main__":
    sys.exit(main())

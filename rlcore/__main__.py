"""``python -m rlcore train ...``: the same as the ``rlcore`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

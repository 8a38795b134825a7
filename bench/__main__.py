"""``python -m bench``: see ``python -m bench --help``."""

from .cli import main

raise SystemExit(main())

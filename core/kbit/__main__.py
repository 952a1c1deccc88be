"""``python -m kbit``: the kbit command line."""

from .cli import main

raise SystemExit(main())

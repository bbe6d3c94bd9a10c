"""``python -m orbitmesh``."""

from .cli import main

raise SystemExit(main())

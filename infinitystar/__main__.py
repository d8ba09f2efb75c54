"""``python -m infinitystar``: see infinitystar.cli."""
from .cli import main

raise SystemExit(main())

"""``python <this folder> <command>``: the CLI (``python -m infinitystar``) by the pack folder's path.

The Windows portable build's Python has a ``._pth`` file, so ``-m`` never looks in the current folder; running a
folder puts that folder on the path with any Python. ComfyUI imports ``__init__.py`` only, never this file."""
from infinitystar.cli import main

raise SystemExit(main())

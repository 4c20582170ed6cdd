"""``python -m vit <command> ...``: the ``vit`` command where its script is not on PATH."""
from .commands import main

raise SystemExit(main())

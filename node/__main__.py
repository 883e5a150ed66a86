"""``python -m node``: the ``neuroseed`` command line (node.cli)."""

from node.cli import main

raise SystemExit(main())

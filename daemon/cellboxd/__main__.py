"""`python -m cellboxd`: the `cellbox` command."""

from cellboxd.cli import main

raise SystemExit(main())

"""``python -m cellspot`` is the ``cellspot`` command."""

from cellspot.cli import main

main()

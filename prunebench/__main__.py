"""``python -m prunebench`` is the ``prunebench`` command."""

from prunebench.cli import entry

entry()

"""``python -m meterops`` runs the CLI."""

from meterops.cli import main

main()

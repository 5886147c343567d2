"""``python -m streamrec`` runs the CLI."""

from streamrec.cli import main

main()

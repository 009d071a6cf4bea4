"""python -m hvlab.cli: the `hvlab` command."""

from hvlab.cli import main

main()

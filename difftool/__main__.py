"""`python -m difftool` (and `accelerate launch -m difftool`) runs the CLI."""

from difftool.cli import main

main()

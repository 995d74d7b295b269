"""`python -m unbroken.cli` runs the command line."""

from unbroken.cli import main

main()

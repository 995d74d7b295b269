"""`python -m unbroken` runs the command line (as `unbroken`)."""

from unbroken.cli import main

main()

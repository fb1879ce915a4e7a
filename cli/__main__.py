"""`python -m sdrt.cli ...`: the `sdrt` command."""
import sys

from sdrt.cli.main import main

sys.exit(main())

"""`python -m kinema`: the `kinema` command, for when the console script is not on PATH."""

import sys

from kinema.cli import main

sys.exit(main())

"""`python -m server.trainer ...` (the same flags as `python -m server train ...`)."""

import sys

from server.trainer.cli import main

sys.exit(main())

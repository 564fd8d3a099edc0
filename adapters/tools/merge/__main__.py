"""Entry point of `python -m adapters.tools.merge` (see `adapters.tools.merge.cli`)."""

import sys

from adapters.tools.merge.cli import main

sys.exit(main())

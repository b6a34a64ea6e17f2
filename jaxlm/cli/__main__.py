"""`python -m jaxlm.cli ...`: the same as `jaxlm ...` (the local pod's processes run this)."""

import sys

from jaxlm.cli import main

sys.exit(main())

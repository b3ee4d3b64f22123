"""``python -m kdistill.annotate``."""

import sys

from kdistill.annotate.cli import main

sys.exit(main())

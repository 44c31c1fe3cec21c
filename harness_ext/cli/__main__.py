"""``python -m harness_ext.cli``: the ``needles`` command without the console script."""

import sys

from harness_ext.cli.app import main

sys.exit(main())

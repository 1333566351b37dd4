"""``python -m flashlm.generation``: the ``flashlm generate`` command."""

import sys

from flashlm.generation.cli import main

sys.exit(main())

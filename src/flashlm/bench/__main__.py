"""`python -m flashlm.bench [flags]`: the same as `flashlm bench [flags]`."""

import sys

from flashlm.bench.cli import main

sys.exit(main())

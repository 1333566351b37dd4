"""`python -m flashlm.train` (and `torchrun -m flashlm.train`): the same command as `flashlm train`."""

import sys

from flashlm.train.cli import main

sys.exit(main())

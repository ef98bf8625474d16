"""`python -m repa_kernels.demo`: the same command as `repa-kernels demo`."""

import sys

from .fine_tune import main

sys.exit(main())

"""python -m experiments.report WORKDIR [...]: see experiments/report/__init__.py."""

import sys

from experiments.report import main

sys.exit(main())

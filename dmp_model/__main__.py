"""`python -m dmp_model ...` is the `dmp` command (e.g. under `accelerate launch -m dmp_model predict`)."""

import sys

from .cli.main import main

sys.exit(main())

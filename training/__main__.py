"""``python -m training train|demo ...`` (also ``accelerate launch -m training train ...``)."""

import sys

from .cli import main

sys.exit(main())

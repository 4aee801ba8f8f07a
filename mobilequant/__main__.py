"""``python -m mobilequant`` (also ``torchrun -m mobilequant qat ...``)."""

import sys

from .cli import main

sys.exit(main())

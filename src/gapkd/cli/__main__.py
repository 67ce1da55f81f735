"""``python -m gapkd.cli`` (what torchrun launches): the ``gapkd`` command."""
import sys

from .main import main

sys.exit(main())

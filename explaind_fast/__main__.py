"""``python -m explaind_fast …`` — see :mod:`explaind_fast.cli`."""
import sys

from .cli import main

sys.exit(main())

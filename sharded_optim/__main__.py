"""``python -m sharded_optim ...`` is the ``sharded-optim`` command (see :mod:`sharded_optim.cli`)."""
import sys

from .cli import main

sys.exit(main())

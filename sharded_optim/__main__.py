"""``python -m sharded_optim ...`` is the ``sharded-optim`` command (see :mod:`sharded_optim.app.cli`)."""
import sys

from .app.cli import main

sys.exit(main())

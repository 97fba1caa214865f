"""The training application built on the library: the ``sharded-optim`` command (:mod:`.cli`), the training job
(:mod:`.train` with its configuration, model, byte corpus, run directories and exit handling), the launcher
helpers (:mod:`.preflight`, :mod:`.torchrun`), ``sharded-optim inspect`` and the optimizer experiments.

The library (everything in :mod:`sharded_optim` outside this subpackage) never imports it
(``tests/test_layout.py`` checks).
"""

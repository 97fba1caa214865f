"""``python -m sharded_optim.app.experiments NAME [--ci] ...`` (same as ``sharded-optim experiment NAME``)."""
import argparse
import sys

from ...dist import strip_launcher_args
from . import add_arguments, run_from_args

parser = argparse.ArgumentParser(prog="python -m sharded_optim.app.experiments", allow_abbrev=False,
                                 description="optimizer comparison experiments")
add_arguments(parser)
argv = strip_launcher_args(sys.argv[1:])
args = parser.parse_args(argv)
args.invocation = ("python -m sharded_optim.app.experiments", argv)  # recorded in the results as the command run
sys.exit(run_from_args(args))

"""Named results of multi-rank scenarios (issue 18): a failure should name the scenario, not a key.

Scenario functions (run on gloo ranks by ``tests/support/multiproc.py::run_ranks``) return a :class:`Scenarios`
keyed by names that read as the scenario, ``"assign zero-2"``, ``"exact adamw zero-1"``, never by tuples.  Looking
up a name that is not there fails with the names that are, so a misspelt or missing scenario reads as one.
Results cross process boundaries pickled; a ``Scenarios`` pickles as the dict it is.
"""
from __future__ import annotations

from typing import Any


class MissingScenario(KeyError):
    """A scenario name that the results do not hold; the message lists the names they do hold."""

    def __str__(self) -> str:   # KeyError's own str() is the repr of its argument: quotes and escaped newlines
        return str(self.args[0])


class Scenarios(dict):
    """A dict of scenario name -> result whose keys are strings and whose missing keys name the scenarios there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"scenario names are strings that read as the scenario, not {key!r}")
        super().__setitem__(key, value)

    def __missing__(self, key: Any) -> Any:
        raise MissingScenario(f"no scenario {key!r}; these results hold: {', '.join(map(repr, self)) or 'nothing'}")


def zero(name: str, stage: int | str) -> str:
    """The name of scenario ``name`` under ZeRO stage ``stage``: ``zero("assign", 2) == "assign zero-2"``."""
    return f"{name} zero-{stage}"

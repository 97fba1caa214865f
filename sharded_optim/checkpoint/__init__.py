"""Sharding-agnostic checkpoints of a model and its :class:`ShardedOptimizer` (or :class:`Lookahead`).

``save(path, model, optimizer, step=...)`` is collective: every rank writes only its own shard of the optimizer
state through ``torch.distributed.checkpoint`` (DCP), described with the parameters' logical shapes (see
:mod:`.io`), so ``load`` works at any world size (N -> M), on one process without a process
group, and into FSDP2 DTensor state.  A checkpoint directory holds

* DCP files (``.metadata``, ``__<rank>_0.distcp``): the model's ``state_dict()`` as ``model.<key>``, each
  state tensor as ``optim.<param name>.<key>`` (every key the algorithm uses, the fp32 master copy of
  low-precision parameters as ``master``), Lookahead slow weights as ``lookahead.<param name>.slow_param``;
* ``meta.json``: format name and version, algorithm, step, ``extra`` (any JSON), per-parameter logical shape,
  dtype, int64 step and NAdam ``mu_product``, hyperparameters of every param group, counters, Lookahead k/alpha;
* ``rng/rank_<r>.json``: each rank's RNG states (torch, CUDA, python ``random``, numpy);
* in ``meta.json`` (format version 2) a CRC-32C of every tensor chunk, of ``.metadata`` and of every RNG file,
  and a checksum of ``meta.json`` itself (:mod:`.integrity`).

Writes are atomic: everything goes into ``.<name>.partial`` and is renamed to ``<name>`` only after every rank
finished (the next save removes partial directories a crash left behind), then ``latest`` (a text file naming
the newest checkpoint) is replaced atomically and all but the newest ``keep_last`` checkpoints are removed.  ``load`` validates everything (format version, algorithm, param
names and shapes, hyperparameters, file integrity) and reads into scratch buffers before writing anything: a
refused load leaves model, optimizer and RNG bitwise unchanged.  A checkpoint whose bytes do not match their
checksums, or whose state holds non-finite values, raises :class:`CheckpointCorruptError`; ``load(directory,
..., latest=True)`` then falls back to the newest checkpoint that verifies.

A failed save (disk full, quota, permissions) raises :class:`CheckpointError` naming the path, the cause, the
bytes needed, and that the previous checkpoint is intact; its ``.partial`` directory is removed.

The package, by layer (each module imports only those above it, never the package itself): :mod:`.format`
(names, version, errors, ``latest``), :mod:`.integrity` (checksums), :mod:`.io` (DCP storage, JSON, RNG),
:mod:`.diagnose` (why a save failed), :mod:`.state` (what save and load share), :mod:`.saving`, :mod:`.loading`,
:mod:`.verify` (offline reading and checking), :mod:`.torch_bridge` (torch.optim export/import).
"""
from .format import FORMAT_NAME, FORMAT_VERSION, CheckpointCorruptError, CheckpointError, candidates, latest
from .loading import load
from .saving import save
from .torch_bridge import export_torch_optim, import_torch_optim
from .verify import read_checkpoint

__all__ = ["CheckpointCorruptError", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION", "candidates",
           "export_torch_optim", "import_torch_optim", "latest", "load", "read_checkpoint", "save"]

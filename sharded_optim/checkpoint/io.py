"""The storage side of :mod:`sharded_optim.checkpoint`: how sharded state is described to DCP, read back safely.

A flat ZeRO runtime gives each rank one contiguous 1-D range of every flattened parameter (``layout.pieces``).
A contiguous range of a row-major tensor is a union of at most ``2 * ndim - 1`` boxes, each itself contiguous in
memory, so every rank's part of a state tensor is described to ``torch.distributed.checkpoint`` as the local
shards of a ``ShardedTensor`` whose global size is the parameter's *logical* shape.  DCP then stores chunks with
global offsets, and any other sharding (another world size, a plain tensor on one process, an FSDP2 DTensor)
reads the elements it owns by overlap: N -> M resharding is DCP's own chunk arithmetic, nothing of ours.

Loading never unpickles arbitrary objects: DCP's ``.metadata`` file is a pickle, so it is read with an unpickler
that only resolves DCP's metadata classes and a few builtins; the data files are read by DCP with
``torch.load(weights_only=True)``; everything else of ours is JSON.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from . import integrity as ckpt_integrity

Box = tuple[tuple[int, ...], tuple[int, ...], int]  # (global offsets, sizes, first flat element)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns "torch.distributed is disabled ... assuming the intent is to save/load in a single process"
    whenever it runs without a process group; that is exactly our intent there (one process, ``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def storage_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape under which a parameter's state is stored: its logical shape, 0-d stored as (1,) (a ShardedTensor
    cannot be 0-d, and the stored shape must not depend on the world size)."""
    return tuple(shape) if len(shape) else (1,)


def range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[Box]:
    """Split flat elements ``[lo, hi)`` of a row-major tensor of ``shape`` into boxes contiguous in memory."""
    if lo >= hi:
        return []
    if len(shape) == 1:
        return [((lo,), (hi - lo,), lo)]
    inner = math.prod(shape[1:])
    out: list[Box] = []

    def row_part(row: int, a: int, b: int) -> None:
        for offs, sizes, start in range_boxes(shape[1:], a, b):
            out.append(((row,) + offs, (1,) + sizes, start + row * inner))

    if lo % inner:  # head: the end of a partial first row
        end = min(hi, (lo // inner + 1) * inner)
        row_part(lo // inner, lo % inner, end - (lo // inner) * inner)
        lo = end
    if hi // inner > lo // inner and lo < hi:  # whole rows
        r0, r1 = lo // inner, hi // inner
        out.append(((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + tuple(shape[1:]), r0 * inner))
        lo = r1 * inner
    if lo < hi:  # tail: the start of a partial last row
        row_part(lo // inner, 0, hi - (lo // inner) * inner)
    return out


def rank_pieces(layout: Any, rank: int) -> list[tuple[int, int, int]]:
    """``(slot, lo, hi)`` of every parameter range rank ``rank`` owns (mirrors ``FlatLayout._local_pieces``)."""
    pieces = []
    for bucket in layout.buckets:
        lo = bucket.start + rank * bucket.shard_numel
        hi = lo + bucket.shard_numel
        for s in bucket.slots:
            slot = layout.slots[s]
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a < b:
                pieces.append((s, a - slot.offset, b - slot.offset))
    return pieces


class SlotSharding:
    """Where the elements of one parameter of a flat runtime live: on every rank, and in this rank's buffers."""

    def __init__(self, rt: Any, slot_index: int, group: Any):
        slot = rt.layout.slots[slot_index]
        self.shape = storage_shape(slot.shape)
        self.numel = slot.numel
        self.local = [(p.lo, p.hi, p.local_lo) for p in rt.layout.pieces if p.slot == slot_index]
        self.device = rt.device
        self.group = group
        self.world = rt.world
        self.all_ranks = [(r, lo, hi) for r in range(rt.world)
                          for s, lo, hi in rank_pieces(rt.layout, r) if s == slot_index]

    def sharded(self, buffer: Tensor) -> Tensor:
        """``buffer`` (a rank-local flat buffer) seen as this parameter's tensor, for DCP.

        Several ranks: a DTensor of the logical shape whose local tensor is a :class:`RangeBoxes` (these boxes
        at these global offsets).  The placement only names the mesh: DCP takes the chunks from the boxes, and
        every write and read goes through views of ``buffer``.
        """
        if self.numel == 0:
            return torch.zeros(self.shape, dtype=buffer.dtype, device=buffer.device)  # nothing to shard
        if self.world == 1 or self.group is None:
            lo, _, local_lo = self.local[0]
            return buffer[local_lo: local_lo + self.numel].view(self.shape)
        views, offsets = [], []
        for lo, hi, local_lo in self.local:
            for offs, sizes, start in range_boxes(self.shape, lo, hi):
                first = local_lo + start - lo
                views.append(buffer[first: first + math.prod(sizes)].view(sizes))
                offsets.append(offs)
        return _dtensor_of_boxes(views, offsets, self.shape, self.group, buffer)

    def write(self, dst: Tensor, src: Tensor) -> None:
        """Copy this parameter's elements from one rank-local flat buffer to another (padding untouched)."""
        for lo, hi, local_lo in self.local:
            dst[local_lo: local_lo + hi - lo].copy_(src[local_lo: local_lo + hi - lo])

    def blocks(self, block: int, compact: bool) -> "SlotSharding":
        """The same parameter seen as its ``ceil(numel / block)`` blocks (the block scales of 8-bit state): each
        piece of elements ``[lo, hi)`` becomes blocks ``[lo // block, ceil(hi / block))``.  Not ``compact``: at
        ``local_lo // block`` of the runtime's scales buffer (the 8-bit layout puts pieces on block boundaries);
        ``compact``: packed one piece after another into a buffer of :attr:`local_numel` (a load into a layout
        without blocks, where neighbouring pieces may share a block)."""
        out = copy.copy(self)
        out.shape = (-(-self.numel // block),)
        out.numel = out.shape[0]
        out.local, packed = [], 0
        for lo, hi, local_lo in self.local:
            first, stop = lo // block, -(-hi // block)
            out.local.append((first, stop, packed if compact else local_lo // block))
            packed += stop - first
        out.local_numel = packed
        out.all_ranks = [(r, lo // block, -(-hi // block)) for r, lo, hi in self.all_ranks]
        return out


_MESHES: dict[tuple[int, str], Any] = {}


class RangeBoxes(Tensor):
    """The rank-local part of a checkpointed DTensor: views of a flat buffer at global offsets.

    DTensor hands DCP's three checkpoint hooks (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``) to its local tensor when the local tensor has them; this wrapper has them, so a
    DTensor of the parameter's logical shape describes our arbitrary contiguous ranges (which no DTensor
    placement can express) in the form torch recommends instead of the deprecated ShardedTensor.  It holds no
    storage of its own: DCP writes from, and reads into, the views.
    """

    _views: list[Tensor]
    _offsets: list[torch.Size]
    _like: Tensor

    @staticmethod
    def __new__(cls, views: list[Tensor], offsets: list[tuple[int, ...]], shape: tuple[int, ...],
                like: Tensor) -> "RangeBoxes":
        out = Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=like.dtype, device=like.device)
        out._views, out._offsets = views, [torch.Size(o) for o in offsets]
        out._like = like
        return out

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # DTensor.from_local takes ``view_as(self)`` of its input; nothing else is ever run on the wrapper
        if func in (torch.ops.aten.view.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default):
            src = args[0]
            return RangeBoxes(src._views, src._offsets, tuple(src.shape), src._like)  # a new alias, same views
        raise NotImplementedError(f"{func} is not supported on checkpoint range boxes")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=v.size()),
                                                      properties=TensorProperties.create_from_tensor(v),
                                                      size=obj.size()))
                for v, off in zip(self._views, self._offsets)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=v.size()) for v, off in zip(self._views, self._offsets)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        for v, off in zip(self._views, self._offsets):
            if off == index.offset:
                return v
        raise ValueError(f"no local box at offset {index.offset} of {index.fqn!r}")


def _dtensor_of_boxes(views: list[Tensor], offsets: list[tuple[int, ...]], shape: tuple[int, ...], group: Any,
                      like: Tensor) -> Tensor:
    """A DTensor of global ``shape`` whose rank-local part is ``views`` at global ``offsets`` (none: this rank
    neither writes nor reads anything of the tensor)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    key = (id(group), like.device.type)
    mesh = _MESHES.get(key)
    if mesh is None:  # a mesh over an existing group: no new communicators, no collectives
        mesh = _MESHES[key] = DeviceMesh.from_group(group, like.device.type)
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(RangeBoxes(views, offsets, shape, like), mesh, [Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=strides)


# --------------------------------------------------------------------------------------------- safe reading
# Every global a DCP metadata pickle of this format refers to (checked with pickletools on saved checkpoints).
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves DCP's metadata classes, torch dtypes, and nothing else (no arbitrary callables)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint of "
                                     "this format never contains; refusing to unpickle it")


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read with :class:`_MetadataUnpickler`, after its bytes were
    checked against :attr:`metadata_checksum` (``[crc, nbytes]``) when there is one."""

    metadata_checksum: list[int] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The DCP ``.metadata``: its bytes checked against :attr:`metadata_checksum` when set, then unpickled allowing
        DCP's metadata classes and torch dtypes only; an unreadable, refused or corrupted file raises ``ValueError``."""
        path = Path(self.path) / ".metadata"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"checkpoint {self.path}: cannot read DCP metadata {path.name} ({exc.strerror})") \
                from None
        if self.metadata_checksum is not None:  # before unpickling a single byte of it
            ckpt_integrity.check_bytes(raw, self.metadata_checksum, f"checkpoint {self.path}: DCP metadata "
                                                                   ".metadata")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"checkpoint {self.path}: DCP metadata refused: {exc}") from None
        except Exception as exc:  # truncated or garbled file
            raise ValueError(f"checkpoint {self.path}: DCP metadata is corrupted ({type(exc).__name__}: "
                             f"{exc})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"checkpoint {self.path}: DCP metadata is a {type(metadata).__name__}, "
                             "expected Metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


VerifyingReader = ckpt_integrity.verifying_reader(SafeReader)


def reader(path: Path, chunks: dict[str, Any] | None, files: dict[str, Any] | None = None) -> SafeReader:
    """The reader for ``dcp.load``: safe unpickling, and every chunk checked against ``chunks`` (None: a
    version-1 checkpoint without checksums)."""
    out = VerifyingReader(str(path), chunks)
    if files is not None:
        out.metadata_checksum = files.get(".metadata")
    return out


def read_dcp_metadata(path: Path, files: dict[str, Any] | None = None) -> Metadata:
    """The DCP metadata of a checkpoint, read safely (checked against ``files[".metadata"]`` when given);
    refuse entries that are not tensors."""
    safe = SafeReader(str(path))
    if files is not None:
        if ".metadata" not in files:
            raise ckpt_integrity.IntegrityError(f"checkpoint {path}: no checksum recorded for .metadata")
        safe.metadata_checksum = files[".metadata"]
    metadata = safe.read_metadata()
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint {path}: entry {fqn!r} is a {type(md).__name__}; this format stores "
                             "tensors only")
    return metadata


# ------------------------------------------------------------------------------------------------ RNG state
def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON-able data (torch CPU/CUDA, python ``random``, numpy if present)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    version, state, gauss = random.getstate()
    out["python"] = [version, list(state), gauss]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the library
        return out
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`capture_rng` captured (CUDA only when CUDA is available, numpy only when it is
    installed)."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, rstate, gauss = state["python"]
    random.setstate((version, tuple(rstate), gauss))
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def check_rng(state: Any, where: str) -> None:
    """Validate a captured RNG state before anything is restored."""
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise ValueError(f"{where}: RNG state must have keys 'torch' and 'python'")
    if not isinstance(state["torch"], list) or not all(isinstance(x, int) and 0 <= x < 256 for x in state["torch"]):
        raise ValueError(f"{where}: RNG state 'torch' must be a list of bytes")
    py = state["python"]
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)):
        raise ValueError(f"{where}: RNG state 'python' must be [version, state, gauss]")


# --------------------------------------------------------------------------------------------------- JSON
def write_json(path: Path, data: Any) -> None:
    """Write JSON durably (fsync) so that a completed checkpoint survives a crash right after the rename."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file ``path``; a missing or corrupted file raises ``ValueError`` naming the checkpoint and
    ``what`` the file holds."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path.parent}: {what} file {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path.parent}: {what} file {path.name} is corrupted ({exc})") from None


def to_json_value(value: Any, where: str) -> Any:
    """A hyperparameter as JSON (0-d tensors as numbers, tuples as lists); anything else is refused."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{where}: a tensor hyperparameter must have one element, got shape "
                            f"{tuple(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return [to_json_value(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} values cannot be stored in a checkpoint "
                    "(expected numbers, strings, booleans, None or lists of them)")

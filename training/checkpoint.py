"""Resumable training: every finished vertex is saved at once, atomically, as safetensors.

A work directory is a cache of finished vertices keyed by what determines them: a mode by
the digest of the settings it depends on, a vertex added to it by the digest of the SPRO
settings and its volume weight λ. Runs that share a mode, such as a deep ensemble with more
modes than an ESPRO complex, or a simplex of higher order, load what another run finished.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from training.cost import VertexRecord
from training.errors import CheckpointError

_METADATA = ("passes", "forward", "seconds", "epochs", "final_loss")
"""The fields of :meth:`VertexRecord.as_dict`, kept in the file's metadata."""


@dataclass(frozen=True)
class SavedVertex:
    """A finished vertex: its parameters, its mode's buffers (vertex 0) and its cost."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    record: VertexRecord


class Checkpoints:
    """Finished vertices kept in ``workdir``, one folder per digest."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str, mode: int, vertex: int, lam: float | None) -> Path:
        suffix = "" if lam is None else f".lambda{lam!r}"
        return self.workdir / digest / f"mode{mode}.vertex{vertex}{suffix}.safetensors"

    def load(
        self,
        digest: str,
        mode: int,
        vertex: int,
        lam: float | None,
        *,
        device: torch.device | str = "cpu",
    ) -> SavedVertex | None:
        """The saved vertex (its tensors on ``device``), or ``None`` if it has not finished.

        Vertices grown with different volume weights ``lam`` are kept apart; a mode has none.
        """
        path = self._path(digest, mode, vertex, lam)
        if not path.exists():
            return None
        params, buffers = {}, {}
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    kind, name = key.split(":", 1)
                    (params if kind == "param" else buffers)[name] = f.get_tensor(key)
        except (SafetensorError, ValueError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({err}); delete it") from None
        missing = [key for key in _METADATA if key not in meta]
        if missing:
            raise CheckpointError(
                f"{path}: lacks {', '.join(missing)} (an older espro wrote it); delete it"
            )
        return SavedVertex(params, buffers, VertexRecord.from_dict(meta))

    def save(
        self, digest: str, mode: int, vertex: int, lam: float | None, saved: SavedVertex
    ) -> None:
        """Save a finished vertex atomically."""
        path = self._path(digest, mode, vertex, lam)
        path.parent.mkdir(exist_ok=True)
        tensors = {f"param:{k}": v.detach().cpu().contiguous() for k, v in saved.params.items()}
        tensors |= {f"buffer:{k}": v.detach().cpu().contiguous() for k, v in saved.buffers.items()}
        fd, tmp = tempfile.mkstemp(prefix=".vertex.", dir=path.parent)
        os.close(fd)
        try:
            record = saved.record.as_dict()
            save_file(tensors, tmp, metadata={key: repr(record[key]) for key in _METADATA})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

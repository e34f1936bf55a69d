"""Resumable training: every finished vertex is saved at once, atomically, as safetensors.

A work directory belongs to one training configuration (its digest is recorded in
``run.json``); a run restarted with the same configuration loads the finished vertices and
continues with the first unfinished one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.errors import CheckpointError

RUN_FILE = "run.json"


@dataclass(frozen=True)
class SavedVertex:
    """A finished vertex: its parameters, its mode's buffers (vertex 0) and its cost."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    seconds: float
    final_loss: float


class Checkpoints:
    """Finished vertices of one run, kept in ``workdir``."""

    def __init__(self, workdir: str | Path, config_digest: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        run_file = self.workdir / RUN_FILE
        if run_file.exists():
            recorded = json.loads(run_file.read_text()).get("config_digest")
            if recorded != config_digest:
                raise CheckpointError(
                    f"{self.workdir} holds a run of a different configuration "
                    f"({recorded} != {config_digest}); choose another work directory or "
                    "delete it to start over"
                )
        else:
            self._atomic_write(run_file, json.dumps({"config_digest": config_digest}).encode())

    def _path(self, mode: int, vertex: int, lam: float | None) -> Path:
        suffix = "" if lam is None else f".lambda{lam!r}"
        return self.workdir / f"mode{mode}.vertex{vertex}{suffix}.safetensors"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.workdir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(
        self, mode: int, vertex: int, lam: float | None, *, device: torch.device | str = "cpu"
    ) -> SavedVertex | None:
        """The saved vertex (its tensors on ``device``), or ``None`` if it has not finished.

        Vertices grown with different volume weights ``lam`` are kept apart; a mode has none.
        """
        path = self._path(mode, vertex, lam)
        if not path.exists():
            return None
        params, buffers = {}, {}
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata()
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                kind, name = key.split(":", 1)
                (params if kind == "param" else buffers)[name] = f.get_tensor(key)
        return SavedVertex(params, buffers, float(meta["seconds"]), float(meta["final_loss"]))

    def save(self, mode: int, vertex: int, lam: float | None, saved: SavedVertex) -> None:
        """Save a finished vertex atomically."""
        tensors = {f"param:{k}": v.detach().cpu().contiguous() for k, v in saved.params.items()}
        tensors |= {f"buffer:{k}": v.detach().cpu().contiguous() for k, v in saved.buffers.items()}
        fd, tmp = tempfile.mkstemp(prefix=".vertex.", dir=self.workdir)
        os.close(fd)
        try:
            save_file(
                tensors,
                tmp,
                metadata={"seconds": repr(saved.seconds), "final_loss": repr(saved.final_loss)},
            )
            os.replace(tmp, self._path(mode, vertex, lam))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

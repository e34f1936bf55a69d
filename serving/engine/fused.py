"""Members run together: ``torch.func.vmap`` over their stacked parameters and buffers.

vmap turns the members' convolutions into one grouped convolution and their linear layers
into one batched matrix multiply, so S members cost a few large kernels instead of S times
every small one. States are stacked per set of members on first use and cached, so members
added after construction (fresh draws) are picked up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, vmap

from serving.engine.base import MemberState
from serving.engine.cuda_graphs import CapturedForward, padded_batch
from serving.engine.reference import ReferenceEngine

Prepared = Any
"""What :meth:`FusedEngine.prepare` makes of a set of members (stacked states, …)."""


def cpu_max_vmap_batch(model: nn.Module) -> int | None:
    """The largest batch worth vmapping on the CPU (None: any). vmapped convolutions become
    grouped ones, which oneDNN runs slower than one convolution per member past a single row;
    batched matmuls beat a member loop at every batch (docs/performance.md)."""
    return 1 if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else None


def map_members(
    fn: Callable[[MemberState, torch.Tensor], torch.Tensor],
    stacked: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    per_member_input: bool = False,
    vectorise: bool = True,
) -> torch.Tensor:
    """``fn(state, x)`` for every member of a stack, stacked ``[S, ...]``: vmapped, or one call
    per member on views of the stack. ``per_member_input``: ``x`` is ``[S, ...]`` too.

    Member by member, image batches go channels-last, the layout oneDNN's convolutions and max
    pools run fastest in at larger batches (docs/performance.md).
    """
    if vectorise:
        return vmap(fn, in_dims=(0, 0 if per_member_input else None))(stacked, x)
    count = len(next(iter(stacked.values())))
    inputs = x.unbind() if per_member_input else [x] * count
    return torch.stack(
        [fn({k: v[s] for k, v in stacked.items()}, _channels_last(inputs[s])) for s in range(count)]
    )


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class FusedEngine(ReferenceEngine):
    """Runs the members from one stack of their states: vmapped, or member by member.

    ``dtype`` is the precision of weights and activations (outputs are always float32).
    Batches of up to ``max_vmap_batch`` rows run vmapped, larger ones one member after another
    over the same stack (``auto``: see :func:`cpu_max_vmap_batch` on the CPU; unlimited on
    CUDA).
    ``cuda_graphs`` replays CUDA graphs for batches up to ``max_graph_batch`` rows (padded to
    a power of two; the graphs of one member set share a memory pool), and ``torch_compile``
    compiles :meth:`run` with ``torch.compile`` (inductor fuses the pointwise work around the
    convolutions; compiled per shape on first use, seconds each, and run eagerly once PyTorch's
    recompilation limit for :meth:`run` is reached); on the CPU both are ignored. At most
    ``chunk_size`` member-rows (members × batch rows) run at once, which bounds the
    activations' memory; the ``max_cached`` most recent member sets keep their stacked states.
    """

    def __init__(
        self,
        *args: Any,
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        torch_compile: bool = False,
        max_graph_batch: int = 64,
        max_cached: int = 8,
        max_vmap_batch: int | Literal["auto"] | None = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dtype = dtype
        if max_vmap_batch == "auto":
            cuda = self.device.type == "cuda"
            max_vmap_batch = None if cuda else cpu_max_vmap_batch(self.model)
        self.max_vmap_batch = max_vmap_batch
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.torch_compile = torch_compile and self.device.type == "cuda"
        self._run = torch.compile(self.run) if self.torch_compile else self.run
        self.max_graph_batch = max_graph_batch
        self.max_cached = max_cached
        self._prepared: OrderedDict[tuple[int, ...], Prepared] = OrderedDict()
        self._graphs: dict[tuple[tuple[int, ...], int], CapturedForward] = {}
        self._pools: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    def _member_forward(self, state: MemberState, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, state, (x,))

    def stack(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        """The members' states stacked on a new leading axis, floats in the engine's dtype."""
        return {
            name: torch.stack([self.members[i][name] for i in members]).to(
                self.dtype if tensor.is_floating_point() else tensor.dtype
            )
            for name, tensor in self.members[members[0]].items()
        }

    def prepare(self, members: tuple[int, ...]) -> Prepared:
        """Everything a forward pass of these members reads, made once: here, their stack."""
        return self.stack(members)

    def vectorise(self, batch: int) -> bool:
        """Whether a batch of this many rows runs vmapped rather than member by member."""
        return self.max_vmap_batch is None or batch <= self.max_vmap_batch

    def run(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[S, B, ·]`` of prepared members for a normalised batch in ``dtype``."""
        return map_members(self._member_forward, prepared, x, vectorise=self.vectorise(len(x)))

    def forward(self, x: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        per_call = max(1, self.chunk_size // len(x))
        groups = [tuple(members[i : i + per_call]) for i in range(0, len(members), per_call)]
        x = x.to(self.dtype)
        return torch.cat([self._forward_group(x, group) for group in groups]).float()

    def _forward_group(self, x: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
        batch = padded_batch(len(x), self.max_graph_batch) if self.cuda_graphs else None
        with self._lock:
            prepared = self._prepared.pop(members, None)
            if prepared is None:
                prepared = self.prepare(members)
                while len(self._prepared) >= self.max_cached:
                    evicted, _ = self._prepared.popitem(last=False)
                    self._graphs = {k: g for k, g in self._graphs.items() if k[0] != evicted}
                    self._pools.pop(evicted, None)
            self._prepared[members] = prepared  # most recently used last
            if batch is not None:  # a graph's static input and output are shared: replay locked
                graph = self._graphs.get((members, batch))
                if graph is None:
                    pool = self._pools.setdefault(members, torch.cuda.graph_pool_handle())
                    graph = CapturedForward(
                        lambda inp: self._run(prepared, inp), x, batch, pool=pool
                    )
                    self._graphs[members, batch] = graph
                return graph(x)
        return self._run(prepared, x)

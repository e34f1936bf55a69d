"""CUDA graphs of a forward pass, captured per padded batch size: no launch overhead at small
batches, where a forward of many small kernels is bound by the CPU issuing them."""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


class CapturedForward:
    """``forward`` replayed from a CUDA graph over a static input of ``batch`` rows.

    ``forward`` must read only tensors that outlive the graph (the caller keeps them) and treat
    rows independently (eval mode), so that a shorter batch may be padded. Graphs given the same
    ``pool`` (``torch.cuda.graph_pool_handle()``) share their temporaries' memory: safe as long
    as they never replay at once, since each call copies its output out before returning.
    """

    def __init__(
        self,
        forward: Forward,
        example: torch.Tensor,
        batch: int,
        warmup: int = 3,
        pool: tuple[int, int] | None = None,
    ):
        self.input = example.new_zeros(batch, *example.shape[1:])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (cuDNN autotuning, allocator) off the graph
            for _ in range(warmup):
                forward(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may go on using CUDA meanwhile (a replica warms a new
        # bundle up while it serves the old one); "global" would fail their synchronising calls.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = forward(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[S, len(x), ·]`` for a batch of at most ``batch`` rows."""
        self.input[: len(x)].copy_(x)
        self.graph.replay()
        return self.output[:, : len(x)].clone()


def padded_batch(batch: int, max_batch: int) -> int | None:
    """The power of two a batch is padded to for a graph, or ``None`` past ``max_batch``."""
    size = 1 << (batch - 1).bit_length()
    return size if size <= max_batch else None

"""Training throughput on an image folder: streamed from disk or held in memory, fp32 or bf16.

The trainer's examples per second on a folder of generated PNGs (``root/train/<class>/``, as
``data: {source: image_folder}`` reads it), in six cells: the images decoded once and held in
memory (``in_memory: true``) in fp32 and in bf16, and streamed from disk through the
DataLoader with 0 and with 2 workers (``num_workers``), in fp32 and in bf16. Each cell goes
the way ``espro train`` goes: a :class:`~training.config.TrainConfig` with that data section
and ``precision``, ``load_dataset``, the :class:`~training.splits.TrainingData` the pipeline
builds (augmented as the source's default, pad 4 and flip), and a mode of the ``cnn``
trained by :meth:`SimplexTrainer.fit_mode <training.spro.SimplexTrainer.fit_mode>` at batch
128. The rate is the training examples of every epoch after the first (a warm-up, run but
not counted; with one epoch it counts) over their wall seconds, and each cell's rate is
also given as a multiple of the in-memory fp32 cell, measured in the same run. Loading (the
scan that reads each image once, and the decode into memory) is timed apart. The folder has
no test split, so the source holds out a fifth for testing and the loader a fifth of the rest
for validation and calibration: 768 of the default 1,200 images train (``train_examples``).

    .venv/bin/python benchmarks/training_throughput.py   # writes results/training-throughput.json
    .venv/bin/python benchmarks/training_throughput.py --quick --out /tmp/t.json  # seconds
    .venv/bin/python benchmarks/training_throughput.py --markdown \\
        benchmarks/results/training-throughput.json    # the docs' table

bf16 runs under ``torch.autocast``; on a CPU without bf16 instructions (AMX or AVX512-BF16,
read from ``/proc/cpuinfo``; ``native_bf16`` in the report) it is emulated and slower than
fp32, so read its cells against that flag. ``--threads`` sets torch's intra-op threads of
the training process (DataLoader workers run one each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from engine import machine

from serving.architectures import create_model
from serving.devices import resolve_device
from serving.manifest import InputSpec, Task
from training.config import TrainConfig, parse_config
from training.data import Dataset, load_dataset
from training.espro import autocast_dtype, derive_seed, generator
from training.splits import TrainingData
from training.spro import SimplexTrainer

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "training-throughput.json"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags of bf16 arithmetic in hardware; without them CPU autocast emulates bf16."""
LR = 0.05


# --------------------------------------------------------------------------- the data


def write_images(root: Path, classes: int, per_class: int, size: int, seed: int) -> int:
    """``root/train/<class>/<i>.png``: RGB images of noise with a filled rectangle, its colour
    depending on the class. Returns the bytes written."""
    from torchvision.io import encode_png  # seconds to import

    rng = torch.Generator().manual_seed(seed)
    written = 0
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = torch.tensor([(c * 97) % 256, (c * 53 + 80) % 256, (c * 191 + 40) % 256])
        for i in range(per_class):
            image = torch.randint(0, 256, (3, size, size), generator=rng, dtype=torch.uint8)
            h, w = (int(v) for v in torch.randint(1, size + 1, (2,), generator=rng))
            top, left = (int(torch.randint(0, size - d + 1, (1,), generator=rng)) for d in (h, w))
            image[:, top : top + h, left : left + w] = colour[:, None, None].to(torch.uint8)
            png = encode_png(image).numpy().tobytes()
            (folder / f"{i:05d}.png").write_bytes(png)
            written += len(png)
    return written


def native_bf16() -> dict[str, Any]:
    """Whether the CPU does bf16 arithmetic in hardware, from the flags of /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"native_bf16": None, "bf16_flags": []}
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    found = sorted(f for f in BF16_FLAGS if f in flags)
    return {"native_bf16": bool(found), "bf16_flags": found}


# --------------------------------------------------------------------------- the cells


def cells(workers: Sequence[int]) -> list[dict[str, Any]]:
    """The cells in the order they run: in memory first (the fp32 one is the baseline), then
    streamed with each worker count, each in fp32 and bf16."""
    data = [("memory", None), *(("streamed", w) for w in workers)]
    return [
        {"cell": name(source, w, p), "source": source, "workers": w, "precision": p}
        for source, w in data
        for p in ("fp32", "bf16")
    ]


def name(source: str, workers: int | None, precision: str) -> str:
    where = "in memory" if source == "memory" else f"streamed, {workers} workers"
    return f"{where}, {precision}"


def config_for(args: argparse.Namespace, root: Path, cell: dict[str, Any]) -> TrainConfig:
    """The training config a user would write for the cell."""
    data: dict[str, Any] = {
        "source": "image_folder",
        "root": str(root),
        "size": [args.size, args.size],
        "in_memory": cell["source"] == "memory",
    }
    if cell["workers"] is not None:  # in memory, the scan reads with the source's default
        data["num_workers"] = cell["workers"]
    return parse_config(
        {
            "seed": args.seed,
            "precision": cell["precision"],
            "data": data,
            "model": {"architecture": "cnn"},
            "modes": {"count": 1, "epochs": args.epochs, "lr": LR, "batch_size": args.batch},
            "simplex": {"vertices": 0, "lambda": 0.0},
        },
        "benchmark config",
    )


class EpochClock:
    """Training data that note the time each epoch starts reading them (``fit_mode`` asks
    for the batches once an epoch)."""

    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self.starts: list[float] = []

    def __len__(self) -> int:
        return len(self.data)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.starts.append(time.perf_counter())
        return self.data.batches(batch_size, generator)


def train_cell(config: TrainConfig, dataset: Dataset) -> dict[str, Any]:
    """One mode of the cnn trained on ``dataset`` as ``config`` says, timed by epoch."""
    device = resolve_device(config.device)
    input_spec = InputSpec(
        shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        image=config.data.image_spec(),
    )
    data = TrainingData(dataset.train.for_device(device), input_spec, device, config.data.augment)
    torch.manual_seed(derive_seed(config.seed, "init", 0))
    model = create_model(
        config.model.architecture,
        input_shape=dataset.input_shape,
        num_outputs=len(dataset.class_names),
        **config.model.kwargs,
    ).to(device)
    trainer = SimplexTrainer(
        model,
        Task.CLASSIFICATION,
        samples=config.simplex.samples,
        eps=config.simplex.eps,
        autocast=autocast_dtype(config, device),
    )
    clock = EpochClock(data)
    torch.manual_seed(derive_seed(config.seed, "vertex", 0, 0))
    history = trainer.fit_mode(
        clock, config.modes.settings(), generator(config.seed, "batches", 0, 0), desc="bench"
    )
    end = time.perf_counter()
    bounds = [*clock.starts, end]
    epoch_seconds = [b - a for a, b in itertools.pairwise(bounds)]
    counted = epoch_seconds[1:] or epoch_seconds  # the first epoch warms up
    examples = len(data) * len(counted)
    return {
        "train_examples": len(data),
        "epochs": len(epoch_seconds),
        "epochs_counted": len(counted),
        "epoch_seconds": epoch_seconds,
        "examples_per_s": examples / sum(counted),
        "final_loss": history.loss[-1],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    # Imported on first use by load_dataset (seconds): not a cost of the first cell's load.
    import sklearn.model_selection  # noqa: F401

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="espro-throughput-"))
    try:
        start = time.perf_counter()
        png_bytes = write_images(root, args.classes, args.per_class, args.size, args.seed)
        write_seconds = time.perf_counter() - start
        plan = cells(args.workers)
        loaded: dict[tuple[str, int | None], dict[str, Any]] = {}
        rounds: list[list[dict[str, Any]]] = []
        for _ in range(args.repeats):
            results = []
            for cell in plan:
                config = config_for(args, root, cell)
                key = (cell["source"], cell["workers"])
                if key not in loaded:  # one load per data section, shared by fp32 and bf16
                    start = time.perf_counter()
                    dataset = load_dataset(config.data)
                    loaded[key] = {"dataset": dataset, "seconds": time.perf_counter() - start}
                result = cell | train_cell(config, loaded[key]["dataset"])
                result["load_seconds"] = loaded[key]["seconds"]
                result["load_workers"] = config.data.num_workers
                results.append(result)
                print(
                    f"{cell['cell']:28} {result['examples_per_s']:9.1f} ex/s",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = []
    for i in range(len(plan)):  # each cell's median round
        rates = [r[i]["examples_per_s"] for r in rounds]
        median = statistics.median(rates)
        chosen = min((r[i] for r in rounds), key=lambda r: abs(r["examples_per_s"] - median))
        results.append(chosen | {"examples_per_s": median, "examples_per_s_rounds": rates})
    baseline = results[0]["examples_per_s"]
    bf16 = native_bf16()
    for result in results:
        result["ratio_to_baseline"] = result["examples_per_s"] / baseline
        if result["precision"] == "bf16":
            result["native_bf16"] = bf16["native_bf16"]
    return {
        "command": args.command,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": machine(torch.device("cpu")) | bf16,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "data": {
            "classes": args.classes,
            "images_per_class": args.per_class,
            "images": args.classes * args.per_class,
            "size": [args.size, args.size],
            "png_bytes": png_bytes,
            "write_seconds": write_seconds,
        },
        "model": {"architecture": "cnn", "kwargs": {}},
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch,
            "lr": LR,
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "baseline": results[0]["cell"],
        "results": results,
    }


# --------------------------------------------------------------------------- the report


def markdown(report: dict[str, Any]) -> str:
    """The report as the Markdown table of docs/performance.md."""
    lines = [
        "| data | workers | precision | examples/s | × in memory fp32 | load s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        where = "in memory" if r["source"] == "memory" else "streamed"
        workers = "–" if r["workers"] is None else str(r["workers"])
        precision = r["precision"]
        if precision == "bf16" and not r.get("native_bf16"):
            precision += " (emulated)"
        lines.append(
            f"| {where} | {workers} | {precision} | {r['examples_per_s']:.0f} | "
            f"{r['ratio_to_baseline']:.2f} | {r['load_seconds']:.1f} |"
        )
    data, training, info = report["data"], report["training"], report["machine"]
    size = "×".join(str(s) for s in data["size"])
    lines.append("")
    lines.append(
        f"{data['images']} PNGs of {size} in {data['classes']} classes, cnn, batch "
        f"{training['batch_size']}, {counted(training['epochs'])}, "
        f"{training['threads']} torch threads; {info.get('cpu', '?')}, native bf16: "
        f"{info.get('native_bf16')}."
    )
    return "\n".join(lines)


def counted(epochs: int) -> str:
    """Which epochs a cell's rate counts, in words."""
    if epochs == 1:
        return "1 epoch (counted: no warm-up)"
    return f"{epochs} epochs (the first a warm-up, not counted)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=400, help="images per class")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=2, help="the first is a warm-up")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="streamed cells")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every cell; median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the report JSON")
    parser.add_argument(
        "--markdown", type=Path, help="print the table of a report JSON for the docs, and stop"
    )
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join([".venv/bin/python benchmarks/training_throughput.py", *given])
    if args.quick:
        args.per_class, args.size, args.epochs = 20, 8, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.markdown is not None:
        report = json.loads(args.markdown.read_text())
        print(markdown(report))
        return report
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

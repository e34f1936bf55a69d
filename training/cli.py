"""The trainer's commands of ``espro``: train, evaluate, report, compare, experiment, configs,
demo.

:func:`add_commands` adds them to the ``espro`` parser of :mod:`serving.cli`, which finds it
through the ``espro.commands`` entry point. ``espro --help`` imports this module, so it imports
neither torch nor the trainer's dependencies (the ``train`` extra): each command imports what it
needs when it runs, once :func:`_command` has checked that the extra is installed.

A refusal of a file or flag is an :class:`~serving.errors.EsproError` (the trainer's are in
:mod:`training.errors`), which ``espro`` prints as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.bundle import load_bundle
from serving.cli import launcher, print_predictions, strict_json
from serving.devices import resolve_device
from serving.errors import BundleError, CommandError, InputError
from serving.manifest import Task
from training.errors import ConfigError

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger("espro")

DEMO_CONFIG = "mnist1d-demo"
TRAINING_EXTRA = ("sklearn", "scipy", "mnist1d", "matplotlib", "yaml", "tqdm")
"""What the ``train`` extra installs, by import name (a test holds it to pyproject.toml)."""

Command = Callable[[argparse.Namespace], int]


def _command(run: Command) -> Command:
    """``run``, refused in one line where the training extra is missing."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        if not all(importlib.util.find_spec(name) for name in TRAINING_EXTRA):
            extra = "pip install 'espro[train]'"
            raise CommandError(f"espro {args.command} needs the training extra: {extra}")
        return run(args)

    return command


def _ray_runner(config: TrainConfig, address: str | None) -> Any:
    """Ray tasks for the simplexes, one GPU each when training on CUDA."""
    from serving.cluster import connect
    from training.distributed import RayRunner

    connect(address)
    return RayRunner(num_gpus=1 if resolve_device(config.device).type == "cuda" else 0)


_TIME_UNITS = {"s": 1, "m": 60, "h": 3600}


def _budget(text: str) -> dict[str, float]:
    """``--budget``: a number of mode-epochs, or a time with a unit (s, m, h)."""
    unit = text[-1:].lower()
    try:
        if unit in _TIME_UNITS:
            return {"seconds": float(text[:-1]) * _TIME_UNITS[unit]}
        return {"mode_epochs": float(text)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither mode-epochs (300) nor a time (900s, 15m, 2h)"
        ) from None


def _train(args: argparse.Namespace) -> int:
    from training.config import load_config, parse_config
    from training.pipeline import train

    config = load_config(args.config)
    default_name = f"{config.name}-{config.version}"
    data = config.model_dump(mode="json", by_alias=True)
    if args.seed is not None:
        data["seed"] = args.seed
        default_name += f"-seed{args.seed}"
    if args.lam is not None:
        data["simplex"]["lambda"] = args.lam
    if args.budget is not None:
        data["budget"] = args.budget
    config = parse_config(data, "command line")
    output = Path(args.output or Path("runs") / default_name)
    workdir = Path(args.workdir) if args.workdir else output.with_name(output.name + ".work")
    log.info("training %s into %s (checkpoints in %s)", config.name, output, workdir)
    runner = _ray_runner(config, args.address) if args.ray or args.address else None
    try:
        path, results = train(
            config, output, workdir=workdir, overwrite=args.overwrite, runner=runner
        )
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to resume from the last vertex")
        return 130
    if not args.keep_checkpoints:
        shutil.rmtree(workdir, ignore_errors=True)
    print_training_summary(path, results)
    return 0


def print_training_summary(path: Path, results: dict[str, Any]) -> None:
    """The λ search, the simplex diagnostics and the comparison of a freshly trained bundle."""
    from training.cost import cost_table
    from training.diagnostics import SimplexDiagnostics, diagnostics_table

    manifest = load_bundle(path).manifest
    print(f"\nbundle written to {path}\n")
    search = manifest.training.get("lambda_search")
    if search:
        scores = ", ".join(
            f"{g:g}: {s:.4f}" for g, s in zip(search["grid"], search["scores"], strict=True)
        )
        broken = [g for g, b in zip(search["grid"], search["broken"], strict=True) if b]
        print(
            f"λ search (validation NLL) {scores} -> λ = {search['best']:g}"
            + (f"; broke simplexes: {', '.join(f'{g:g}' for g in broken)}" if broken else "")
            + "\n"
        )
        for warning in search["warnings"]:
            print(f"warning: {warning}\n")
    budget = manifest.training.get("budget")
    if budget:
        rows = [
            f"{p['modes']} modes × order {p['order']} ({p['vertex_epochs']} epochs per vertex): "
            f"validation NLL {p['val_nll']:.4f}" + ("  <- chosen" if i == budget["chosen"] else "")
            for i, p in enumerate(budget["plans"])
        ]
        print(f"budget of {budget['passes']:,} passes:\n  " + "\n  ".join(rows) + "\n")
    if "cost" in manifest.training:
        print(cost_table(manifest.training["cost"]) + "\n")
    diagnostics = [
        SimplexDiagnostics.model_validate(d) for d in manifest.training.get("diagnostics", [])
    ]
    if diagnostics:
        print(diagnostics_table(diagnostics) + "\n")
    _print_tables([results], manifest.task)


def _evaluate(args: argparse.Namespace) -> int:
    from training.config import parse_config
    from training.data import load_dataset
    from training.evaluation import evaluate

    device = resolve_device(args.device, source="--device")
    bundle = load_bundle(args.bundle)
    config = parse_config(bundle.manifest.training.get("config"), f"{args.bundle} training config")
    severities = args.severities or config.evaluation.noise_severities
    dataset = load_dataset(config.data)
    try:
        results = evaluate(
            bundle,
            dataset,
            severities,
            seed=config.seed,
            device=device,
            allow_custom_architecture=args.allow_custom_architecture,
        )
    except InputError as err:
        message = f"{args.bundle}: its training config's data do not fit its input spec: {err}"
        raise InputError(message) from None
    if args.json:
        text = strict_json(results, args.bundle) + "\n"
        try:
            Path(args.json).write_text(text)
        except OSError as err:
            raise ConfigError(f"--json: {args.json}: {err.strerror}") from None
    _print_tables([results], bundle.manifest.task)
    return 0


def _print_tables(runs: list[dict[str, Any]], task: Task) -> None:
    from training.evaluation import results_table, shift_table

    print(results_table(runs, task))
    print("\nGaussian noise (calibrated):\n")
    print(shift_table(runs, task))


def _report(args: argparse.Namespace) -> int:
    bundles = [load_bundle(path) for path in args.bundles]
    runs = [b.manifest.metrics for b in bundles]
    if not all(run.get("test") for run in runs):
        raise BundleError("every bundle must hold the metrics that espro train writes")
    print(f"{len(runs)} run(s): " + ", ".join(str(path) for path in args.bundles) + "\n")
    _print_tables(runs, bundles[0].manifest.task)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.no_serve:  # refused before minutes of training, not after
        launcher("demo")
    from training.config import load_config
    from training.data import load_dataset
    from training.pipeline import train

    output = Path(args.output)
    config = load_config(DEMO_CONFIG)
    path, results = train(config, output / "bundle", workdir=output / "work", overwrite=True)
    shutil.rmtree(output / "work", ignore_errors=True)
    print_training_summary(path, results)
    inputs = load_dataset(config.data).test.x[:8]
    np.save(output / "inputs.npy", inputs.numpy())
    print(f"\nespro predict {path} {output / 'inputs.npy'}\n")
    print_predictions(path, output / "inputs.npy")
    if not args.no_serve:
        from training.demo import serve_and_query

        serve_and_query(path, inputs.numpy())
    return 0


def _configs(args: argparse.Namespace) -> int:
    from training.config import builtin_configs

    configs = builtin_configs()
    if args.name:
        if args.name not in configs:
            raise ConfigError(f"no built-in config {args.name!r}; built-in: {', '.join(configs)}")
        print(configs[args.name].read_text(), end="")
    else:
        print("\n".join(sorted(configs)))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    # Imported here: the experiments import matplotlib, which `espro` must not need otherwise.
    from training.experiments.registry import EXPERIMENTS, describe, run_experiment

    if args.list or not args.name:
        print(describe())
        return 0
    if args.name not in EXPERIMENTS:
        raise ConfigError(f"no experiment {args.name!r}; known: {', '.join(EXPERIMENTS)}")
    command = f"espro experiment {args.name}" + " --quick" * args.quick
    command += f" -o {args.output}" * bool(args.output) + f" --seed {args.seed}" * bool(args.seed)
    report, results, _ = run_experiment(
        args.name, quick=args.quick, output=args.output, seed=args.seed, command=command
    )
    print(f"wrote {report} and {results}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from training.compare import compare
    from training.config import load_config

    config = load_config(args.config)
    if args.seeds < 1:
        raise CommandError(f"--seeds: at least 1, got {args.seeds}")
    seeds = args.seed_list or list(range(args.seeds))
    out = Path(args.out or Path("runs") / f"{config.name}-{config.version}-compare")
    argv = ["espro", "compare", args.config, "--seed-list", *map(str, seeds), "--out", str(out)]
    if args.max_de_modes is not None:
        argv += ["--max-de-modes", str(args.max_de_modes)]
    argv += ["--overwrite"] * args.overwrite + ["--keep-checkpoints"] * args.keep_checkpoints
    try:
        compare(
            config,
            seeds,
            out,
            max_de_modes=args.max_de_modes,
            overwrite=args.overwrite,
            keep_checkpoints=args.keep_checkpoints,
            command=shlex.join(argv),
        )
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to resume")
        return 130
    verdicts = (out / "report.md").read_text().split("\n## Paired differences")[0]
    print(f"\n{verdicts}\nwrote {out / 'report.md'}, results.json and cost.png")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the trainer's commands to the ``espro`` parser (the ``espro.commands`` entry point)."""
    p = sub.add_parser("train", help="train a complex from a YAML/TOML config and write a bundle")
    p.add_argument("config", help="config file, or the name of a built-in config")
    p.add_argument("-o", "--output", help="bundle directory (default runs/NAME-VERSION)")
    p.add_argument("--workdir", help="checkpoint directory (default OUTPUT.work)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--lambda", dest="lam", type=float, help="fix the volume weight λ (no search)")
    p.add_argument(
        "--budget",
        type=_budget,
        help="choose modes and simplex order within a budget: mode-epochs (300) or time "
        "(900s, 15m, 2h)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the work directory after success"
    )
    p.add_argument(
        "--ray", action="store_true", help="grow the simplexes as tasks on a local Ray (at once)"
    )
    p.add_argument(
        "--address", help="grow the simplexes as tasks on this Ray cluster (auto or host:port)"
    )
    p.set_defaults(func=_command(_train))

    p = sub.add_parser("evaluate", help="score single model, deep ensemble and ESPRO of a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", help="also write the full results to this file")
    p.add_argument("--severities", type=float, nargs="+", help="Gaussian-noise severities")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--allow-custom-architecture", action="store_true")
    p.set_defaults(func=_command(_evaluate))

    p = sub.add_parser("report", help="print the metrics stored in bundles (mean ± std over many)")
    p.add_argument("bundles", nargs="+")
    p.set_defaults(func=_command(_report))

    p = sub.add_parser(
        "demo", help="train, evaluate, predict, serve and query on the embedded MNIST-1D data"
    )
    p.add_argument("-o", "--output", default="runs/demo", help="demo directory")
    p.add_argument("--no-serve", action="store_true", help="stop after offline prediction")
    p.set_defaults(func=_command(_demo))

    p = sub.add_parser("configs", help="list the built-in configs, or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_command(_configs))

    p = sub.add_parser(
        "experiment",
        help="run a reproduction experiment; writes report.md, figures and results.json",
    )
    p.add_argument("name", nargs="?", help="the experiment (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--quick", action="store_true", help="a seconds-sized smoke run")
    p.add_argument("-o", "--output", help="output folder (default docs/reproduction/NAME)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.set_defaults(func=_command(_experiment))

    p = sub.add_parser(
        "compare",
        help="ESPRO against deep ensembles of equal members and equal cost, over seeds; "
        "writes report.md, results.json and cost.png",
    )
    p.add_argument("config", help="config file, or the name of a built-in config")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    seeds.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead")
    p.add_argument("-o", "--out", help="output folder (default runs/NAME-VERSION-compare)")
    p.add_argument("--max-de-modes", type=int, help="cap the modes of the equal-cost ensemble")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain bundles rather than reuse them"
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/work after each seed")
    p.set_defaults(func=_command(_compare))

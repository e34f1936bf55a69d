"""The ``espro`` command line: train, evaluate, predict, serve, demo, configs.

Each command imports what it needs when it runs: Ray only for ``serve`` and ``demo``, and
torch not before ``serve`` has started Ray, so that the two load at the same time.

Every refusal of a file or flag is one line on stderr, ``error: <file or flag>: <problem>``,
and exit status 2: each cause is raised as one of the few errors :func:`main` catches.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from pydantic import ValidationError

from serving.bundle import BundleError, load_bundle
from serving.manifest import InputError, Task, describe_validation_error
from training.exceptions import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig

log = logging.getLogger("espro")

DEMO_CONFIG = "mnist1d-demo"
MAX_INPUT_BYTES = 2**30
"""The largest input file ``espro predict`` reads, and the most data a ``.npy`` header may
declare."""


def _device(name: str) -> torch.device:
    """The device ``--device`` names; a name that is none, or CUDA where there is none, is a
    ConfigError naming the flag."""
    from training.config import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError:  # torch.device's own parse error
        raise ConfigError(
            f"--device: {name!r} is not a device (cpu, cuda, cuda:N or auto)"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"--device: {err}") from None


def _strict_json(value: Any, source: str | Path) -> str:
    """``value`` as JSON, which has no NaN or infinity: a network whose outputs overflow
    produces them, and that is an InputError naming ``source`` rather than invalid JSON."""
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError:
        raise InputError(f"{source}: the network's outputs are not finite numbers") from None


def _ray_runner(config: TrainConfig, address: str | None) -> Any:
    """Ray tasks for the simplexes, one GPU each when training on CUDA."""
    from serving.cluster import connect
    from training.config import resolve_device
    from training.distributed import RayRunner

    connect(address)
    return RayRunner(num_gpus=1 if resolve_device(config.device).type == "cuda" else 0)


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
    from training.diagnostics import SimplexDiagnostics, diagnostics_table

    manifest = load_bundle(path).manifest
    print(f"\nbundle written to {path}\n")
    search = manifest.training.get("lambda_search")
    if search:
        scores = ", ".join(
            f"{g:g}: {s:.4f}" for g, s in zip(search["grid"], search["scores"], strict=True)
        )
        print(
            f"λ search (validation NLL) {scores} -> λ = {search['best']:g} "
            f"({search['seconds']:.1f} s, {search['vertex_epochs']} vertex epochs)\n"
        )
        if search.get("warning"):
            print(f"warning: {search['warning']}\n")
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

    device = _device(args.device)
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
        text = _strict_json(results, args.bundle) + "\n"
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


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, its header checked before anything is allocated: the data it declares
    must lie in the file and within ``MAX_INPUT_BYTES``. Never unpickles."""
    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    with open(path, "rb") as f:
        version = npy.read_magic(f)
        if version not in readers:
            raise InputError(f"{path}: unsupported .npy format version {version}")
        shape, _, dtype = readers[version](f)
        declared = math.prod(shape) * dtype.itemsize
        available = os.fstat(f.fileno()).st_size - f.tell()
        if declared > min(available, MAX_INPUT_BYTES):
            raise InputError(
                f"{path}: its header declares {declared} bytes of data; the file holds "
                f"{available} and the limit is {MAX_INPUT_BYTES}"
            )
        f.seek(0)
        return npy.read_array(f, allow_pickle=False)


def _read_json(path: Path) -> np.ndarray:
    """A JSON list of instances, or ``{"inputs": [...]}``, as an array of its values' type."""
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise InputError(f"{path}: larger than {MAX_INPUT_BYTES} bytes")
    data = json.loads(path.read_bytes())
    if isinstance(data, dict) and "inputs" not in data:
        raise InputError(f'{path}: expected a JSON list or {{"inputs": [...]}}')
    return np.asarray(data["inputs"] if isinstance(data, dict) else data)


def read_inputs(path: str | Path) -> torch.Tensor:
    """Inputs from a ``.npy`` file (no pickle) or a JSON list / ``{"inputs": [...]}``, as
    float32. A file that cannot be read, or holds anything but real numbers within float32's
    range, is an InputError naming it; the shape is checked against a bundle later."""
    import torch

    path = Path(path)
    if path.suffix not in (".npy", ".json"):
        raise InputError(f"{path}: expected a .npy or .json file")
    try:
        array = _read_npy(path) if path.suffix == ".npy" else _read_json(path)
    except InputError:
        raise
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested too deep
        raise InputError(f"{path}: cannot read inputs: {err}") from None
    if array.dtype.kind not in "iuf":
        raise InputError(f"{path}: expected real numbers, got {array.dtype} values")
    with np.errstate(over="ignore", invalid="ignore"):
        values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"{path}: inputs must be finite numbers within float32's range")
    return torch.from_numpy(np.ascontiguousarray(values))


def format_records(records: list[dict[str, Any]], task: Task) -> str:
    """A readable table of native-JSON prediction records."""
    if task is Task.REGRESSION:
        keys = ["mean", "variance", "aleatoric", "epistemic"]
    else:
        keys = ["class_name", "confidence", "entropy", "mutual_information", "prediction_set"]
        keys += ["abstain"] if records and "abstain" in records[0] else []
    rows = [["#", *keys]]
    for i, r in enumerate(records):
        cells = [
            f"{r[k]:.4f}"
            if isinstance(r[k], float)
            else ",".join(r[k])
            if isinstance(r[k], list)
            else str(r[k])
            for k in keys
        ]
        rows.append([str(i), *cells])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def print_predictions(
    bundle: str | Path,
    inputs: str | Path,
    *,
    draws: int | None = None,
    members: bool = False,
    as_json: bool = False,
    device: str = "cpu",
    allow_custom_architecture: bool = False,
) -> None:
    """Predict offline from a bundle and print a table or the native JSON response."""
    from serving.predictor import Predictor
    from serving.wire import predict_response

    torch_device = _device(device)
    x = read_inputs(inputs)
    predictor = Predictor.from_path(
        bundle, device=torch_device, allow_custom_architecture=allow_custom_architecture
    )
    try:
        x = predictor.ensemble.check_inputs(x)
    except InputError as err:
        raise InputError(f"{inputs}: {err}") from None
    try:  # the inputs are checked: what is left to refuse is the number of draws
        prediction = predictor.predict(x, draws=draws, return_members=members)
    except InputError as err:
        raise InputError(f"--draws: {err}") from None
    response = predict_response(prediction, predictor.bundle).model_dump(exclude_none=True)
    text = _strict_json(response, inputs)  # refuses NaN in the table too
    if as_json:
        print(text)
    else:
        manifest = predictor.manifest
        print(f"{manifest.name} v{manifest.version} ({predictor.bundle.digest[:12]})")
        print(format_records(response["predictions"], manifest.task))


def _predict(args: argparse.Namespace) -> int:
    print_predictions(
        args.bundle,
        args.input,
        draws=args.draws,
        members=args.members,
        as_json=args.json,
        device=args.device,
        allow_custom_architecture=args.allow_custom_architecture,
    )
    return 0


SERVE_APP_FLAGS = {
    "replicas": "replicas",
    "device": "device",
    "num_cpus": "replica_cpus",
    "max_batch_size": "max_batch_size",
    "max_ongoing_requests": "max_ongoing_requests",
    "max_queued_requests": "max_queued_requests",
    "max_fresh_draws": "max_fresh_draws",
    "allow_custom_architecture": "allow_custom_architecture",
    "auth_token_file": "auth_token_file",
    "engine": "engine",
    "direct_grpc_port": "direct_grpc_port",
    "direct_grpc_host": "host",
}
SERVE_LAUNCH_FLAGS = (
    "address",
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "request_timeout_s",
)


def serve_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The validated :class:`~serving.settings.AppConfig` and ``LaunchConfig`` of the flags."""
    from serving.settings import AppConfig, LaunchConfig

    app: dict[str, Any] = {"bundles": args.bundles}
    app |= {field: getattr(args, flag) for field, flag in SERVE_APP_FLAGS.items()}
    if args.batch_wait_ms is not None:
        app["batch_wait_timeout_s"] = args.batch_wait_ms / 1000
    if args.max_body_mb is not None:
        app["max_body_bytes"] = int(args.max_body_mb * (1 << 20))
    launch = {flag: getattr(args, flag) for flag in SERVE_LAUNCH_FLAGS}
    launch["num_cpus"] = args.ray_cpus
    try:
        return (
            AppConfig.model_validate({k: v for k, v in app.items() if v is not None}),
            LaunchConfig.model_validate({k: v for k, v in launch.items() if v is not None}),
        )
    except ValidationError as err:
        raise ConfigError(f"espro serve: {describe_validation_error(err)}") from None


def _launcher() -> Any:
    """``serving.launch``, or a clear error where Ray Serve is not installed."""
    try:
        from serving import launch
    except ImportError as err:
        message = f"serving needs the serving extra, pip install 'espro[serving]': {err}"
        raise ConfigError(message) from None
    return launch


def _serve(args: argparse.Namespace) -> int:
    app, launch = serve_configs(args)
    launcher = _launcher()
    try:
        launcher.serve_until_stopped(app, launch)
    except launcher.DeployError as err:
        print(f"error: espro did not start: {err}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
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
        _launcher()
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


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line in one line, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``espro`` command."""
    parser = _Parser(
        prog="espro",
        description="Train and run ESPRO simplex ensembles with calibrated uncertainty.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a complex from a YAML/TOML config and write a bundle")
    p.add_argument("config", help="config file, or the name of a built-in config")
    p.add_argument("-o", "--output", help="bundle directory (default runs/NAME-VERSION)")
    p.add_argument("--workdir", help="checkpoint directory (default OUTPUT.work)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--lambda", dest="lam", type=float, help="fix the volume weight λ (no search)")
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
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score single model, deep ensemble and ESPRO of a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", help="also write the full results to this file")
    p.add_argument("--severities", type=float, nargs="+", help="Gaussian-noise severities")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--allow-custom-architecture", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report", help="print the metrics stored in bundles (mean ± std over many)")
    p.add_argument("bundles", nargs="+")
    p.set_defaults(func=_report)

    p = sub.add_parser("predict", help="predict offline from a bundle")
    p.add_argument("bundle")
    p.add_argument("input", help=".npy array or JSON list of instances")
    p.add_argument("--draws", type=int, help="draws per simplex (default: all)")
    p.add_argument("--members", action="store_true", help="include member probabilities")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--allow-custom-architecture", action="store_true")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "serve",
        help="serve bundles over HTTP (native JSON, OIP v2 REST) and gRPC (OIP v2) with Ray Serve",
        description="Start a local Ray (or join one with --address), deploy the bundles, and "
        "serve until Ctrl-C. A bundle listed later is the newer version of its model.",
    )
    p.add_argument("bundles", nargs="+", help="bundle directories")
    p.add_argument("--host", help="address the doors bind to (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 9000)")
    p.add_argument(
        "--direct-grpc-port",
        type=int,
        help="also serve gRPC from each replica on this port, past Serve's proxy (default off)",
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus port of a local Ray (8080)")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument(
        "--request-timeout-s", type=float, help="answer 408 after this long (default 60)"
    )
    p.add_argument("--ray-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--replicas", type=int, help="replicas of the model deployment (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="replica device (cpu)")
    p.add_argument("--replica-cpus", type=float, help="CPUs per replica (default 1)")
    p.add_argument("--max-batch-size", type=int, help="requests per engine run (default 32)")
    p.add_argument("--batch-wait-ms", type=float, help="wait for a batch to fill (default 2)")
    p.add_argument("--max-ongoing-requests", type=int, help="requests per replica (default 256)")
    p.add_argument("--max-queued-requests", type=int, help="queued before 503 (default 256)")
    p.add_argument("--max-fresh-draws", type=int, help="extra draws a request may ask (0)")
    p.add_argument("--max-body-mb", type=float, help="request size limit in MiB (default 64)")
    p.add_argument("--allow-custom-architecture", action="store_true", default=None)
    p.add_argument("--auth-token-file", help="require a bearer token from this file (per line)")
    p.add_argument(
        "--engine", help="member engine: fused:graphs (default), reference, shortcut, onnx"
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "demo", help="train, evaluate, predict, serve and query on the embedded MNIST-1D data"
    )
    p.add_argument("-o", "--output", default="runs/demo", help="demo directory")
    p.add_argument("--no-serve", action="store_true", help="stop after offline prediction")
    p.set_defaults(func=_demo)

    p = sub.add_parser("configs", help="list the built-in configs, or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_configs)

    p = sub.add_parser(
        "experiment",
        help="run a reproduction experiment; writes report.md, figures and results.json",
    )
    p.add_argument("name", nargs="?", help="the experiment (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--quick", action="store_true", help="a seconds-sized smoke run")
    p.add_argument("-o", "--output", help="output folder (default docs/reproduction/NAME)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.set_defaults(func=_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``espro`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (
        BundleError,
        CheckpointError,
        ConfigError,
        DataError,
        FileExistsError,
        InputError,
    ) as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

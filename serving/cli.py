"""The ``espro`` command: ``predict`` and ``serve`` here, and the commands of every provider
in the ``espro.commands`` entry-point group (the trainer's ``train``, ``evaluate``, ...).

A provider is a function ``add_commands(subparsers)`` that adds its subcommands, each with a
``func`` default that runs it. ``espro --help`` loads every provider, so importing one must
stay cheap: no torch, no scikit-learn.

Each command imports what it needs when it runs: torch not before ``serve`` has started Ray,
so that the two load at the same time.

Every refusal of a file or flag is one line on stderr, ``error: <file or flag>: <problem>``,
and exit status 2: whatever :class:`~serving.errors.EsproError` a command raises, of any
subclass, or an ``OSError`` (a file that cannot be read or written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from pydantic import ValidationError

from serving import serve_flags
from serving.devices import resolve_device
from serving.errors import (
    CommandError,
    DeployError,
    EsproError,
    InputError,
    ServiceError,
    describe_validation_error,
)
from serving.manifest import Manifest, Task

if TYPE_CHECKING:
    import torch

COMMANDS_GROUP = "espro.commands"
MAX_INPUT_BYTES = 2**30
"""The largest input file ``espro predict`` reads, and the most data a ``.npy`` header may
declare."""
ARRAY_SUFFIXES = (".npy", ".json")
REFUSALS = (EsproError, OSError)
"""What ``espro`` prints as one line, exit status 2, rather than as a traceback."""


def strict_json(value: Any, source: str | Path) -> str:
    """``value`` as JSON, which has no NaN or infinity: a network whose outputs overflow
    produces them, and that is an InputError naming ``source`` rather than invalid JSON."""
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError:
        raise InputError(f"{source}: the network's outputs are not finite numbers") from None


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
    if path.suffix not in ARRAY_SUFFIXES:
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


def read_images(paths: Sequence[Path], manifest: Manifest) -> torch.Tensor:
    """Image files as raw instances ``[N, C, H, W]``, decoded as the bundle's training images
    were (:mod:`serving.images`); an InputError names the file it refuses."""
    import torch

    from serving.images import decode_images

    spec = manifest.input.image
    if spec is None:
        raise InputError(
            f"{paths[0]}: expected a .npy or .json file (model {manifest.name} was not "
            "trained on images)"
        )
    instances = []
    for path in paths:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InputError(f"{path}: over {MAX_INPUT_BYTES} bytes")
        try:
            instances.append(decode_images([path.read_bytes()], spec))
        except ServiceError as err:
            raise InputError(f"{path}{err.message.removeprefix('image 0')}") from None
    return torch.cat(instances)


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
    inputs: str | Path | Sequence[str | Path],
    *,
    draws: int | None = None,
    members: bool = False,
    as_json: bool = False,
    device: str = "cpu",
    allow_custom_architecture: bool = False,
) -> None:
    """Predict offline from a bundle and print a table or the native JSON response.

    ``inputs`` is one ``.npy`` or ``.json`` file of instances, or image files for a bundle
    trained on images."""
    from serving.predictor import Predictor
    from serving.wire import predict_response

    paths = [Path(inputs)] if isinstance(inputs, str | Path) else [Path(p) for p in inputs]
    arrays = [p for p in paths if p.suffix in ARRAY_SUFFIXES]
    if arrays and len(paths) > 1:
        raise InputError(f"{arrays[0]}: give one .npy or .json file, or image files")
    torch_device = resolve_device(device, source="--device")
    x = read_inputs(paths[0]) if arrays else None
    predictor = Predictor.from_path(
        bundle, device=torch_device, allow_custom_architecture=allow_custom_architecture
    )
    if x is None:
        x = read_images(paths, predictor.manifest)
    inputs = paths[0]
    try:
        x = predictor.check_inputs(x)
    except InputError as err:
        raise InputError(f"{inputs}: {err}") from None
    try:  # the inputs are checked: what is left to refuse is the number of draws
        prediction = predictor.predict(x, draws=draws, return_members=members)
    except InputError as err:
        raise InputError(f"--draws: {err}") from None
    response = predict_response(prediction, predictor.bundle).model_dump(exclude_none=True)
    text = strict_json(response, inputs)  # refuses NaN in the table too
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


def launcher(command: str) -> ModuleType:
    """:mod:`serving.launch`, or a CommandError where Ray Serve is not installed."""
    try:
        from serving import launch
    except ImportError as err:
        message = f"espro {command} needs the serving extra: pip install 'espro[serving]' ({err})"
        raise CommandError(message) from None
    return launch


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = serve_flags.serve_configs(args)
    except ValidationError as err:
        raise CommandError(f"espro serve: {describe_validation_error(err)}") from None
    except ValueError as err:
        raise CommandError(f"espro serve: {err}") from None
    serving_launch = launcher("serve")
    try:
        serving_launch.serve_until_stopped(settings)
    except DeployError as err:
        print(f"error: espro did not start: {err}", file=sys.stderr)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line in one line, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``espro`` command, with every provider's commands."""
    parser = _Parser(
        prog="espro",
        description="Train and run ESPRO simplex ensembles with calibrated uncertainty.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict offline from a bundle")
    p.add_argument("bundle")
    p.add_argument(
        "input",
        nargs="+",
        help=".npy array or JSON list of instances, or images (PNG, JPEG) for an image bundle",
    )
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
    serve_flags.add_arguments(p)
    p.set_defaults(func=_serve)

    for provider in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        provider.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``espro`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except REFUSALS as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

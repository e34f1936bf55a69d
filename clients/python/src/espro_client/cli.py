"""The ``espro-client`` command: ``predict``, ``health`` and ``models`` against a server.

Every error is one line on stderr, ``error: <file, flag or URL>: <problem>``: exit status 2
for a file or flag refused here, 1 for a server that refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from espro_client.client import Client, Protocol
from espro_client.errors import EsproError
from espro_client.result import Prediction

_COLUMNS = ("label", "confidence", "entropy", "mutual_information", "abstain")
MAX_INPUT_BYTES = 2**30
"""The most data a ``.npy`` header may declare."""


class UsageError(ValueError):
    """A file or flag the command refuses; the message names it."""


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line in one line, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="espro-client", description="Predict with, check and list an espro server."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "url", help="http(s)://host:port, or grpc://host:port (TLS: grpcs://) for gRPC"
        )
        sub.add_argument(
            "--protocol",
            choices=["native", "oip-rest", "oip-grpc"],
            help="the API to speak; default: oip-grpc for grpc:// URLs, else native (JSON)",
        )
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
        sub.add_argument(
            "--token-file", type=Path, help="send the bearer token in this file (first line)"
        )
        sub.add_argument(
            "--ca-cert",
            type=Path,
            help="verify an https:// or grpcs:// server against this PEM CA bundle "
            "(default: the system's trust store; gRPC's default roots for grpcs://)",
        )
        sub.add_argument(
            "--client-cert", type=Path, help="present this PEM certificate (mutual TLS)"
        )
        sub.add_argument("--client-key", type=Path, help="the PEM key of --client-cert")
        sub.add_argument(
            "--allow-insecure",
            action="store_true",
            help="send --token-file's token over plain http:// or grpc:// beyond loopback",
        )
        return sub

    predict = command(
        "predict", "predict the instances of a .npy file [B, *input_shape], or image files"
    )
    predict.add_argument(
        "inputs",
        nargs="+",
        help="a .npy file, or PNG/JPEG files for a model trained on images",
    )
    predict.add_argument(
        "--model", help="default: the only model served (native and oip-rest protocols)"
    )
    predict.add_argument("--version", help="a model version (oip-rest and oip-grpc protocols)")
    predict.add_argument("--draws", type=int, help="draws per simplex")
    predict.add_argument("--members", action="store_true", help="return member probabilities")
    predict.add_argument("--chunk-size", type=int, default=1024, help="instances per request")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    command("health", "whether the server is live and ready")
    command("models", "the served models, versions and bundle hashes").add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    return parser


def _read_inputs(path: str) -> np.ndarray:
    """The instances of a ``.npy`` file: real numbers, its header checked before anything is
    allocated (the data it declares must lie in the file and within ``MAX_INPUT_BYTES``).
    Never unpickles."""
    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version not in readers:
                raise UsageError(f"{path}: unsupported .npy format version {version}")
            shape, _, dtype = readers[version](f)
            declared = math.prod(shape) * dtype.itemsize
            available = os.fstat(f.fileno()).st_size - f.tell()
            if declared > min(available, MAX_INPUT_BYTES):
                raise UsageError(
                    f"{path}: its header declares {declared} bytes of data; the file holds "
                    f"{available} and the limit is {MAX_INPUT_BYTES}"
                )
            if dtype.kind not in "iuf":
                raise UsageError(f"{path}: expected real numbers, got {dtype} values")
            f.seek(0)
            array = npy.read_array(f, allow_pickle=False)
    except UsageError:
        raise
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot read a .npy array: {err}") from None
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(array.astype(np.float32)).all():
            raise UsageError(f"{path}: inputs must be finite numbers within float32's range")
    if array.ndim == 0 or len(array) == 0:
        raise UsageError(f"{path}: expected a batch [B, *input_shape] with B ≥ 1")
    return array


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_predict_inputs(paths: list[str]) -> np.ndarray | list[Path]:
    """One ``.npy`` file's instances, or image files (read by the client as it sends them)."""
    if all(p.lower().endswith(IMAGE_SUFFIXES) for p in paths):
        for path in paths:
            if not os.path.isfile(path):
                raise UsageError(f"{path}: no such image file")
        return [Path(p) for p in paths]
    if len(paths) != 1:
        raise UsageError("pass one .npy file, or only image files (.png, .jpg, .jpeg)")
    return _read_inputs(paths[0])


def _read_token(path: Path) -> str:
    try:
        return path.read_text().split("\n")[0].strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--token-file: {path}: cannot be read: {err}") from None


def _protocol(args: argparse.Namespace) -> Protocol:
    if args.protocol is not None:
        return args.protocol  # type: ignore[no-any-return]
    return "oip-grpc" if args.url.startswith(("grpc://", "grpcs://")) else "native"


def _only_model(client: Client) -> str:
    names = [model.name for model in client.models()]
    if len(names) != 1:
        raise EsproError(f"the server serves {', '.join(names) or 'no models'}: pass --model")
    return names[0]


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _prediction_json(prediction: Prediction) -> dict[str, Any]:
    values = {f.name: getattr(prediction, f.name) for f in fields(prediction)}
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in values.items()}


def _prediction_table(p: Prediction) -> str:
    def column(name: str) -> Sequence[Any]:
        values = getattr(p, name if name != "label" else "labels")
        return [None] * len(p) if values is None else values.tolist()

    columns = {name: column(name) for name in _COLUMNS}
    if (names := p.class_names) is not None:
        columns["label"] = [f"{i} ({n})" for i, n in zip(columns["label"], names, strict=True)]
    if p.prediction_set_names is not None:
        columns["prediction_set"] = [" ".join(s) for s in p.prediction_set_names]
    elif (sets := p.prediction_sets) is not None:
        columns["prediction_set"] = [" ".join(map(str, np.flatnonzero(s))) for s in sets]
    title = f"{p.model_name}:{p.model_version} bundle {p.bundle_sha256}"
    rows = [[i, *values] for i, values in enumerate(zip(*columns.values(), strict=True))]
    return f"{title}\n{_table(['#', *columns], rows)}"


def _run(args: argparse.Namespace) -> tuple[str, int]:
    """What to print, and the exit status."""
    token = None if args.token_file is None else _read_token(args.token_file)
    if args.command == "predict":
        inputs = _read_predict_inputs(args.inputs)
        if args.chunk_size < 1:
            raise UsageError(f"--chunk-size: must be at least 1, got {args.chunk_size}")
        if args.version is not None and _protocol(args) == "native":
            raise UsageError(
                "--version: the native protocol answers with the newest version; "
                "pass --protocol oip-rest or oip-grpc"
            )
    try:
        client = Client(
            args.url,
            protocol=_protocol(args),
            timeout=args.timeout,
            token=token,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            allow_insecure=args.allow_insecure,
        )
    except ValueError as err:  # a URL, certificate or key refused before anything is sent
        raise UsageError(str(err)) from None
    with client:
        if args.command == "health":
            live, ready = client.health(), client.ready()
            return json.dumps({"live": live, "ready": ready}), 0 if live and ready else 1
        if args.command == "models":
            models = client.models()
            if args.json:
                return json.dumps([asdict(m) for m in models], indent=2), 0
            rows = [[m.name, v.version, v.bundle_sha256] for m in models for v in m.versions]
            return _table(["model", "version", "bundle_sha256"], rows), 0
        client.chunk_size = args.chunk_size
        send = client.predict if isinstance(inputs, np.ndarray) else client.predict_images
        prediction = send(
            args.model or _only_model(client),
            inputs,
            version=args.version,
            draws=args.draws,
            return_members=args.members,
        )
        if args.json:
            try:
                return json.dumps(_prediction_json(prediction), allow_nan=False), 0
            except ValueError:
                raise EsproError("the answer holds NaN or infinite numbers") from None
        return _prediction_table(prediction), 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. Exit status 2: a file or flag is refused; 1: the server refused,
    is unreachable, or (for ``health``) is not live and ready."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # its log lines would split an error
    args = _parser().parse_args(argv)
    try:
        text, status = _run(args)
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except EsproError as err:
        print(f"error: {args.url}: {_one_line(err)}", file=sys.stderr)
        return 1
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Bundles by URL (serving/fetch.py) against a real S3 API (moto's server) and a real HTTP
server, both on 127.0.0.1 only: run these in a loopback-only namespace (README)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import tiny_bundle
from serving import serve_flags
from serving.bundle import load_bundle
from serving.cli import build_parser
from serving.errors import BundleError
from serving.fetch import (
    CACHE_ENV,
    fetch_bundle,
    is_url,
    main,
    prune_cache,
    public_url,
    resolve_bundle,
)
from serving.launch import check_bundles
from serving.manifest import MANIFEST_FILE, TENSORS_FILE
from serving.service import ModelRepository
from serving.settings import AppConfig

BUCKET = "models"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().write(tmp_path_factory.mktemp("local") / "bundle")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, which is also the default one (``$ESPRO_CACHE``)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------- S3


class S3:
    """moto's S3 server on 127.0.0.1, with a boto3 client that puts objects in it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.running = True

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def put_bundle(self, prefix: str, files: dict[str, bytes]) -> str:
        client = self.client()
        for name, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)
        return f"s3://{BUCKET}/{prefix}"

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.server._server.server_close()  # stop() leaves the socket listening
            self.running = False


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A fresh S3 with one bucket, which s3fs reaches through the AWS_* environment, as a pod
    would with the credentials of a Secret."""
    server = S3()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": server.endpoint,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def files_of(bundle: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in bundle.iterdir()}


def cache_entries(cache: Path) -> list[str]:
    """The published bundles and any staging directory left behind."""
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name != ".urls")


def test_a_bundle_in_s3_is_fetched_verified_and_then_served_from_the_cache(
    s3: S3, bundle: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = s3.put_bundle("demo", files_of(bundle))
    local = fetch_bundle(url)
    expected = load_bundle(bundle).digest
    assert local == cache / expected
    assert load_bundle(local).digest == expected
    assert cache_entries(cache) == [expected]
    assert fetch_bundle(url) == local  # the manifest again, nothing else
    s3.stop()
    with caplog.at_level(logging.WARNING, logger="serving.fetch"):
        assert fetch_bundle(url) == local
    assert "using the bundle it last gave" in caplog.text
    assert "testing-secret" not in caplog.text
    with pytest.raises(BundleError, match=r"s3://models/other: manifest.json cannot be downloaded"):
        fetch_bundle(f"s3://{BUCKET}/other")  # never fetched: nothing to fall back on


def test_a_tampered_object_is_refused_and_nothing_is_published(
    s3: S3, bundle: Path, cache: Path
) -> None:
    files = files_of(bundle)
    tensors = bytearray(files[TENSORS_FILE])
    tensors[-1] ^= 1
    url = s3.put_bundle("tampered", files | {TENSORS_FILE: bytes(tensors)})
    with pytest.raises(BundleError, match=rf"{url}: sha256 mismatch for {TENSORS_FILE}"):
        fetch_bundle(url)
    assert cache_entries(cache) == []


def test_a_missing_file_is_refused(s3: S3, bundle: Path, cache: Path) -> None:
    url = s3.put_bundle("half", {MANIFEST_FILE: (bundle / MANIFEST_FILE).read_bytes()})
    with pytest.raises(BundleError, match=rf"^{url}: {TENSORS_FILE} is missing$"):
        fetch_bundle(url)
    with pytest.raises(BundleError, match=rf"^s3://{BUCKET}/nothing: {MANIFEST_FILE} is missing$"):
        fetch_bundle(f"s3://{BUCKET}/nothing")
    assert cache_entries(cache) == []


def manifest_with(bundle: Path, **changes: Any) -> bytes:
    data = json.loads((bundle / MANIFEST_FILE).read_bytes())
    return json.dumps(data | changes).encode()


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (lambda b: b"{not json", "manifest.json is not valid JSON"),
        (lambda b: b"[]", "manifest.json has no schema_version"),
        (lambda b: manifest_with(b, num_outputs=0), "manifest.json is invalid: num_outputs"),
        (lambda b: manifest_with(b, files={}), f"the manifest lists no hash for {TENSORS_FILE}"),
        (
            lambda b: manifest_with(b, files={TENSORS_FILE: "0" * 64, "../escape": "0" * 64}),
            "the manifest names a file outside the bundle: '../escape'",
        ),
        (
            lambda b: manifest_with(b, files={TENSORS_FILE: "not a hash"}),
            f"the manifest's sha256 of {TENSORS_FILE} is not a sha256",
        ),
    ],
    ids=["not-json", "not-a-manifest", "invalid-field", "no-tensors", "traversal", "bad-hash"],
)
def test_an_invalid_manifest_is_refused_before_any_file_is_downloaded(
    s3: S3, bundle: Path, cache: Path, manifest: Any, message: str
) -> None:
    # No tensor file in the store: a download would fail with "missing" instead.
    url = s3.put_bundle("bad", {MANIFEST_FILE: manifest(bundle)})
    with pytest.raises(BundleError, match=f"^{url}: {message}"):
        fetch_bundle(url)
    assert cache_entries(cache) == []


def test_a_file_past_the_size_limit_is_refused(s3: S3, bundle: Path, cache: Path) -> None:
    url = s3.put_bundle("big", files_of(bundle))
    with pytest.raises(BundleError, match=rf"{TENSORS_FILE} has \d+ bytes; the limit is 100$"):
        fetch_bundle(url, max_file_bytes=100)
    assert cache_entries(cache) == []


def test_the_serving_seams_take_urls(s3: S3, bundle: Path, cache: Path) -> None:
    """`espro serve` and AppConfig keep a URL as it is; the driver's check fetches and verifies
    it; each replica's ModelRepository.load fetches it into its own cache."""
    url = s3.put_bundle("demo", files_of(bundle))
    args = build_parser().parse_args(["serve", url, str(bundle)])
    config = serve_flags.serve_configs(args).app
    assert config.bundles == [url, str(bundle)]
    assert check_bundles(config).bundles == [url, str(bundle.resolve())]
    digest = load_bundle(bundle).digest
    assert cache_entries(cache) == [digest]
    repository, refused = ModelRepository.load([url, f"s3://{BUCKET}/missing"])
    assert refused == [f"s3://{BUCKET}/missing: {MANIFEST_FILE} is missing"]
    (predictor,) = repository.predictors()
    assert predictor.bundle.digest == digest
    assert predictor.bundle.path == cache / digest


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(_registry, "s3", raising=False)
    with pytest.raises(BundleError) as caught:
        fetch_bundle("s3://models/demo")
    message = str(caught.value)
    assert message.startswith("s3://models/demo: ") and "pip install 'espro[remote]'" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- HTTP


class Handler(SimpleHTTPRequestHandler):
    """Serves the server's directory; a file named in ``server.cut`` is cut off halfway: its
    full length announced, half of it sent, the connection closed."""

    server: Files

    def __init__(self, request: Any, address: Any, server: Files) -> None:
        super().__init__(request, address, server, directory=str(server.root))

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.server.cut:
            return super().do_GET()
        data = (self.server.root / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        return None

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Files(ThreadingHTTPServer):
    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.cut: set[str] = set()


@pytest.fixture
def http(bundle: Path) -> Iterator[Files]:
    server = Files(bundle.parent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_dropped_connection_is_refused_then_retried_cleanly(
    http: Files, bundle: Path, cache: Path
) -> None:
    url = f"http://127.0.0.1:{http.server_port}/{bundle.name}"
    http.cut.add(TENSORS_FILE)
    with pytest.raises(BundleError, match=rf"^{url}: {TENSORS_FILE} cannot be downloaded"):
        fetch_bundle(url)
    assert cache_entries(cache) == []
    http.cut.clear()
    assert load_bundle(fetch_bundle(url)).digest == load_bundle(bundle).digest


def test_credentials_in_a_url_stay_out_of_messages(http: Files, cache: Path) -> None:
    port = http.server_port
    url = f"http://user:hunter2@127.0.0.1:{port}/missing?token=s3cr3t"
    assert public_url(url) == f"http://127.0.0.1:{port}/missing"
    with pytest.raises(BundleError) as caught:
        fetch_bundle(url)
    assert "hunter2" not in str(caught.value) and "s3cr3t" not in str(caught.value)


# --------------------------------------------------------------------------- file://


def test_file_urls_are_fetched_and_local_paths_are_left_alone(bundle: Path, cache: Path) -> None:
    assert resolve_bundle(bundle) == bundle and resolve_bundle(str(bundle)) == bundle
    assert not cache.exists()
    assert is_url(bundle.as_uri()) and not is_url(str(bundle))
    local = resolve_bundle(bundle.as_uri())
    assert local.parent == cache and local.name == load_bundle(bundle).digest
    assert files_of(local) == files_of(bundle)


def test_a_pinned_url_loads_its_digest_and_refuses_any_other(
    bundle: Path, cache: Path, tmp_path: Path
) -> None:
    digest = load_bundle(bundle).digest
    store = Path(shutil.copytree(bundle, tmp_path / "store"))
    assert fetch_bundle(f"{store.as_uri()}#sha256={digest}") == cache / digest
    # Once cached, a pinned bundle loads without asking the store: it may be gone.
    shutil.rmtree(store)
    assert fetch_bundle(f"{store.as_uri()}#sha256={digest}") == cache / digest
    other = "0" * 64
    refusal = f"the manifest's sha256 is {digest}; the URL pins {other}"
    with pytest.raises(BundleError, match=refusal):
        fetch_bundle(f"{bundle.as_uri()}#sha256={other}")
    assert cache_entries(cache) == [digest]
    with pytest.raises(BundleError, match=r"pins a bundle as #sha256=<64 lowercase hex digits>"):
        fetch_bundle(f"{bundle.as_uri()}#md5=abc")


def test_concurrent_fetches_of_one_digest_publish_it_once(bundle: Path, cache: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fetch_bundle(bundle.as_uri()), range(8)))
    assert len(set(results)) == 1
    assert cache_entries(cache) == [load_bundle(bundle).digest]


def test_the_prefetch_command(bundle: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([bundle.as_uri()]) == 0
    assert capsys.readouterr().out == f"{cache / load_bundle(bundle).digest}\n"
    assert main([(bundle.parent / "none").as_uri()]) == 2
    assert capsys.readouterr().err.startswith("error: file://")


def test_prune_keeps_the_bundles_it_is_given_and_removes_the_rest(
    bundle: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tiny_bundle(seed=5).write(tmp_path / "other")
    old = fetch_bundle(other.as_uri())
    (cache / ".staging-killed").mkdir()
    kept = load_bundle(bundle).digest
    assert main(["--prune", bundle.as_uri()]) == 0
    assert capsys.readouterr().out == f"{cache / kept}\n"
    assert cache_entries(cache) == [kept] and not old.exists()
    assert prune_cache([bundle.as_uri()]) == []


def test_the_cache_holds_what_the_manifest_hashes(bundle: Path, cache: Path) -> None:
    """The cache's key is the digest load_bundle reports: the manifest's own sha256."""
    local = fetch_bundle(bundle.as_uri())
    assert local.name == hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()
    assert AppConfig(bundles=[bundle.as_uri()]).bundles == [bundle.as_uri()]


def test_a_cache_that_cannot_be_written_is_a_bundle_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(BundleError, match=r"^file://.*: the cache .* cannot be written"):
        fetch_bundle(bundle.as_uri(), cache=tmp_path / "file" / "cache")

"""Bundles by URL: a bundle directory anywhere fsspec reads (``file://``, ``https://``,
``s3://``, ``gs://``) fetched into a local cache and verified before anything loads it.

The manifest comes first and is validated; its sha256, the bundle's digest, names the cache
entry ``<cache>/<digest>``. Every file the manifest lists is then streamed into a staging
directory inside the cache, refused past a size limit, and checked against the manifest's
sha256; only a complete, verified bundle is renamed into place, so a reader finds a whole
bundle or none. Fetches of one digest take turns under a file lock, so replicas that start
together download it once. A digest already cached is not downloaded again, and a URL whose
manifest cannot be reached falls back to the digest it gave last, so that replicas restarting
while the store is down still serve.

A URL may pin its bundle with a ``#sha256=<digest>`` fragment (the ``bundle_sha256`` that
every answer and ``espro-client models`` report): a pinned bundle already in the cache loads
without asking the store, and a store whose manifest has another digest is refused, so that
whoever can write to the store cannot change what a pinned deployment serves.

Credentials come from the store's own configuration (``AWS_*`` variables, instance roles,
``GOOGLE_APPLICATION_CREDENTIALS``), never from espro; messages and logs show a URL without
its user, password or query. Local paths are not URLs: :func:`resolve_bundle` returns them as
they are, and fsspec is imported only for a URL.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from serving.bundle import MAX_FILE_BYTES, MAX_MANIFEST_BYTES, parse_manifest, sha256_file
from serving.errors import BundleError
from serving.manifest import MANIFEST_FILE, TENSORS_FILE, Manifest

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from fsspec.callbacks import Callback

logger = logging.getLogger(__name__)

CACHE_ENV = "ESPRO_CACHE"
"""The variable naming the cache directory (default ``~/.cache/espro/bundles``)."""
REMOTE_EXTRA = "pip install 'espro[remote]'"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A file name a manifest may list: no separator, no leading dot, nothing a store or a URL
would read as anything but the name itself."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Unreachable(BundleError):
    """The store did not answer (network, credentials, a timeout), as opposed to answering
    with a missing or invalid bundle."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def public_url(url: str) -> str:
    """``url`` as messages show it: without user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def cache_dir() -> Path:
    """Where fetched bundles are kept: ``$ESPRO_CACHE``, or ``~/.cache/espro/bundles``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "espro" / "bundles"


def resolve_bundle(location: str | Path, *, cache: str | Path | None = None) -> Path:
    """The local bundle directory of ``location``: a path as it is (nothing is copied), a URL
    fetched into the cache (:func:`fetch_bundle`)."""
    if isinstance(location, str) and is_url(location):
        return fetch_bundle(location, cache=cache)
    return Path(location)


def fetch_bundle(
    url: str, *, cache: str | Path | None = None, max_file_bytes: int = MAX_FILE_BYTES
) -> Path:
    """Fetch the bundle directory at ``url`` into the cache and return its verified local
    directory ``<cache>/<digest>``.

    Every refusal is a :class:`~serving.errors.BundleError` naming the URL, the file and the
    problem (missing, over ``max_file_bytes``, cut short, a sha256 that differs from the
    manifest's or from the URL's pin), and leaves nothing in the cache but what was there."""
    url, pin = _split_pin(url)
    cache = Path(cache) if cache is not None else cache_dir()
    if pin is not None and (cache / pin).is_dir():
        return cache / pin
    store = _Store.open(url)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    except OSError as err:
        message = f"{store.source}: the cache {cache} cannot be written: {err.strerror}"
        raise BundleError(message) from None
    try:
        try:
            manifest, digest = store.manifest(staging)
        except _Unreachable as err:
            digest = _remembered(cache, url)
            if digest is None or pin is not None:
                raise
            logger.warning("%s; using the bundle it last gave, %s", err, digest)
            return cache / digest
        if pin is not None and digest != pin:
            raise BundleError(
                f"{store.source}: the manifest's sha256 is {digest}; the URL pins {pin}"
            )
        target = cache / digest
        with _locked(cache / f".{digest}.lock"):
            if not target.is_dir():
                store.files(manifest, staging, max_file_bytes)
                for path in [*staging.iterdir(), staging]:  # a published entry survives a crash
                    _fsync(path)
                os.rename(staging, target)
                _fsync(cache)
                logger.info("fetched bundle %s (%s)", store.source, digest)
        _remember(cache, url, digest)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _split_pin(url: str) -> tuple[str, str | None]:
    """``url`` without its ``#sha256=<digest>`` fragment, and the digest it pins (if any)."""
    parts = urlsplit(url)
    if not parts.fragment:
        return url, None
    pin = parts.fragment.removeprefix("sha256=")
    if not parts.fragment.startswith("sha256=") or not _SHA256.fullmatch(pin):
        raise BundleError(
            f"{public_url(url)}: a URL's fragment pins a bundle as #sha256=<64 lowercase hex "
            "digits>, nothing else"
        )
    return urlunsplit(parts._replace(fragment="")), pin


@dataclass(frozen=True)
class _Store:
    """A bundle directory in an fsspec filesystem."""

    fs: AbstractFileSystem
    root: str
    url: str

    @property
    def source(self) -> str:
        return public_url(self.url)

    @classmethod
    def open(cls, url: str) -> _Store:
        """The store of ``url``, or a one-line BundleError naming what to install."""
        source = public_url(url)
        try:
            from fsspec.core import url_to_fs
        except ImportError:
            raise BundleError(f"{source}: bundle URLs need fsspec: {REMOTE_EXTRA}") from None
        try:
            # A new instance each time, which reads credentials and endpoints afresh.
            fs, root = url_to_fs(url, skip_instance_cache=True)
        except ImportError as err:
            message = f"{source}: {err} (s3:// and gs:// need {REMOTE_EXTRA})"
            raise BundleError(message) from None
        except ValueError as err:
            raise BundleError(f"{source}: not a URL that fsspec reads: {err}") from None
        return cls(fs, root.rstrip("/"), url)

    def manifest(self, staging: Path) -> tuple[Manifest, str]:
        """The validated manifest and its sha256, downloaded into ``staging``."""
        path = staging / MANIFEST_FILE
        self.download(MANIFEST_FILE, path, MAX_MANIFEST_BYTES)
        raw = path.read_bytes()
        return parse_manifest(raw, self.source), hashlib.sha256(raw).hexdigest()

    def files(self, manifest: Manifest, staging: Path, max_file_bytes: int) -> None:
        """Download and verify every file the manifest lists, having checked every name and
        hash it gives first, so that a bad manifest costs no download."""
        source = self.source
        if TENSORS_FILE not in manifest.files:
            raise BundleError(f"{source}: the manifest lists no hash for {TENSORS_FILE}")
        for name, expected in manifest.files.items():
            if not _FILE_NAME.fullmatch(name) or name == MANIFEST_FILE:
                message = f"{source}: the manifest names a file outside the bundle: {name!r}"
                raise BundleError(message)
            if not _SHA256.fullmatch(expected):
                raise BundleError(f"{source}: the manifest's sha256 of {name} is not a sha256")
        for name, expected in manifest.files.items():
            self.download(name, staging / name, max_file_bytes)
            actual = sha256_file(staging / name)
            if actual != expected:
                raise BundleError(
                    f"{source}: sha256 mismatch for {name}: manifest says {expected}, "
                    f"download has {actual}"
                )

    def download(self, name: str, target: Path, limit: int) -> None:
        """Stream one file to ``target``, stopping once it passes ``limit`` bytes (or once
        the store announces more)."""
        where = f"{self.source}: {name}"
        try:
            self.fs.get_file(f"{self.root}/{name}", str(target), callback=_limit(limit, where))
        except BundleError:
            raise
        except FileNotFoundError:
            raise BundleError(f"{where} is missing") from None
        except Exception as err:  # each store raises its own: aiohttp's, botocore's, google's
            text = " ".join(str(err).split()).replace(self.url, self.source)[:300]
            message = f"{where} cannot be downloaded: {type(err).__name__}: {text}"
            raise _Unreachable(message) from None
        if (size := target.stat().st_size) > limit:
            raise BundleError(f"{where} has {size} bytes; the limit is {limit}")


def _limit(limit: int, what: str) -> Callback:
    """An fsspec progress callback that aborts a download past ``limit`` bytes."""
    from fsspec.callbacks import Callback

    class Limit(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if self.size is not None and self.size > limit:
                raise BundleError(f"{what} has {self.size} bytes; the limit is {limit}")
            if self.value > limit:
                raise BundleError(f"{what} is larger than the limit of {limit} bytes")

    return Limit()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _url_record(cache: Path, url: str) -> Path:
    return cache / ".urls" / hashlib.sha256(url.encode()).hexdigest()


def _remember(cache: Path, url: str, digest: str) -> None:
    """Record the digest ``url`` gave, atomically, for when its store cannot be reached."""
    record = _url_record(cache, url)
    record.parent.mkdir(exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=record.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest)
    os.replace(temporary, record)


def _remembered(cache: Path, url: str) -> str | None:
    """The digest ``url`` gave last, where that bundle is still in the cache."""
    try:
        digest = _url_record(cache, url).read_text().strip()
    except OSError:
        return None
    return digest if _SHA256.fullmatch(digest) and (cache / digest).is_dir() else None


def prune_cache(keep: Sequence[str | Path], *, cache: str | Path | None = None) -> list[str]:
    """Remove every bundle from the cache but those of ``keep`` (fetched first, so that what
    is kept is whole), with what killed fetches left behind; return the removed digests.

    A bundle loads from its cache directory: prune while no server is loading one that it
    removes."""
    cache = Path(cache) if cache is not None else cache_dir()
    kept = {resolve_bundle(location, cache=cache).resolve() for location in keep}
    removed = []
    for entry in sorted(cache.iterdir()) if cache.is_dir() else []:
        if entry.name.startswith(".staging-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif _SHA256.fullmatch(entry.name) and entry.resolve() not in kept:
            with _locked(cache / f".{entry.name}.lock"):
                shutil.rmtree(entry)
            (cache / f".{entry.name}.lock").unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serving.fetch [--prune] LOCATION...``: fetch each bundle into the cache (a
    warm-up, or a check of a URL without starting a server) and print its local directory;
    with ``--prune``, then remove every other bundle from the cache."""
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m serving.fetch", description=main.__doc__)
    parser.add_argument("locations", nargs="+", metavar="LOCATION")
    parser.add_argument(
        "--prune", action="store_true", help="remove every other bundle from the cache"
    )
    args = parser.parse_args(argv)
    try:
        for location in args.locations:
            print(resolve_bundle(location))
        if args.prune:
            for digest in prune_cache(args.locations):
                logger.info("removed %s", digest)
    except BundleError as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

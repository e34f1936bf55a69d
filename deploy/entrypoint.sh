#!/bin/sh
# Container entrypoint: optionally fetch a bundle, then run `espro serve` with the arguments
# given (bundle directories first, then any `espro serve` flags; see `espro serve --help`).
#
#   ESPRO_BUNDLE_URL     a .tar.gz of one bundle directory (manifest.json, vertices.safetensors),
#                        at the archive's root or in one top-level directory; any URL that
#                        Python's urllib opens (https://, file://). Unset: bundles are mounted.
#   ESPRO_BUNDLE_SHA256  the archive's sha256; when set, a different archive is refused.
#   ESPRO_BUNDLE_DIR     where the fetched bundle goes (default /models/bundle), on a volume.
#
# The fetched bundle replaces the directory at start; `espro serve` then verifies it against
# its manifest (every file's sha256) before serving, as it does mounted bundles.
set -eu

if [ -n "${ESPRO_BUNDLE_URL:-}" ]; then
    python - <<'PY'
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

url = os.environ["ESPRO_BUNDLE_URL"]
expected = os.environ.get("ESPRO_BUNDLE_SHA256", "").strip().lower()
target = Path(os.environ.get("ESPRO_BUNDLE_DIR", "/models/bundle"))
target.parent.mkdir(parents=True, exist_ok=True)
# Work beside the target so the final rename stays on one filesystem.
work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
try:
    archive = work / "bundle.tar.gz"
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if expected and digest.hexdigest() != expected:
        sys.exit(f"bundle archive sha256 is {digest.hexdigest()}, ESPRO_BUNDLE_SHA256 says {expected}")
    unpacked = work / "unpacked"
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:  # plain files and directories inside the archive only
            parts = Path(member.name).parts
            if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
                sys.exit(f"refusing bundle archive member {member.name!r}")
        tar.extractall(unpacked, members=members)
    roots = [unpacked, *unpacked.iterdir()] if unpacked.is_dir() else []
    bundle = next((p for p in roots if (p / "manifest.json").is_file()), None)
    if bundle is None:
        sys.exit("bundle archive holds no manifest.json at its root or in one top-level directory")
    old = work / "old"
    if target.exists():
        target.rename(old)
    bundle.rename(target)
    print(f"fetched bundle {url} ({digest.hexdigest()}) into {target}", flush=True)
finally:
    shutil.rmtree(work, ignore_errors=True)
PY
fi

# The one place espro binds every interface: inside a container, 0.0.0.0 is the container's
# own network namespace, and Docker's published ports or Kubernetes Services decide what
# reaches it. Elsewhere `espro serve` keeps its 127.0.0.1 default.
exec espro serve --host 0.0.0.0 "$@"

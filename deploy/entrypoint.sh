#!/bin/sh
# Container entrypoint: `espro serve` with the arguments given, bundles first, then any
# `espro serve` flags (see `espro serve --help`). A bundle is a directory (mounted under
# /models) or the URL of one (s3://, gs://, https://), which espro fetches into its cache
# (~/.cache/espro/bundles, or $ESPRO_CACHE) and verifies against its manifest.
#
#   ESPRO_BUNDLE_URL  the bundle served when the arguments name none (they are empty, or
#                     start with a flag); unset, that bundle is /models/bundle.
#
# Credentials for the store come from its usual environment (AWS_ACCESS_KEY_ID, ...).
set -eu

case "${1:-}" in
    "" | -*) set -- "${ESPRO_BUNDLE_URL:-/models/bundle}" "$@" ;;
esac

# The one place espro binds every interface: inside a container, 0.0.0.0 is the container's
# own network namespace, and Docker's published ports or Kubernetes Services decide what
# reaches it. Elsewhere `espro serve` keeps its 127.0.0.1 default.
exec espro serve --host 0.0.0.0 "$@"

#!/usr/bin/env bash
# Install what lazysnap, its tests and its demo need on a Debian 12 host (as root), then the
# package itself in editable mode with its development extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(containerd runc docker-registry stargz-snapshotter skopeo umoci busybox-static
          fuse3 libfuse3-dev pkg-config gcc python3-dev erofs-utils iproute2 iptables jq curl attr
          openssl systemd apache2-utils)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# containerd's own unit must not grab /run/containerd while tests run their private instances.
if systemctl is-active --quiet containerd 2>/dev/null; then :; fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'

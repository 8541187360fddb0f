#!/usr/bin/env bash
# Install lazysnap system-wide on a Debian host, as root, from this checkout. Idempotent: running
# it again upgrades the package and leaves configuration alone. See docs/operations.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install.sh [options]

Installs the apt dependencies, lazysnap into a venv (/opt/lazysnap), the commands
/usr/local/bin/{lazysnapd,snapctl}, the systemd units, /etc/lazysnap/config.toml (only if absent)
and /var/lib/lazysnap; enables and starts lazysnap.socket and lazysnap.service when systemd runs.

  --configure-containerd     add [proxy_plugins.lazysnap] to containerd's config (backed up first)
  --containerd-config PATH   containerd's config file (default /etc/containerd/config.toml)
  --containerd-only          only do the --configure-containerd step
  --no-start                 install and enable, but do not start anything
  --no-apt                   do not install apt packages (fail if one is missing)
  -h, --help                 this help
EOF
}

PREFIX=/opt/lazysnap
BINDIR=/usr/local/bin
UNITDIR=/etc/systemd/system
CONFDIR=/etc/lazysnap
STATEDIR=/var/lib/lazysnap
ADDRESS=/run/lazysnap/lazysnap.sock
CONTAINERD_CONFIG=/etc/containerd/config.toml
CONFIGURE_CONTAINERD=0
CONTAINERD_ONLY=0
START=1
APT=1
APT_PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv ca-certificates)
MARKER=.lazysnap-install

while [ $# -gt 0 ]; do
  case "$1" in
    --configure-containerd) CONFIGURE_CONTAINERD=1 ;;
    --containerd-config) CONTAINERD_CONFIG=${2:?--containerd-config needs a path}; shift ;;
    --containerd-only) CONFIGURE_CONTAINERD=1; CONTAINERD_ONLY=1 ;;
    --no-start) START=0 ;;
    --no-apt) APT=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
SRC=$(cd "$(dirname "$0")/.." && pwd)
grep -q '^name = "lazysnap"' "$SRC/pyproject.toml" 2>/dev/null || die "$SRC is not a lazysnap checkout"
SYS_PYTHON=${PYTHON:-/usr/bin/python3}

systemd_running() { [ -d /run/systemd/system ]; }

# Adds the proxy plugin entry between markers that uninstall.sh removes. Refuses, leaving the file
# untouched, when it is not valid TOML, already names lazysnap differently, or would not parse after.
configure_containerd() {
  "$SYS_PYTHON" - "$CONTAINERD_CONFIG" "$ADDRESS" <<'PY'
import os, shutil, sys, tempfile, time, tomllib

path, address = sys.argv[1], sys.argv[2]
begin = "# BEGIN lazysnap: added by lazysnap scripts/install.sh, removed by scripts/uninstall.sh"
block = f'{begin}\n[proxy_plugins.lazysnap]\n  type = "snapshot"\n  address = "{address}"\n# END lazysnap\n'

def fail(message: str) -> None:
    print(f"install.sh: error: {path}: {message}; not changed", file=sys.stderr)
    sys.exit(1)

exists = os.path.exists(path)
text = open(path, encoding="utf-8").read() if exists else "version = 2\n"
try:
    current = tomllib.loads(text).get("proxy_plugins", {}).get("lazysnap")
except tomllib.TOMLDecodeError as exc:
    fail(f"not valid TOML ({exc})")
if current is not None:
    if current == {"type": "snapshot", "address": address}:
        print(f"install.sh: {path} already has [proxy_plugins.lazysnap]")
        sys.exit(0)
    fail(f"has a different [proxy_plugins.lazysnap] {current!r}; fix or remove it by hand")
new = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text.strip() else "") + block
try:
    merged = tomllib.loads(new)["proxy_plugins"]["lazysnap"]
except (tomllib.TOMLDecodeError, KeyError, TypeError):
    merged = None
if merged != {"type": "snapshot", "address": address}:
    fail("its proxy_plugins cannot take a [proxy_plugins.lazysnap] table (inline table?)")
directory = os.path.dirname(os.path.abspath(path))
os.makedirs(directory, exist_ok=True)
if exists:
    stamp, n = time.strftime("%Y%m%d%H%M%S"), 0
    while os.path.lexists(backup := f"{path}.lazysnap-{stamp}{f'.{n}' if n else ''}.bak"):
        n += 1
    shutil.copy2(path, backup)
    print(f"install.sh: backed up {path} to {backup}")
fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.toml.")
with os.fdopen(fd, "w", encoding="utf-8") as out:
    out.write(new)
if exists:
    shutil.copystat(path, tmp)
    st = os.stat(path)
    os.chown(tmp, st.st_uid, st.st_gid)
else:
    os.chmod(tmp, 0o644)
os.replace(tmp, path)
print(f"install.sh: added [proxy_plugins.lazysnap] to {path}; restart containerd to load it")
PY
}

print_containerd_snippet() {
  cat <<EOF
Add lazysnap to containerd (/etc/containerd/config.toml), then restart containerd
(or run scripts/install.sh --configure-containerd):

  [proxy_plugins.lazysnap]
    type = "snapshot"
    address = "$ADDRESS"

For Kubernetes (CRI) pulls through lazysnap, also set, in the same file:

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazysnap"
    disable_snapshot_annotations = false
EOF
}

if [ "$CONTAINERD_ONLY" = 1 ]; then
  configure_containerd
  exit 0
fi

# 1. Debian packages: FUSE, and what building pyfuse3 needs.
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$APT" = 1 ] || die "missing Debian packages: ${missing[*]} (run without --no-apt, or install them)"
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The package, in its own venv, built from a clean copy so the checkout stays untouched.
if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/$MARKER" ]; then
  die "$PREFIX exists and was not made by this script; move it away first"
fi
if [ ! -x "$PREFIX/bin/python" ]; then
  say "creating the venv $PREFIX"
  "$SYS_PYTHON" -m venv "$PREFIX"
fi
printf 'source=%s\ninstalled=%s\n' "$SRC" "$(date -u +%FT%TZ)" > "$PREFIX/$MARKER"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
for item in pyproject.toml README.md LICENSE snapshotter fusefs estargz; do
  if [ -e "$SRC/$item" ]; then cp -r "$SRC/$item" "$build/"; fi
done
find "$build" -name __pycache__ -prune -exec rm -rf {} +
say "installing lazysnap into $PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$build"
for cmd in lazysnapd snapctl; do
  [ -x "$PREFIX/bin/$cmd" ] || die "$PREFIX/bin/$cmd was not installed"
done

# 3. Commands on PATH, as symlinks into the venv; never replace someone else's file.
for cmd in lazysnapd snapctl; do
  link="$BINDIR/$cmd"
  if [ -e "$link" ] || [ -L "$link" ]; then
    [ "$(readlink "$link" || true)" = "$PREFIX/bin/$cmd" ] || die "$link exists and is not lazysnap's; move it away first"
  fi
  ln -sfn "$PREFIX/bin/$cmd" "$link"
done

# 4. Configuration (kept if present: it is the operator's) and state.
install -d -m 0755 "$CONFDIR"
if [ ! -e "$CONFDIR/config.toml" ]; then
  umask 077
  cat > "$CONFDIR/config.toml" <<'EOF'
# lazysnapd configuration (TOML). Every setting has a default; uncomment a line to change it.
# lazysnapd reads this file when it starts: apply changes with `systemctl restart lazysnap`.
# Under systemd the socket address comes from lazysnap.socket (lazysnapd --address), not from here.

# root = "/var/lib/lazysnap"        # state: metadata.db, snapshots/, the chunk cache
# log_level = "info"                # debug, info, warning, error

# [grpc]
# max_workers = 16
EOF
  umask 022
  say "wrote $CONFDIR/config.toml"
else
  say "kept $CONFDIR/config.toml"
fi
install -d -m 0700 "$STATEDIR"

# 5. systemd units.
install -d -m 0755 "$UNITDIR"
for unit in lazysnap.service lazysnap.socket; do
  install -m 0644 "$SRC/systemd/$unit" "$UNITDIR/$unit"
done
if systemd_running; then
  systemctl daemon-reload
  systemctl enable --quiet lazysnap.socket lazysnap.service
  if [ "$START" = 0 ]; then
    say "enabled lazysnap.socket and lazysnap.service (not started: --no-start)"
  elif systemctl is-active --quiet lazysnap.service; then
    # A restart stops lazy reads in running containers (docs/operations.md): the operator's call.
    say "lazysnap.service keeps running the previous version; run 'systemctl restart lazysnap.service' when convenient"
  else
    systemctl start lazysnap.socket lazysnap.service
    say "started lazysnap.socket and lazysnap.service"
  fi
else
  say "systemd is not running here (PID 1 is $(cat /proc/1/comm)): units installed, not enabled."
  say "start by hand: $BINDIR/lazysnapd --address $ADDRESS --config $CONFDIR/config.toml"
fi

# 6. containerd.
if [ "$CONFIGURE_CONTAINERD" = 1 ]; then
  configure_containerd
else
  print_containerd_snippet
fi
say "done: $("$PREFIX/bin/python" -c 'import importlib.metadata as m; print("lazysnap", m.version("lazysnap"))')"

#!/usr/bin/env bash
# Remove what scripts/install.sh installed, as root. Keeps /etc/lazysnap and the state under
# /var/lib/lazysnap unless --purge; leaves the Debian packages (other software may use them).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/uninstall.sh [options]

Stops and removes the lazysnap units, /usr/local/bin/{lazysnapd,snapctl}, the venv /opt/lazysnap
and the [proxy_plugins.lazysnap] entry install.sh added to containerd's config (backed up first).

  --purge                    also delete /etc/lazysnap and /var/lib/lazysnap (refused while
                             anything is mounted below /var/lib/lazysnap)
  --containerd-config PATH   containerd's config file (default /etc/containerd/config.toml)
  --containerd-only          only remove the containerd entry
  -h, --help                 this help
EOF
}

PREFIX=/opt/lazysnap
BINDIR=/usr/local/bin
UNITDIR=/etc/systemd/system
CONFDIR=/etc/lazysnap
STATEDIR=/var/lib/lazysnap
RUNDIR=/run/lazysnap
CONTAINERD_CONFIG=/etc/containerd/config.toml
PURGE=0
CONTAINERD_ONLY=0
MARKER=.lazysnap-install

while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1 ;;
    --containerd-config) CONTAINERD_CONFIG=${2:?--containerd-config needs a path}; shift ;;
    --containerd-only) CONTAINERD_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

say() { echo "uninstall.sh: $*"; }
die() { echo "uninstall.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
SYS_PYTHON=${PYTHON:-/usr/bin/python3}

# Removes the block between install.sh's markers; anything else in the file stays byte for byte.
unconfigure_containerd() {
  [ -e "$CONTAINERD_CONFIG" ] || return 0
  "$SYS_PYTHON" - "$CONTAINERD_CONFIG" <<'PY'
import os, shutil, sys, tempfile, time, tomllib

path = sys.argv[1]
begin, end = "# BEGIN lazysnap: added by lazysnap scripts/install.sh", "# END lazysnap"
lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
starts = [i for i, line in enumerate(lines) if line.startswith(begin)]
if not starts:
    try:
        present = "lazysnap" in tomllib.loads("".join(lines)).get("proxy_plugins", {})
    except tomllib.TOMLDecodeError:
        present = False
    if present:
        print(f"uninstall.sh: {path}: [proxy_plugins.lazysnap] was not added by install.sh; left in place")
    sys.exit(0)
first = starts[0]
last = next((i for i in range(first, len(lines)) if lines[i].rstrip("\n") == end), None)
if last is None:
    print(f"uninstall.sh: error: {path}: lazysnap block has no end marker; not changed", file=sys.stderr)
    sys.exit(1)
if first > 0 and not lines[first - 1].strip():
    first -= 1  # the blank line install.sh put before the block
new = "".join(lines[:first] + lines[last + 1:])
try:
    tomllib.loads(new)
except tomllib.TOMLDecodeError as exc:
    print(f"uninstall.sh: error: {path}: would not be valid TOML without the block ({exc}); not changed",
          file=sys.stderr)
    sys.exit(1)
stamp, n = time.strftime("%Y%m%d%H%M%S"), 0
while os.path.lexists(backup := f"{path}.lazysnap-{stamp}{f'.{n}' if n else ''}.bak"):
    n += 1
shutil.copy2(path, backup)
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".config.toml.")
with os.fdopen(fd, "w", encoding="utf-8") as out:
    out.write(new)
shutil.copystat(path, tmp)
st = os.stat(path)
os.chown(tmp, st.st_uid, st.st_gid)
os.replace(tmp, path)
print(f"uninstall.sh: removed [proxy_plugins.lazysnap] from {path} (backup {backup}); restart containerd")
PY
}

if [ "$CONTAINERD_ONLY" = 1 ]; then
  unconfigure_containerd
  exit 0
fi

# Mount points at or below a directory, from the kernel's own table.
mounts_below() {
  awk -v d="$1" '{ gsub(/\\040/, " ", $5); if ($5 == d || index($5, d "/") == 1) print $5 }' /proc/self/mountinfo
}

# 1. Stop the daemon. Without systemd, refuse while one still runs from the venv: only the
# operator knows whether its containers can lose their lazily served layers now.
if [ -d /run/systemd/system ]; then
  systemctl disable --now --quiet lazysnap.service lazysnap.socket 2>/dev/null || true
else
  running=()
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}; pid=${pid%/cmdline}
    argv0=$({ tr '\0' '\n' < "$cmdline"; } 2>/dev/null | head -n1 || true)
    case "$argv0" in "$PREFIX"/*) running+=("$pid") ;; esac
  done
  [ ${#running[@]} -eq 0 ] || die "lazysnap still runs from $PREFIX (pid ${running[*]}); stop it first"
fi

# 2. Units, commands, venv, containerd entry.
removed_units=0
for unit in lazysnap.service lazysnap.socket; do
  if [ -e "$UNITDIR/$unit" ]; then rm -f "$UNITDIR/$unit"; removed_units=1; fi
done
if [ "$removed_units" = 1 ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
for cmd in lazysnapd snapctl; do
  if [ -L "$BINDIR/$cmd" ] && [ "$(readlink "$BINDIR/$cmd")" = "$PREFIX/bin/$cmd" ]; then
    rm -f "$BINDIR/$cmd"
  fi
done
if [ -e "$PREFIX/$MARKER" ]; then
  rm -rf --one-file-system "$PREFIX"
  say "removed $PREFIX"
elif [ -e "$PREFIX" ]; then
  say "left $PREFIX: not made by install.sh"
fi
unconfigure_containerd

# 3. Data and configuration, only on --purge, and never through a live mount.
if [ "$PURGE" = 1 ]; then
  busy=$(mounts_below "$STATEDIR")
  [ -z "$busy" ] || die "mounted below $STATEDIR, unmount first (stop the containers using lazysnap):
$busy"
  rm -rf --one-file-system "$STATEDIR" "$CONFDIR"
  if [ -d "$RUNDIR" ] && [ -z "$(mounts_below "$RUNDIR")" ]; then rm -rf --one-file-system "$RUNDIR"; fi
  say "purged $STATEDIR and $CONFDIR"
elif [ -e "$CONFDIR" ] || [ -e "$STATEDIR" ]; then
  say "kept $CONFDIR and $STATEDIR (--purge deletes them)"
fi
say "done"

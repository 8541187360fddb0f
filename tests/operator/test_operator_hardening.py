"""lazysnap.service's hardening leaves lazysnapd able to do its mounts.

systemd is not PID 1 here, so the unit cannot run for real; this applies the same kernel limits
the unit asks for (its CapabilityBoundingSet, NoNewPrivileges) with ``setpriv`` and runs the
mounts lazysnapd makes: a pyfuse3 FUSE filesystem with allow_other and an overlay stacked on it.
Mount-namespace settings are checked for absence in test_operator_units.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from opsupport import PYTHON, REPO, child_env

HELPER = Path(__file__).resolve().parent / "hardened_mounts.py"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse missing"),
]


def unit_capabilities() -> list[str]:
    for line in (REPO / "systemd" / "lazysnap.service").read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.partition("=")[2].split()
    raise AssertionError("lazysnap.service has no CapabilityBoundingSet")


def unmount_below(base: Path) -> None:
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table if line.split()[4].startswith(str(base) + "/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def run_limited(base: Path, capabilities: list[str]) -> subprocess.CompletedProcess[str]:
    bounding = ",".join(["-all"] + ["+" + cap.removeprefix("CAP_").lower() for cap in capabilities])
    try:
        return subprocess.run(
            ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
             PYTHON, str(HELPER), str(base)],
            env=child_env(), capture_output=True, text=True, timeout=120,
        )
    finally:
        unmount_below(base)


def effective(result: subprocess.CompletedProcess[str]) -> int:
    return int(result.stdout.split()[1], 16)


def test_fuse_and_overlay_mounts_work_within_the_units_limits(short_tmp: Path) -> None:
    capabilities = unit_capabilities()
    result = run_limited(short_tmp, capabilities)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
    # The limit really applied: no capability outside the unit's set was effective.
    cap_sys_module = 16
    assert effective(result) & (1 << cap_sys_module) == 0
    assert (short_tmp / "upper" / "written").read_bytes() == b"upper\n"


def test_the_limit_is_real_without_cap_sys_admin(short_tmp: Path) -> None:
    capabilities = [cap for cap in unit_capabilities() if cap != "CAP_SYS_ADMIN"]
    result = run_limited(short_tmp, capabilities)
    assert result.returncode != 0 and "mount" in result.stderr

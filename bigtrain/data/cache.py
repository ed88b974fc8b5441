"""Building prepared sets on disk, and where the content-keyed ones are cached.

Token shard sets (:mod:`bigtrain.data.prepare`), record sets (:mod:`bigtrain.data.classification`)
and image sets (:mod:`bigtrain.data.images`) are all built by :func:`build_set`: the files go into
a temporary directory next to the destination, the manifest last (fsynced), and the directory is
then renamed into place. A directory with a manifest is therefore complete, and a failed build
leaves nothing behind. A set keyed by its content lives at ``<cache>/<kind>/<key_digest(key)>``,
so building the same inputs with the same settings twice is a no-op. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.data.shards import MANIFEST, sha256_file


def default_cache_dir() -> Path:
    """``$BIGTRAIN_CACHE``, else ``~/.cache/bigtrain`` (``data.cache_dir`` overrides both)."""
    return Path(os.environ.get("BIGTRAIN_CACHE", Path.home() / ".cache" / "bigtrain"))


def key_digest(key: dict[str, Any]) -> str:
    """The directory name of a content-keyed set: 16 hex digits of sha256 over ``key`` as sorted JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def file_entry(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file, as manifests list them."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def build_set(out: Path, write: Callable[[Path], dict[str, Any]], replace: bool = False) -> dict[str, Any]:
    """Build a set at ``out`` and return its manifest.

    ``write(tmp)`` fills a fresh temporary directory (``.<name>.tmp-<pid>`` next to ``out``) and
    returns the manifest, which is written to ``tmp/manifest.json`` (fsynced) before ``tmp`` is
    renamed to ``out``. If ``out`` exists by then, ``replace`` removes it first (the new set wins);
    otherwise the existing set is kept (another process built the same content-keyed set) and
    ``tmp`` is dropped. On any error ``tmp`` is removed and the error propagates.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = write(tmp)
        manifest_path = tmp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2))
        with open(manifest_path, "rb") as fh:
            os.fsync(fh.fileno())
        if out.exists() and replace:
            shutil.rmtree(out)
        if out.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

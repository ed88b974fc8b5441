"""Digests remembered by file identity, so a large corpus or prepared set is read in full once, not
at every start.

Starting a run hashes the raw corpus (the cache key of its prepared set) and checks every prepared
shard's sha256: for terabytes of text on a cluster filesystem, minutes of every (re)start of every
job. A :class:`DigestMemo` remembers the digest found for a file *signature*: its absolute path,
device, inode, size and modification time in nanoseconds. Rewriting, truncating, replacing or
copying a file changes one of them, and the file is hashed again; a bit flipped in place under an
unchanged modification time is caught only the first time. Memos are small JSON files written
atomically; one that cannot be written (a read-only shared set) only costs the re-hash. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

INPUT_DIGESTS = ".input-digests.json"  # the memo of a cache directory's inputs (corpora, image folders)


# A file modified less than this long ago is not remembered: a rewrite of the same size within one
# tick of the filesystem's clock would leave its modification time unchanged (git's "racy" entries).
FRESH_NS = 2_000_000_000


def signature(paths: Iterable[Path], salt: str = "") -> str | None:
    """sha256 of the identity of these files as they are now (path, device, inode, bytes, mtime in
    ns), and of ``salt`` (whatever else the digest depends on); None while one was just modified."""
    h = hashlib.sha256(salt.encode() + b"\0")
    now = time.time_ns()
    for p in paths:
        st = os.stat(p)
        if now - st.st_mtime_ns < FRESH_NS:
            return None
        h.update(json.dumps([os.path.abspath(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


class DigestMemo:
    """Digests by file signature, kept in one JSON file (``path``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.digests: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: start empty
            self.digests = {}
        self._changed = False

    def digest(self, paths: list[Path], compute: Callable[[], str], salt: str = "") -> str:
        """The remembered digest of ``paths`` as they are now (and ``salt``), or ``compute()``
        (then remembered)."""
        key = signature(paths, salt)
        if key is None:
            return compute()
        if key not in self.digests:
            self.digests[key] = compute()
            self._changed = True
        return self.digests[key]

    def verified(self, path: Path, expected: str, compute: Callable[[], str]) -> bool:
        """Whether ``path`` hashes to ``expected``: remembered when it did, so later calls with the
        file unchanged do not read it."""
        key = signature([path])
        if key is not None and self.digests.get(key) == expected:
            return True
        if compute() != expected:
            return False
        if key is not None:
            self.digests[key] = expected
            self._changed = True
        return True

    def save(self) -> None:
        """Write the memo if it changed (atomically; silently skipped where it cannot be written)."""
        if not self._changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.digests))
            os.replace(tmp, self.path)
            self._changed = False
        except OSError:
            tmp.unlink(missing_ok=True)

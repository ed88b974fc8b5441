"""Errors of the data layer, and the ``data.on_bad_record`` policy. Torch-free, imports nothing of
bigtrain, so every data module (and the launcher) can raise them.

:class:`DataError`: bad input data or a bad prepared set; ``str(err)`` is one line naming the file
(and line, or config key) at fault, which the CLI prints as is. :class:`BadRecords`: what to do
with a record that cannot be read (raise the DataError, or count it and go on).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; ``str(err)`` is one line naming the file (and line) at fault."""


@dataclass
class BadRecords:
    """The ``data.on_bad_record`` policy: raise on the first bad record, or count and go on."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def __call__(self, where: str, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {reason}")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        return f"skipped {self.count} bad records (data.on_bad_record: skip); first: {self.examples[0]}"

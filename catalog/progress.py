"""A byte-count progress bar on stderr for imports and verification (tqdm)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class TransferProgress:
    """One bar per phase ("sha256", "upload", …); `update` is safe from upload threads."""

    def __init__(self, *, stream=None, disable: bool = False):
        self.stream = stream or sys.stderr
        self.disable = disable
        self._bar: tqdm | None = None

    def start(self, label: str, total: int) -> None:
        self.close()
        self._bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self.stream,
            disable=self.disable,
            leave=True,
        )

    def update(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""A least-recently-used map bounded in bytes, with a cold end for speculative entries.

Reading one image of a Parquet row group reads the group's whole column chunk; the other
images of that group the pairs name come for free, and are worth keeping only while memory
is spare. They go in at the cold end (``put(..., hot=False)``): they are the first evicted and
never push out an image a page is about to show.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ByteLRU:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[int, bytes] = OrderedDict()  # coldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: int) -> bool:
        return key in self._d

    def get(self, key: int) -> bytes | None:
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key: int, value: bytes, hot: bool = True) -> None:
        """Insert at the hot end (``hot``) or the cold end; evict the coldest over budget."""
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
                hot = True  # already wanted once: keep it as warm as a fresh request
            if not hot and self.bytes + len(value) > self.max_bytes:
                return  # no spare room for a speculative entry
            self._d[key] = value
            self.bytes += len(value)
            if not hot:
                self._d.move_to_end(key, last=False)
            while self.bytes > self.max_bytes and self._d:
                _, gone = self._d.popitem(last=False)
                self.bytes -= len(gone)

"""A bounded map, least recently used dropped first: open shard handles and per-shard read layouts."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class HandleLRU:
    """At most `capacity` items, least recently used dropped first (a dropped shard handle closes its
    file once no reader still holds it), so a cache of any shard count reads under the common
    `ulimit -n`. Not locked: callers hold their own lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[int, Any] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __getitem__(self, key: int) -> Any:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: int, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

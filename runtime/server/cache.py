"""An opt-in response cache for one model version (bounded LRU, exact inputs).

The key is a BLAKE2b digest of the model artifact's sha256 and, per input (sorted by
name), its name, dtype, shape and exact bytes. The cached value is every output the
backend produced, so which outputs a request asks for does not need to be in the key:
each request still gets only the outputs it asked for. A cache belongs to one loaded
version (and the artifact hash is in the key), so versions never share entries.
Memory is bounded by the bytes of the cached arrays; the least recently used entries
are evicted past ``max_bytes``. Loop thread only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np

from edgeml.runtime.server.logs import LOGGER

ENTRY_OVERHEAD = 256          # bytes charged per entry for the key, dict and array headers


class ResponseCache:
    def __init__(self, max_bytes: int, model_sha256: str):
        self.max_bytes = int(max_bytes)
        self._salt = model_sha256.encode()
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def key(self, feeds: Mapping[str, np.ndarray]) -> bytes:
        h = hashlib.blake2b(self._salt, digest_size=20)
        for name in sorted(feeds):
            a = feeds[name]
            h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.data if a.flags.c_contiguous else np.ascontiguousarray(a).data)
        return h.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return hit[0]

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        """Store copies (a batch slice would pin the whole batch); an entry over the budget is not kept."""
        size = ENTRY_OVERHEAD + sum(int(v.nbytes) for v in outputs.values())
        if size > self.max_bytes or key in self._entries:
            return
        value = {k: np.array(v, copy=True) for k, v in outputs.items()}
        for v in value.values():
            v.flags.writeable = False
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)


def cache_for(model: Any, cache_mb: float | None, name: str, version: str) -> ResponseCache | None:
    """The cache the serve config (or else the artifact's runtime section) asks for; never for a
    model declared non-deterministic (same inputs, other outputs)."""
    runtime = model.spec.runtime
    mb = cache_mb if cache_mb is not None else (runtime.cache_mb if runtime is not None else None)
    if not mb:
        return None
    if runtime is not None and not runtime.deterministic:
        logging.getLogger(LOGGER).warning(
            "response cache off: the model is declared non-deterministic (runtime.deterministic)",
            extra={"model": name, "version": version})
        return None
    return ResponseCache(int(mb * (1 << 20)), model.artifact.sha256)

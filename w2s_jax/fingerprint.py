"""Fingerprints of what determines a stage, so a cached stage is reused only when none of it changed.

A stage's spec is a flat dict: its part of the config (`train.lr`, `losses.logconf.aux_coef`, ...) and the digests
of its inputs (the examples it trains on, the model's weights, the supervisor's labels). The spec is stored beside
the stage's outputs; a later run whose spec differs names the keys that changed and recomputes the stage, and the
stages downstream follow because their specs hold this stage's output digests.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a big checkpoint is read once a process


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-5}} -> {'train.lr': 1e-5} (lists and scalars are leaves)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys), 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def array_digest(array) -> str:
    """sha256 of an array's dtype, shape and bytes, 16 hex digits."""
    import numpy as np
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and contents), 16 hex digits."""
    if os.path.isdir(path):
        parts = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                parts.append((os.path.relpath(full, path), file_digest(full)))
        return digest(parts)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (added and removed keys included), sorted."""
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]

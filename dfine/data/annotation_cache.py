"""A binary cache of `AnnotationTable`: built once per annotation file, memory-mapped by every later process.

Parsing Objects365's JSON costs minutes and gigabytes in every rank and on every start; the table it yields
is a few flat arrays. The first use writes them to one file (``<annotation file>.dfine-cache`` when that
folder is writable, else ``$DFINE_CACHE_DIR`` or ``~/.cache/dfine/annotations``); later starts, all ranks
and all loader workers ``mmap`` it read-only, so the pages are shared through the page cache (no per-worker
copy, no copy-on-access growth: numpy never writes to a read-only map).

File layout: ``MAGIC``, a little-endian uint64 header length, a JSON header (format version, the key of the
source, CRC32 of the array bytes, each array's dtype, shape and offset, and free-form ``meta``), then the
arrays, each 64-byte aligned. A cache is trusted only when the magic, version, key, file size and CRC32 all
match; anything else (a changed source, a truncated or garbled file) is rebuilt. Writers take a file lock and
replace the cache atomically, so processes racing to build it (all ranks of a torchrun job, two jobs) produce
one good file: the first builds, the others wait on the lock and then map the result (under torchrun: one
process per node builds, the others block on the lock as at a barrier). ``DFINE_ANNOTATION_CACHE=0`` turns
the cache off (parse every time, arrays in memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from dfine.data.base import AnnotationTable

__all__ = ["CACHE_VERSION", "cache_key", "cache_path_for", "cached_table", "load_table", "save_table"]

logger = logging.getLogger(__name__)

MAGIC = b"DFINEAC\x00"
CACHE_VERSION = 1
_ALIGN = 64
_READ_CHUNK = 16 << 20
_TABLE_FIELDS = tuple(f.name for f in fields(AnnotationTable) if f.name != "cache_path")


def cache_key(sources: Sequence[str | os.PathLike], kind: str, **options: Any) -> str:
    """What a cache must match: each source's absolute path, size and mtime, the parser kind, its options."""
    parts: list[Any] = [CACHE_VERSION, kind, sorted(options.items())]
    for source in sources:
        try:
            stat = os.stat(source)
            parts.append([os.path.abspath(source), stat.st_size, stat.st_mtime_ns])
        except FileNotFoundError:  # e.g. a YOLO image without a label file: its absence is part of the key
            parts.append([os.path.abspath(source), None])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


def cache_path_for(source: str | os.PathLike, key: str) -> Path:
    """Beside the source when its folder is writable, else under ``$DFINE_CACHE_DIR`` (or ~/.cache/dfine)."""
    source = Path(source)
    beside = source.with_name(source.name + ".dfine-cache")
    if os.access(source.parent, os.W_OK):
        return beside
    root = Path(os.environ.get("DFINE_CACHE_DIR", Path.home() / ".cache" / "dfine" / "annotations"))
    return root / f"{source.name}.{key[:16]}.dfine-cache"


def save_table(path: str | os.PathLike, table: AnnotationTable, key: str, meta: dict[str, Any]) -> None:
    """Write ``table`` to ``path`` atomically (a unique temporary file, then ``os.replace``)."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(getattr(table, name)) for name in _TABLE_FIELDS}
    specs, offset = {}, 0
    for name, array in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        offset += array.nbytes
    data_size = offset
    crc = 0
    for array in arrays.values():
        crc = zlib.crc32(memoryview(array.reshape(-1)).cast("B"), crc)
    header = json.dumps(
        {
            "version": CACHE_VERSION,
            "key": key,
            "crc32": crc,
            "data_size": data_size,
            "arrays": specs,
            "meta": meta,
        }
    ).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for name, array in arrays.items():
                file.seek(start + specs[name]["offset"])
                file.write(memoryview(array.reshape(-1)).cast("B"))
            file.truncate(start + data_size)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


def load_table(path: str | os.PathLike, key: str | None) -> tuple[AnnotationTable, dict[str, Any]] | None:
    """Map the cache at ``path`` if it is whole and made from ``key`` (None: any key); None otherwise.

    The CRC is computed with plain reads, not through the map, so checking it adds nothing to the RSS.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                return _stale(path, "not a dfine annotation cache")
            (length,) = struct.unpack("<Q", head[len(MAGIC) :])
            header = json.loads(file.read(length))
            if header.get("version") != CACHE_VERSION:
                return _stale(path, f"format version {header.get('version')} (this dfine: {CACHE_VERSION})")
            if key is not None and header.get("key") != key:
                return _stale(path, "made from another version of the annotation file", logging.INFO)
            start = -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN
            if os.fstat(file.fileno()).st_size != start + header["data_size"]:
                return _stale(path, "truncated")
            if _crc(file, header["arrays"], start) != header["crc32"]:
                return _stale(path, "its contents do not match their checksum")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if header["data_size"] else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return _stale(path, f"unreadable ({error})")
    arrays = {}
    for name in _TABLE_FIELDS:
        spec = header["arrays"][name]
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        count = int(np.prod(shape))
        if mapped is None or count == 0:
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.frombuffer(mapped, dtype, count, start + spec["offset"]).reshape(shape)
    return AnnotationTable(**arrays, cache_path=str(path)), header["meta"]


def cached_table(
    source: str | os.PathLike,
    key: str,
    build: Callable[[], tuple[AnnotationTable, dict[str, Any]]],
) -> tuple[AnnotationTable, dict[str, Any]]:
    """The table of ``source`` from its cache, building (and caching) it first when needed.

    Args:
        source: the annotation file (or folder) the cache belongs to; sets where the cache lives.
        key: `cache_key` of everything the table depends on.
        build: parses the source; returns the table and JSON-able ``meta`` kept beside it (categories,
            warnings).

    Returns:
        The table (memory-mapped when a cache could be written or read) and its meta.
    """
    if os.environ.get("DFINE_ANNOTATION_CACHE", "1") == "0":
        return build()
    path = cache_path_for(source, key)
    if path.exists():
        loaded = load_table(path, key)
        if loaded is not None:
            return loaded
    try:
        with _locked(path):
            loaded = load_table(path, key) if path.exists() else None  # built while we waited for the lock
            if loaded is not None:
                return loaded
            table, meta = build()
            save_table(path, table, key, meta)
            logger.info("%s: annotation cache written to %s", os.fspath(source), path)
    except OSError as error:
        logger.warning(
            "%s: cannot write the annotation cache %s (%s); parsing every time.", source, path, error
        )
        return build()
    loaded = load_table(path, key)
    return loaded if loaded is not None else (table, meta)


def map_cached(path: str) -> AnnotationTable:
    """Re-open a table by its cache path (how a pickled table reaches a spawned worker without a copy)."""
    loaded = load_table(path, None)
    if loaded is None:
        raise RuntimeError(f"annotation cache {path} changed while in use; restart to rebuild it.")
    return loaded[0]


def _crc(file: Any, specs: dict[str, Any], start: int) -> int:
    crc = 0
    for name in _TABLE_FIELDS:
        spec = specs[name]
        remaining = np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"]))
        file.seek(start + spec["offset"])
        while remaining:
            chunk = file.read(min(_READ_CHUNK, remaining))
            if not chunk:
                return -1
            crc = zlib.crc32(chunk, crc)
            remaining -= len(chunk)
    return crc


def _stale(path: Path, why: str, level: int = logging.WARNING) -> None:
    logger.log(level, "annotation cache %s is not used (%s); rebuilding it.", path, why)
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

"""A cache of the code attrs generates, so that the daemon starts in a fraction of the time.

Importing lsprotocol (which pygls is built on) defines some 570 attrs classes, and attrs
compiles the source of each one's generated methods: about 100 ms, a third of a daemon's
start. A code object depends only on its source, file name and compiler flags, so the compiled
ones are kept in the cache dir (marshal, keyed by a hash of all three, one file per attrs and
Python version) and the next start reuses them. Only the imports inside `cached_compile` are
affected; anything the cache cannot read is compiled as usual.
"""

from __future__ import annotations
import __future__

import builtins
import contextlib
import hashlib
import marshal
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import CodeType
from typing import Any

# attrs' own module compiles with `from __future__ import annotations`
_FLAGS = __future__.annotations.compiler_flag


@contextlib.contextmanager
def cached_compile(folder: Path) -> Iterator[None]:
    """Within the block, attrs' generated methods come from the cache in `folder`."""
    try:
        import attr
        import attr._make as make
    except ImportError:
        yield
        return
    path = folder / f"attrs-{attr.__version__}-{sys.implementation.cache_tag}.marshal"
    codes = _load(path)
    known = len(codes)

    def compile_(source: Any, filename: str, mode: str, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(source, str):  # not a call of attrs' kind
            return builtins.compile(source, filename, mode, *args, **kwargs)
        key = hashlib.blake2b(f"{filename}\0{mode}\0{source}".encode(), digest_size=16).digest()
        code = codes.get(key)
        if code is None:
            code = codes[key] = builtins.compile(source, filename, mode, _FLAGS, dont_inherit=True)
        return code

    make.compile = compile_  # type: ignore[attr-defined]  # found before the builtin
    try:
        yield
    finally:
        del make.compile  # type: ignore[attr-defined]
        if len(codes) > known:
            _save(path, codes)


def _load(path: Path) -> dict[bytes, CodeType]:
    try:
        codes = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if not isinstance(codes, dict):
        return {}
    return {k: v for k, v in codes.items() if isinstance(k, bytes) and isinstance(v, CodeType)}


def _save(path: Path, codes: dict[bytes, CodeType]) -> None:
    """Writes the cache whole or not at all: daemons that start at once may race here."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".attrs-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(marshal.dumps(codes))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

"""Files of a sandbox's workspace, resolved and opened the way a sandbox must be: from inside.

This module runs in the sandbox's agent (see agent.py), with the sandbox's own rights, so it is
standard library only and keeps to Python 3.8. Every path is relative to the workspace and is
walked one component at a time from a descriptor of the workspace folder: each component is
opened relative to its parent, and a symlink met on the way is read and resolved by hand, so
that it may point anywhere inside the workspace but never out of it. An absolute path, or one
whose `..` or symlinks lead out, raises FileError("invalid").

O_NOFOLLOW is not trusted alone (gVisor's runsc follows a symlink opened with O_NOFOLLOW and
O_DIRECTORY): each component is looked at with lstat before it is opened, and what was opened
is checked to be that very entry.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

MAX_LINKS = 40  # symlinks followed in one path, as Linux allows
LIST_BYTES = 32 << 20  # of the JSON of one listing, at the most: the daemon takes a reply that big
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileError(Exception):
    """`kind` is "invalid" (the path breaks the rules or names the wrong kind of thing),
    "not_found", "exists" or "failed" (the system refused: no room, no permission...)."""

    def __init__(self, kind: str, message: str, path: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path = path


class Workspace:
    """The workspace folder at `root` (as this process sees it); `alias` is the absolute path
    under which the sandbox's code sees it, so that a symlink naming it stays inside."""

    def __init__(self, root: str, alias: str | None = None) -> None:
        self.root = root
        self.alias = (alias or root).rstrip("/") or "/"

    # -- resolution -----------------------------------------------------------------------

    def _parts(self, path: str) -> list[str]:
        if "\0" in path:
            raise FileError("invalid", "a path cannot hold a NUL character", path)
        if path.startswith("/"):
            raise FileError("invalid", f"{path!r} is absolute: paths are relative to the workspace", path)
        return _normal(path.split("/"), path)

    def _link_target(self, dir_fd: int, name: str, above: list[str], path: str) -> list[str]:
        """What a symlink `name` in the folder `above` points to, as components from the workspace."""
        target = os.readlink(name, dir_fd=dir_fd)
        if target.startswith("/"):
            if target == self.alias or target.startswith(self.alias + "/"):
                return _normal(target[len(self.alias) :].split("/"), path)
            raise FileError("invalid", f"{path!r} leads out of the workspace through a symlink", path)
        return _normal([*above, *target.split("/")], path)

    def _parent(self, path: str, create_dirs: bool = False) -> tuple[int, list[str]]:
        """An fd of the folder that holds the last component (the caller closes it), and the
        components of the path with every symlink before the last one resolved."""
        parts = self._parts(path)
        for _ in range(MAX_LINKS + 1):
            if not parts:
                raise FileError("invalid", f"{path!r} names the workspace itself", path)
            found = self._descend(parts, create_dirs, path)
            if isinstance(found, int):
                return found, parts
            parts = found
        raise FileError("invalid", f"{path!r}: too many levels of symlinks", path)

    def _descend(self, parts: list[str], create_dirs: bool, path: str) -> int | list[str]:
        """Opens the folders `parts[:-1]` one below the other: the fd of the last one, or, where
        a symlink stands on the way, the components the path resolves to through it."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for index, part in enumerate(parts[:-1]):
                child = _open_entry(fd, part, _DIR_FLAGS, path=path, create_dir=create_dirs)
                if child is None:
                    target = self._link_target(fd, part, parts[:index], path)
                    os.close(fd)
                    return target + parts[index + 1 :]
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open(self, path: str, flags: int, mode: int = 0o644, create_dirs: bool = False) -> int:
        """An fd of what `path` names, a symlink at its end resolved inside the workspace."""
        current = path
        for _ in range(MAX_LINKS + 1):
            dir_fd, parts = self._parent(current, create_dirs)
            try:
                found = _open_entry(dir_fd, parts[-1], flags, mode, path=path)
                if found is not None:
                    return found
                resolved = self._link_target(dir_fd, parts[-1], parts[:-1], path)
            finally:
                os.close(dir_fd)
            if not resolved:  # a symlink to the workspace itself
                if flags & os.O_DIRECTORY:
                    return os.open(self.root, _DIR_FLAGS)
                raise FileError("invalid", f"{path!r} is a folder", path)
            current = "/".join(resolved)
        raise FileError("invalid", f"{path!r}: too many levels of symlinks", path)

    def _open_dir(self, path: str) -> int:
        if not self._parts(path):
            return os.open(self.root, _DIR_FLAGS)
        return self._open(path, os.O_RDONLY | os.O_DIRECTORY)

    # -- operations -----------------------------------------------------------------------

    def write(self, path: str, content: bytes, append: bool = False, mode: int | None = None) -> int:
        """Writes (or appends) `content`, making missing folders; the file's size after it."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = self._open(path, flags, 0o644 if mode is None else mode & 0o777, create_dirs=True)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileError("invalid", f"{path!r} is not a regular file", path)
            if mode is not None:
                os.fchmod(fd, mode & 0o777)
            _write_all(fd, content)
            return os.fstat(fd).st_size
        except OSError as exc:
            raise _error(exc, path) from None
        finally:
            os.close(fd)

    def create(self, path: str, content: bytes) -> bool:
        """Writes a new file, making missing folders; False when something has that name."""
        try:
            fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, create_dirs=True)
        except FileError as exc:
            if exc.kind == "exists":
                return False
            raise
        try:
            _write_all(fd, content)
            return True
        except OSError as exc:
            raise _error(exc, path) from None
        finally:
            os.close(fd)

    def read(self, path: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to `length` bytes from `offset`, and the whole file's size."""
        fd = self._open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the agent
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise FileError("invalid", f"{path!r} is a folder", path)
            if not stat.S_ISREG(info.st_mode):
                raise FileError("invalid", f"{path!r} is not a regular file", path)
            chunks: list[bytes] = []
            while length > 0:
                chunk = os.pread(fd, min(length, 1 << 20), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return b"".join(chunks), info.st_size
        except OSError as exc:
            raise _error(exc, path) from None
        finally:
            os.close(fd)

    def list(self, path: str, recursive: bool, limit: int) -> tuple[list[dict[str, object]], bool]:
        """The entries of a folder (of its whole tree with `recursive`), symlinks listed, not
        followed; at most `limit` of them and LIST_BYTES of JSON, and whether some were left
        out."""
        prefix = "/".join(self._parts(path))
        fd = self._open_dir(path)
        entries: list[dict[str, object]] = []
        try:
            complete = _list(fd, prefix, recursive, entries, limit, [LIST_BYTES])
        except OSError as exc:
            raise _error(exc, path) from None
        finally:
            os.close(fd)
        return entries, not complete

    def delete(self, path: str, recursive: bool) -> None:
        """Removes a file, a symlink (not what it points to) or, with `recursive`, a folder."""
        dir_fd, parts = self._parent(path)
        name = parts[-1]
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(name, dir_fd=dir_fd)
            elif recursive:
                _remove_tree(dir_fd, name)
            else:
                os.rmdir(name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FileError(
                    "invalid", f"{path!r} is a folder that is not empty: delete it recursively", path
                ) from None
            raise _error(exc, path) from None
        finally:
            os.close(dir_fd)


def _normal(parts: list[str], path: str) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise FileError("invalid", f"{path!r} leads out of the workspace", path)
            out.pop()
        else:
            out.append(part)
    return out


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_entry(
    dir_fd: int, name: str, flags: int, mode: int = 0o644, *, path: str, create_dir: bool = False
) -> int | None:
    """An fd of the entry `name` of the folder `dir_fd`, or None when it is a symlink, which is
    never followed. With `create_dir` a missing folder is made."""
    try:
        before = _lstat(dir_fd, name)
        if before is None and create_dir:
            _mkdir(dir_fd, name)
            before = _lstat(dir_fd, name)
        if before is not None and stat.S_ISLNK(before.st_mode):
            return None
        if before is not None and flags & os.O_DIRECTORY and not stat.S_ISDIR(before.st_mode):
            raise FileError("invalid", f"{path!r}: {name!r} is not a folder", path)
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a symlink meanwhile
            return None
        raise _error(exc, path) from None
    try:
        opened, now = os.fstat(fd), _lstat(dir_fd, name)
    except BaseException:
        os.close(fd)
        raise
    if now is None or (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
        os.close(fd)  # not the entry that is there: a symlink was followed, or it was swapped
        if now is not None and stat.S_ISLNK(now.st_mode):
            return None
        raise FileError("invalid", f"{path!r} changed while it was opened", path)
    return fd


def _mkdir(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileExistsError):  # made meanwhile
        os.mkdir(name, 0o755, dir_fd=dir_fd)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


def _list(
    fd: int, prefix: str, recursive: bool, entries: list[dict[str, object]], limit: int, room: list[int]
) -> bool:
    """Adds the entries under the folder `fd` to `entries`; False when `limit`, or `room[0]`
    (bytes the listing's JSON may take, spent as it goes), cut it short."""
    with os.scandir(fd) as listing:
        found = sorted(listing, key=lambda entry: entry.name)
    for entry in found:
        if len(entries) >= limit or room[0] <= 0:
            return False
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        mode = info.st_mode
        kind = "symlink" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"
        name = f"{prefix}/{entry.name}" if prefix else entry.name
        room[0] -= 6 * len(name) + 96  # its path escaped at the most, and the rest of it
        entries.append({"path": name, "kind": kind, "size": info.st_size, "mtime": info.st_mtime})
        if recursive and kind == "dir":
            try:
                child = _open_entry(fd, entry.name, _DIR_FLAGS, path=name)
            except FileError:
                continue
            if child is None:
                continue
            try:
                if not _list(child, name, recursive, entries, limit, room):
                    return False
            finally:
                os.close(child)
    return True


def _remove_tree(dir_fd: int, name: str) -> None:
    """Removes the folder `name` and everything in it, never following a symlink."""
    fd = _open_entry(dir_fd, name, _DIR_FLAGS, path=name)
    if fd is None:  # made a symlink meanwhile: that is what goes
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        with os.scandir(fd) as listing:
            children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing]
        for child, is_dir in children:
            if is_dir:
                _remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _error(exc: OSError, path: str) -> FileError:
    if exc.errno == errno.ENOENT:
        return FileError("not_found", f"{path!r} does not exist", path)
    if exc.errno == errno.ENOTDIR:
        return FileError("invalid", f"{path!r}: a part of it is not a folder", path)
    if exc.errno == errno.EISDIR:
        return FileError("invalid", f"{path!r} is a folder", path)
    if exc.errno == errno.EEXIST:
        return FileError("exists", f"{path!r} exists already", path)
    return FileError("failed", f"{path!r}: {exc.strerror or exc}", path)

"""A kernel's IOPub messages as the agent passes them on: images kept in the sandbox, and no
message larger than MESSAGE_BOUND.

The image of a `display_data` or `execute_result` is saved in the workspace's `images/`, under
a name of its kernel's, and the message goes on with that name in its content's `cellbox` key,
so the daemon never handles an image's bytes. A message larger than MESSAGE_BOUND bytes does
not go on as it is: stream text goes in pieces, an image stays in its file alone, and whatever
else it holds is cut to fit (`cellbox.truncated`). Whatever a kernel sends, the daemon then
holds at most MESSAGE_BOUND bytes of one message.

Standard library only: the agent imports it inside the sandbox.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cellboxd.sandbox import files

MESSAGE_BOUND = 8 << 20  # bytes of a KERNEL frame's payload
KEY = "cellbox"
_ESCAPED = 12  # bytes a character takes in JSON at the most (an astral one: two \\uXXXX)
_CHARS = (MESSAGE_BOUND - (64 << 10)) // _ESCAPED  # characters kept of a big message
_DELIM = b"<IDS|MSG>"
_RICH = (b'"display_data"', b'"execute_result"')
# MIME type -> file extension of the images saved to the workspace; SVG is text, the rest base64
IMAGE_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
}
_SAVE_TRIES = 1000


class Images:
    """Saves images as `images/{name}-{n}.{ext}`, the first free n of each name."""

    def __init__(self, workspace: files.Workspace) -> None:
        self.workspace = workspace
        self.last: dict[str, int] = {}

    def save(self, name: str, ext: str, payload: bytes) -> str | None:
        first = n = self.last.get(name, 0) + 1
        try:
            for n in range(first, first + _SAVE_TRIES):
                file = f"images/{name}-{n}.{ext}"
                if self.workspace.create(file, payload):
                    return file
        except (files.FileError, OSError):  # `images` made a symlink out, or a file
            pass
        finally:
            self.last[name] = n
        return None


def size(parts: list[bytes]) -> int:
    """The payload size of the KERNEL frame that carries `parts` (see wire.kernel_pieces)."""
    return 6 + sum(4 + len(part) for part in parts)


def pass_on(parts: list[bytes], name: str, images: Images) -> list[list[bytes]]:
    """The messages that go to the daemon for one IOPub message of the kernel `name`."""
    try:
        at = parts.index(_DELIM) + 1
    except ValueError:
        at = 0
    big = size(parts) > MESSAGE_BOUND
    if not at or len(parts) < at + 5 or not (big or any(kind in parts[at + 1] for kind in _RICH)):
        return [parts] if not big else []
    try:
        msg_type = json.loads(parts[at + 1]).get("msg_type")
        content = json.loads(parts[at + 4])
    except (ValueError, RecursionError, AttributeError):
        return [parts] if not big else []
    if not isinstance(content, dict):
        return [parts] if not big else []
    head = parts[: at + 4]  # ids, delimiter, signature, header, parent and metadata
    rest = parts[at + 5 :]  # binary buffers
    if big:  # what the daemon does not read goes; a message whose header is that big, too
        head[-1], rest = b"{}", []
        if size(head) > MESSAGE_BOUND // 2:
            return []
    if msg_type == "stream" and big and isinstance(text := content.get("text"), str):
        piece = (MESSAGE_BOUND - size(head) - 1024) // _ESCAPED  # characters: each message fits
        name_only = {key: value for key, value in content.items() if key == "name"}
        return [
            [*head, _dump({**name_only, "text": text[start : start + piece]})]
            for start in range(0, len(text), piece)
        ]
    forged = content.pop(KEY, None) is not None  # the key is the agent's to set
    saved = None
    if msg_type in ("display_data", "execute_result") and isinstance(data := content.get("data"), dict):
        saved = _save_image(data, name, images, big)
    if not big and saved is None and not forged:
        return [parts]
    extra: dict[str, Any] = {} if saved is None else {"file": saved}
    out = b"" if big else _dump({**content, KEY: extra})
    if big or size([*head, out, *rest]) > MESSAGE_BOUND:  # written again, it may have grown
        content, cut = _shrink(content, [_CHARS])
        out, rest = _dump({**content, KEY: {**extra, "truncated": cut}}), []
    if size([*head, out]) > MESSAGE_BOUND:  # not to be: keep the bare message
        out = _dump({KEY: {**extra, "truncated": True}})
    return [[*head, out, *rest]]


def _save_image(data: dict[str, Any], name: str, images: Images, drop: bool) -> str | None:
    """Saves the first image of a display's data; its file. `drop` takes its data out."""
    for mime, ext in IMAGE_EXT.items():
        value = data.get(mime)
        if not isinstance(value, str):
            continue
        try:
            payload = value.encode() if ext == "svg" else base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            return None
        if drop:
            del data[mime]
        return images.save(name, ext, payload)
    return None


def _shrink(value: Any, budget: list[int]) -> tuple[Any, bool]:
    """`value` within `budget[0]` characters (spent as it goes), and whether anything was cut.
    A dict's small members are kept first, then its big ones share what is left (an error's
    name, its value and its traceback each get some)."""
    if isinstance(value, str):
        keep = max(budget[0], 0)
        budget[0] -= min(len(value), keep)
        return (value, False) if len(value) <= keep else (value[:keep], True)
    if not isinstance(value, (list, dict)):
        budget[0] -= 8
        return value, False
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    big = set() if isinstance(value, list) else {key for key, item in items if not _small(item)}
    order = [m for m in items if m[0] not in big] + [m for m in items if m[0] in big]
    kept: dict[Any, Any] = {}
    cut = False
    left = len(big)  # big members still to come
    for key, item in order:
        budget[0] -= 8 + (len(key) if isinstance(key, str) else 0)
        if budget[0] <= 0:
            cut = True
            break
        if key in big:  # its share of what is left; what it does not spend goes to the next
            share = [budget[0] // left]
            left -= 1
            budget[0] -= share[0]
            kept[key], item_cut = _shrink(item, share)
            budget[0] += share[0]
        else:
            kept[key], item_cut = _shrink(item, budget)
        cut = cut or item_cut
    if isinstance(value, list):
        return list(kept.values()), cut
    return {key: kept[key] for key, _ in items if key in kept}, cut


def _small(value: Any) -> bool:
    return not isinstance(value, (str, list, dict)) or (isinstance(value, str) and len(value) < 1024)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()

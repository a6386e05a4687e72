"""Documents bound to kernels: completion and hover from the live kernel, for editors.

An editor binds an open document to a kernel with `cellbox/bindDocument`; the document's
text is synced by the standard `textDocument/did*` notifications (pygls keeps it), and
completion and hover ask the kernel, which knows every name earlier executions defined.
"""

from __future__ import annotations

from typing import Any

from lsprotocol import types as lsp
from pygls.workspace import TextDocument
from pygls.workspace.position_codec import ServerTextPosition

from cellboxd.execution import plain
from cellboxd.kernels import Kernel

# seconds an idle kernel gets to answer; a busy one is not asked
ANSWER_WITHIN = 5.0

_KINDS = {
    "function": lsp.CompletionItemKind.Function,
    "builtin_function_or_method": lsp.CompletionItemKind.Function,
    "method": lsp.CompletionItemKind.Method,
    "class": lsp.CompletionItemKind.Class,
    "type": lsp.CompletionItemKind.Class,
    "module": lsp.CompletionItemKind.Module,
    "keyword": lsp.CompletionItemKind.Keyword,
    "instance": lsp.CompletionItemKind.Variable,
    "statement": lsp.CompletionItemKind.Variable,
    "param": lsp.CompletionItemKind.Variable,
    "property": lsp.CompletionItemKind.Property,
    "path": lsp.CompletionItemKind.File,
    "magic": lsp.CompletionItemKind.Keyword,
}

EMPTY = lsp.CompletionList(is_incomplete=False, items=[])


class Bindings:
    """Which kernel answers for which document."""

    def __init__(self) -> None:
        self._kernels: dict[str, str] = {}

    def bind(self, uri: str, kernel_id: str | None) -> None:
        if kernel_id is None:
            self._kernels.pop(uri, None)
        else:
            self._kernels[uri] = kernel_id

    def kernel_id(self, uri: str) -> str | None:
        return self._kernels.get(uri)


async def complete(kernel: Kernel, document: TextDocument, position: lsp.Position) -> lsp.CompletionList:
    code = document.source
    reply = await kernel.ask("complete", code, document.offset_at_position(position), ANSWER_WITHIN)
    if reply is None or reply.get("status") != "ok":
        return EMPTY
    start, end = reply.get("cursor_start", 0), reply.get("cursor_end", 0)
    types: dict[str, str] = {
        item["text"]: item.get("type", "")
        for item in reply.get("metadata", {}).get("_jupyter_types_experimental", [])
        if isinstance(item, dict) and "text" in item
    }
    matches = [m for m in reply.get("matches", []) if isinstance(m, str)]
    # `df.co` completes to `df.columns`: replace only what follows the dot, as editors expect
    # (`columns` for `co`), when every match keeps the part before it
    head, dot, _ = code[start:end].rpartition(".")
    cut = len(head) + 1 if dot and all(m.startswith(head + ".") for m in matches) else 0
    edit_range = lsp.Range(_position(document, start + cut), _position(document, end))
    items = [
        lsp.CompletionItem(
            label=match[cut:],
            kind=_KINDS.get(types.get(match, "")),
            detail=types.get(match) or None,
            sort_text=f"{rank:05d}",  # the kernel's order
            text_edit=lsp.TextEdit(edit_range, match[cut:]),
        )
        for rank, match in enumerate(matches)
    ]
    return lsp.CompletionList(is_incomplete=False, items=items)


def _position(document: TextDocument, offset: int) -> lsp.Position:
    """The client position of a code point offset (pygls' own is off at the end of the text)."""
    before = document.source[:offset]
    line = before.count("\n")
    column = offset - (before.rfind("\n") + 1)
    return document.position_to_client_units(ServerTextPosition(line, column))


async def hover(kernel: Kernel, document: TextDocument, position: lsp.Position) -> lsp.Hover | None:
    reply = await kernel.ask("inspect", document.source, document.offset_at_position(position), ANSWER_WITHIN)
    if reply is None or reply.get("status") != "ok" or not reply.get("found"):
        return None
    data: dict[str, Any] = reply.get("data", {})
    if isinstance(markdown := data.get("text/markdown"), str):
        return lsp.Hover(lsp.MarkupContent(lsp.MarkupKind.Markdown, markdown))
    text = data.get("text/plain")
    if not isinstance(text, str):
        return None
    return lsp.Hover(lsp.MarkupContent(lsp.MarkupKind.PlainText, "\n".join(plain(text.splitlines()))))

"""LSP work-done progress for requests that carry a `workDoneToken`."""

from __future__ import annotations

from types import TracebackType

from lsprotocol import types as lsp
from pygls.progress import Progress

from cellbox.types import ProgressToken


class WorkDone:
    """`$/progress` begin on enter, `report` per step, end on exit; a no-op without a token."""

    def __init__(self, progress: Progress, token: ProgressToken | None, title: str) -> None:
        self._progress = progress
        self._token = token
        self._title = title

    def __enter__(self) -> WorkDone:
        if self._token is not None:
            self._progress.begin(self._token, lsp.WorkDoneProgressBegin(title=self._title))
        return self

    def report(self, message: str) -> None:
        if self._token is not None:
            self._progress.report(self._token, lsp.WorkDoneProgressReport(message=message))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            message = "done" if exc is None else "failed"
            self._progress.end(self._token, lsp.WorkDoneProgressEnd(message=message))
            self._progress.tokens.pop(self._token, None)

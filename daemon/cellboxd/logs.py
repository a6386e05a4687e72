"""Logging: stderr, a file in the platformdirs log dir, and `window/logMessage` to the client."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import Any

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException

from cellboxd import config
from cellboxd.config import Settings

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LSP_TYPE = {
    logging.ERROR: lsp.MessageType.Error,
    logging.WARNING: lsp.MessageType.Warning,
    logging.INFO: lsp.MessageType.Info,
    logging.DEBUG: lsp.MessageType.Log,
}


class _ExpectedErrors(logging.Filter):
    """Drops pygls' tracebacks for application errors: they are answers, not failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, JsonRpcException)


class ClientLogHandler(logging.Handler):
    """Sends log records to the client as `window/logMessage` notifications."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send
        self._sending = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._sending:  # a record logged while sending one
            return
        self._sending = True
        try:
            kind = _LSP_TYPE.get(
                record.levelno, lsp.MessageType.Error if record.levelno > 40 else lsp.MessageType.Log
            )
            self._send("window/logMessage", {"type": int(kind), "message": self.format(record)})
        except Exception:
            self.handleError(record)
        finally:
            self._sending = False


_stderr = logging.StreamHandler(sys.stderr)


def set_level(name: str) -> None:
    """The level of stderr (the log file always keeps INFO and above)."""
    level = getattr(logging, name.upper())
    _stderr.setLevel(level)
    for lib in ("pygls", "asyncio", "traitlets"):  # their chatter only when debugging
        logging.getLogger(lib).setLevel(logging.WARNING if level > logging.DEBUG else logging.DEBUG)


def setup(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    set_level(settings.log_level)
    _stderr.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(_stderr)
    try:
        config.log_path(settings).mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(
            config.log_path(settings) / "cellboxd.log", maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
    except OSError as exc:
        logging.getLogger(__name__).warning("no log file: %s", exc)
    else:
        file.setLevel(min(level, logging.INFO))
        file.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file)
    for handler in root.handlers:
        handler.addFilter(_ExpectedErrors())


def attach_client(send: Any, level: str) -> ClientLogHandler:
    handler = ClientLogHandler(send)
    handler.setLevel(getattr(logging, level.upper()))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(_ExpectedErrors())
    logging.getLogger().addHandler(handler)
    return handler

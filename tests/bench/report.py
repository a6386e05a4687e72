"""Results: rows with their targets, printed as a rich table and written as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from cellbox import __version__

_FORMATS = {"ms": "{:.2f}", "s": "{:.3f}", "exec/s": "{:.0f}", "MB/s": "{:.1f}", "MB": "{:.1f}", "": "{:.0f}"}


@dataclass(frozen=True)
class Target:
    """What a row must meet. `ratio_*` compare with the baseline; `growth` compares the end of
    a run with its value after warm-up (`Row.before`); `completes` asks for a value at all."""

    kind: Literal["max", "ratio_max", "ratio_min", "growth", "completes"]
    limit: float = 0.0
    unit: str = ""

    def judge(self, row: Row) -> bool:
        if row.cellbox is None:
            return False
        if self.kind == "max":
            return row.cellbox <= self.limit
        if self.kind == "growth":
            return row.before is not None and row.cellbox <= row.before * self.limit
        if self.kind == "completes":
            return True
        ratio = row.ratio
        if ratio is None:
            return False
        return ratio <= self.limit if self.kind == "ratio_max" else ratio >= self.limit

    def __str__(self) -> str:
        match self.kind:
            case "max":
                return f"≤ {self.limit:g} {self.unit}".rstrip()
            case "ratio_max":
                return f"ratio ≤ {self.limit:.2f}"
            case "ratio_min":
                return f"ratio ≥ {self.limit:.2f}"
            case "growth":
                return "no growth" if self.limit == 1 else f"growth ≤ {self.limit - 1:.0%}"
            case "completes":
                return "completes"


@dataclass
class Row:
    """One measured number of one case; `cellbox` None means that cellbox produced none."""

    case: str
    backend: str | None
    unit: str
    cellbox: float | None
    baseline: float | None = None
    target: Target | None = None
    before: float | None = None  # for growth targets: the value after warm-up
    note: str = ""
    error: str = ""  # set when the benchmark itself failed on this case
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """cellbox / baseline, or end / after warm-up for growth rows."""
        reference = self.baseline if self.baseline is not None else self.before
        if self.cellbox is None or not reference:
            return None
        return self.cellbox / reference

    @property
    def passed(self) -> bool | None:
        if self.error:
            return False
        return None if self.target is None else self.target.judge(self)

    @property
    def label(self) -> str:
        return self.case if self.backend is None else f"{self.case} ({self.backend})"

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "backend": self.backend,
            "unit": self.unit,
            "cellbox": self.cellbox,
            "baseline": self.baseline,
            "before": self.before,
            "ratio": self.ratio,
            "target": None if self.target is None else str(self.target),
            "passed": self.passed,
            "note": self.note or None,
            "error": self.error or None,
            "details": self.details,
        }


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{_FORMATS.get(unit, '{:.2f}').format(value)} {unit}".rstrip()


def _verdict(row: Row) -> str:
    if row.error:
        return "[bold red]error[/]"
    return {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "—"}[row.passed]


def print_table(console: Console, rows: list[Row], title: str) -> None:
    table = Table(title=title)
    for name, justify in (("case", "left"), ("cellbox", "right"), ("baseline", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for name in ("ratio", "target", "result"):
        table.add_column(name, justify="right")
    for row in rows:
        cellbox = _value(row.cellbox, row.unit)
        if row.before is not None:
            cellbox = f"{_value(row.before, row.unit)} → {cellbox}"
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
        target = "" if row.target is None else str(row.target)
        table.add_row(row.label, cellbox, _value(row.baseline, row.unit), ratio, target, _verdict(row))
    console.print(table)
    for row in rows:
        if row.note or row.error:
            console.print(f"[dim]{row.label}:[/] {row.error or row.note}")


def machine(engine_version: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cellbox": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "docker_engine": engine_version,
    }
    with open("/proc/meminfo") as meminfo:
        info["memory_mb"] = int(meminfo.readline().split()[1]) // 1024
    return info


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    results = [row.to_json() for row in rows]
    path.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")

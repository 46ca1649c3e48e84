"""Per-epoch metrics: a printed table, JSONL, CSV and TensorBoard event files."""

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch.utils.tensorboard import SummaryWriter

Row = Dict[str, Union[int, float]]


def format_table(rows: List[Row]) -> str:
    """Renders rows (one per epoch) as an aligned plain-text table, columns in first-seen order."""
    if not rows:
        return ""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rows_before(path: Path, start_epoch: int) -> List[Row]:
    """The rows of a JSONL file from epochs before ``start_epoch`` (a resumed run redoes the rest)."""
    rows: List[Row] = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON: {e}") from e
        if row["epoch"] < start_epoch:
            rows.append(row)
    return rows


class MetricsLogger:
    """Appends one row of metrics per epoch to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard,
    and optional nested detail to ``eval_detail.jsonl``.

    A resumed run passes the epoch it restarts from: rows of that epoch and later (written by
    the attempt that died) are dropped, so every epoch appears once, and TensorBoard events
    from those epochs are purged.

    Args:
        out_dir: directory for ``metrics.jsonl``, ``metrics.csv`` and ``tensorboard/``.
        start_epoch: first epoch this run will log.
        enabled: ``False`` on ranks other than 0: nothing is written.

    Example::

        logger = MetricsLogger("runs/hytrec", start_epoch=0, enabled=rank == 0)
        logger.log(0, {"train_loss": 6.1, "valid_hr@10": 0.21})
        print(logger.table())
        logger.close()
    """

    def __init__(self, out_dir: "str | os.PathLike[str]", start_epoch: int = 0, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.rows: List[Row] = []
        self.details: List[Row] = []
        self._writer: Optional[SummaryWriter] = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows = _rows_before(self.out_dir / "metrics.jsonl", start_epoch)
        self.details = _rows_before(self.out_dir / "eval_detail.jsonl", start_epoch)
        self._flush()
        self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_epoch)

    def log(self, epoch: int, metrics: Dict[str, float], detail: Optional[Dict[str, Any]] = None) -> Row:
        """Records one epoch's metrics; returns the row as written.

        Args:
            epoch: the epoch.
            metrics: the scalars of the epoch's row (table, CSV, TensorBoard).
            detail: optional nested figures too many for the table (e.g. metrics by history
                length), written to ``eval_detail.jsonl`` only.
        """
        row: Row = {"epoch": epoch, **metrics}
        if not self.enabled:
            return row
        self.rows.append(row)
        if detail is not None:
            self.details.append({"epoch": epoch, **detail})
        self._flush()
        assert self._writer is not None
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=epoch)
        self._writer.flush()
        return row

    def table(self) -> str:
        """All rows logged so far (including those kept from a previous attempt)."""
        return format_table(self.rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _flush(self) -> None:
        _write_atomic(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        _write_atomic(self.out_dir / "eval_detail.jsonl", "".join(json.dumps(r) + "\n" for r in self.details))
        columns: List[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_atomic(self.out_dir / "metrics.csv", text.getvalue())

"""Reading time series from delimited text (CSV, TSV) and NPZ files for the command
line, with errors that name the file and the problem.

Every problem raises :class:`DataError`, whose message is one line of the form
``FILE: problem`` (the CLI prints it and exits with status 2).

* **Delimited text** (``.csv``, ``.tsv``, ``.txt``): the separator is detected (``,``,
  ``;``, tab, or runs of spaces; tab for ``.tsv``; with ``;`` a decimal comma ``1,5`` is
  read as 1.5). A first row of numbers means the file has no header: its columns are
  named ``column1, column2, ...``. Empty cells and ``NA`` / ``NaN`` / ``nan`` / ``null``
  are missing values (NaN); any other cell that is not a number is an error naming its
  row and column.

  ``columns`` picks the observed columns by name. By default every column is data
  except: the time column; a column named ``sequence`` (the sequence label, as
  ``ppl-dyn simulate`` writes it); the simulated true states ``latent_*``; and columns
  named like time labels (:data:`TIME_NAMES`: ``year``, ``month``, ...).

  The time axis is ``time_column`` (numbers, or ISO 8601 dates read as decimal years:
  ``2021-03-04``, ``2021-03-04T12:00Z``, ``2021-03``, ``2021Q1``), which must increase.
  Without it, the first column of dates or the first column named like a time
  (:data:`TIME_NAMES`) whose numbers increase is the time axis; else a pair of ``year``
  and ``month`` columns; else ``0..T-1``. ``Series.notes`` says what was detected.

  A ``sequence_column`` splits the rows into equally long sequences (in order of first
  appearance); the time stamps must increase within each.
* **NPZ**: ``columns`` names arrays in the archive (default ``y``); each is ``(T,)``,
  ``(T, k)`` or ``(S, T, k)`` and they are joined along the last axis. ``time_column``
  names a ``(T,)`` array; without it an increasing array ``time`` or ``t`` is used.

A series must have at least ``min_steps`` time steps, at least one observed (finite)
value in every column, and no infinite values.
"""

from __future__ import annotations

import csv
import datetime
import math
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["DataError", "Series", "load_series", "MISSING_TOKENS"]

#: File suffixes read as delimited text (the separator is detected; ``.tsv`` is tab).
TEXT_SUFFIXES = (".csv", ".tsv", ".txt")

#: Cell values read as missing (NaN), compared case-insensitively after stripping.
MISSING_TOKENS = ("", "na", "nan", "n/a", "null")


class DataError(ValueError):
    """A data file that cannot be used; ``str(err)`` is ``"FILE: problem"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class Series(NamedTuple):
    """Observations read from a file.

    Attributes:
        y: ``(T, k)`` or ``(S, T, k)`` floats, NaN = missing.
        time: ``(T,)`` time stamps (``0..T-1`` when the file has none).
        names: the ``k`` column names.
        source: where the data came from (path or ``dataset:NAME``).
        time_name: name of the time axis (``"t"`` when implicit; ``"NAME (decimal
            year)"`` for a column of dates).
        notes: what the reader decided on its own (a detected time axis, header or
            sequence column; columns it did not fit), one short phrase each.
    """

    y: np.ndarray
    time: np.ndarray
    names: tuple
    source: str
    time_name: str = "t"
    notes: tuple = ()


def _split_names(columns) -> Optional[list]:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = columns.split(",")
    names = [c.strip() for c in columns]
    if not names or any(not c for c in names):
        raise ValueError(f"empty column name in {columns!r}")
    return names


def _read_rows(path: Path) -> tuple[list, str]:
    """The file's non-blank rows as lists of cells, and the separator: tab for ``.tsv``,
    else the one of ``,`` ``;`` tab that the file uses, else runs of whitespace."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(path, "not a text file (cannot decode it as UTF-8)") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(path, "the file is empty")
    if path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff("\n".join(lines[:200]), delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = None  # one column, or columns separated by spaces
    if delimiter is None:
        return [ln.split() for ln in lines], " "
    try:
        return list(csv.reader(lines, delimiter=delimiter)), delimiter
    except csv.Error as err:
        raise DataError(path, f"malformed CSV ({err})") from None


def _number(text: str, decimal_comma: bool = False) -> Optional[float]:
    """The cell as a float (NaN for a missing-value token), or None if it is not one."""
    s = text.strip()
    if s.lower() in MISSING_TOKENS:
        return math.nan
    if decimal_comma and "," in s and "." not in s:
        s = s.replace(",", ".")  # 1,5 in a file separated by ';'
    try:
        return float(s)
    except ValueError:
        return None


_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_YEAR_QUARTER = re.compile(r"^(\d{4})-?Q([1-4])$", re.I)
_ISO_DATE = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
)


def decimal_year(text: str) -> Optional[float]:
    """An ISO 8601 date or date-time (``2021-03-04``, ``2021-03-04T12:00:00Z``), year and
    month (``2021-03``) or quarter (``2021Q1``, ``2021-Q1``) as a decimal year (the
    calendar month or quarter as an exact fraction; other dates as the elapsed fraction of
    their year, in UTC when a zone is given); None if the text is none of these."""
    s = text.strip()
    m = _YEAR_MONTH.match(s)
    if m and 1 <= int(m[2]) <= 12:
        return int(m[1]) + (int(m[2]) - 1) / 12
    m = _YEAR_QUARTER.match(s)
    if m:
        return int(m[1]) + (int(m[2]) - 1) / 4
    if not _ISO_DATE.match(s):
        return None
    try:
        d = datetime.datetime.fromisoformat(s)
    except ValueError:
        return None
    if d.tzinfo is not None:
        d = d.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    start = datetime.datetime(d.year, 1, 1)
    return d.year + (d - start) / (datetime.datetime(d.year + 1, 1, 1) - start)


def _column_times(cells: list) -> tuple[Optional[np.ndarray], str]:
    """A column's cells as time stamps: ``(values, "number")`` if every cell is a
    number, ``(values, "date")`` if every cell is a date (as decimal years), else
    ``(None, "")``. Missing cells make it no time column."""
    nums = [_number(c) for c in cells]
    if all(v is not None and not math.isnan(v) for v in nums):
        return np.array(nums, float), "number"
    dates = [decimal_year(c) for c in cells]
    if all(v is not None for v in dates):
        return np.array(dates, float), "date"
    return None, ""


def _increasing(time: np.ndarray, groups) -> bool:
    return all(np.all(np.diff(time[m]) > 0) for m in groups)


#: Column names read as time stamps when their values increase (case-insensitive).
TIME_NAMES = (
    "t",
    "time",
    "date",
    "datetime",
    "timestamp",
    "year",
    "month",
    "quarter",
    "week",
    "day",
    "period",
    "step",
)
#: Column name read as the sequence label when no --sequence-column is given.
SEQUENCE_NAME = "sequence"
#: Prefix of the columns ``ppl-dyn simulate`` writes for the true states: never data
#: unless named in ``columns``.
LATENT_PREFIX = "latent_"


def _read_csv(path: Path, columns, time_column, sequence_column):
    rows, delimiter = _read_rows(path)
    notes = []
    first = [c.strip() for c in rows[0]]
    cells_first = [_number(c) for c in first]
    # a first row of numbers (or dates) is data: the file has no header
    if all(
        v is not None or decimal_year(c) is not None
        for v, c in zip(cells_first, first, strict=True)
    ):
        header = [f"column{j + 1}" for j in range(len(first))]
        body_start = 1
        body = rows
        notes.append(
            f"no header row (the first row holds values): columns named {header[0]}..{header[-1]}"
        )
    else:
        header, body, body_start = first, rows[1:], 2
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataError(path, f"duplicate column names in the header: {dup}")
    for c in (time_column, sequence_column):
        if c is not None and c not in header:
            raise DataError(path, f"no column {c!r} (columns: {', '.join(header)})")
    for c in columns or ():
        if c not in header:
            raise DataError(path, f"no column {c!r} (columns: {', '.join(header)})")
    if not body:
        raise DataError(path, "no data rows below the header")
    for i, r in enumerate(body, start=body_start):
        if len(r) != len(header):
            raise DataError(path, f"row {i} has {len(r)} fields, the header has {len(header)}")
    col = {h: [r[j] for r in body] for j, h in enumerate(header)}
    chosen = set(columns or ())

    if sequence_column is None and SEQUENCE_NAME in header and SEQUENCE_NAME not in chosen:
        sequence_column = SEQUENCE_NAME
        notes.append(f"sequences labelled by column {SEQUENCE_NAME!r}")
    if sequence_column is not None:
        labels = [c.strip() for c in col[sequence_column]]
        order = list(dict.fromkeys(labels))
        groups = [np.array([lab == g for lab in labels]) for g in order]
    else:
        groups = [np.ones(len(body), bool)]

    time_cols: list = []
    time_name = "t"
    if time_column is not None:
        time, kind = _column_times(col[time_column])
        if time is None:
            cells = col[time_column]
            numeric = sum(_number(c) is not None for c in cells) >= len(cells) / 2

            def bad(c):
                v = _number(c)
                return (v is None or math.isnan(v)) if numeric else decimal_year(c) is None

            i, c = next((i, c) for i, c in enumerate(cells, body_start) if bad(c))
            problem = "missing" if c.strip().lower() in MISSING_TOKENS else repr(c)
            raise DataError(
                path,
                f"row {i}, column {time_column!r}: {problem} is not a time stamp (a "
                "number or an ISO date such as 2021-03-04); the time column has no gaps",
            )
        if not _increasing(time, groups):
            raise DataError(path, f"the time stamps in column {time_column!r} do not increase")
        time_cols = [time_column]
        time_name = time_column + (" (decimal year)" if kind == "date" else "")
    else:
        time, time_name, time_cols = _detect_time(
            header, col, chosen, sequence_column, groups, notes
        )

    if columns is None:
        skipped_latent = [h for h in header if h.startswith(LATENT_PREFIX)]
        if skipped_latent:
            notes.append(f"simulated states {', '.join(skipped_latent)} not fitted")
        labels = [
            h
            for h in header
            if h.lower() in TIME_NAMES and h not in time_cols and h != sequence_column
        ]
        if labels:
            notes.append(
                f"time labels {', '.join(labels)} not fitted (name them in --columns to fit them)"
            )
        special = {*time_cols, sequence_column, *skipped_latent, *labels}
        columns = [h for h in header if h not in special]
        if not columns:
            raise DataError(path, "no data columns besides the time/sequence columns")
    decimal_comma = delimiter == ";"
    y = np.empty((len(body), len(columns)))
    for k, c in enumerate(columns):
        for i, cell in enumerate(col[c]):
            v = _number(cell, decimal_comma)
            if v is None:
                raise DataError(
                    path, f"row {i + body_start}, column {c!r}: {cell!r} is not a number"
                )
            if math.isinf(v):
                raise DataError(
                    path, f"row {i + body_start}, column {c!r}: infinite value {cell!r}"
                )
            y[i, k] = v
    if sequence_column is not None:
        lengths = {int(m.sum()) for m in groups}
        if len(lengths) != 1:
            raise DataError(
                path,
                f"the sequences in column {sequence_column!r} have different lengths "
                f"{sorted(lengths)}; they must be equally long",
            )
        y = np.stack([y[m] for m in groups])
        time = time[groups[0]]
    return y, time, tuple(columns), time_name, tuple(notes)


def _detect_time(header, col, chosen, sequence_column, groups, notes):
    """The time axis of a file given without ``time_column``: the first column (not
    chosen as data) of ISO dates, or named like a time (:data:`TIME_NAMES`) with
    increasing numbers, or a pair of ``year`` and ``month`` columns; else ``0..T-1``."""
    n = len(next(iter(col.values())))
    lower = {h.lower(): h for h in header}
    candidates = [h for h in header if h not in chosen and h != sequence_column]
    for h in candidates:
        time, kind = _column_times(col[h])
        if time is None or not _increasing(time, groups):
            continue
        if kind == "date" or h.lower() in TIME_NAMES:
            name = h + (" (decimal year)" if kind == "date" else "")
            notes.append(f"time axis from column {h!r}")
            return time, name, [h]
    if "year" in lower and "month" in lower and not {lower["year"], lower["month"]} & chosen:
        year, k1 = _column_times(col[lower["year"]])
        month, k2 = _column_times(col[lower["month"]])
        if (
            year is not None
            and month is not None
            and k1 == k2 == "number"
            and np.all(month == np.round(month))
            and np.all((month >= 1) & (month <= 12))
        ):
            time = year + (month - 1) / 12
            if _increasing(time, groups):
                notes.append(f"time axis from columns {lower['year']!r} and {lower['month']!r}")
                return time, "year", [lower["year"], lower["month"]]
    return np.arange(n, dtype=float), "t", []


def _read_npz(path: Path, columns, time_column, sequence_column):
    if sequence_column is not None:
        raise DataError(
            path,
            "--sequence-column applies to CSV files; in an NPZ file "
            "give y a leading sequence axis (S, T, k)",
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable archive is a data error
        raise DataError(path, f"not a readable NPZ archive ({type(err).__name__})") from None
    with archive:
        if not hasattr(archive, "files"):
            raise DataError(path, "not an NPZ archive (a single .npy array?)")
        keys = list(archive.files)
        if columns is None:
            if "y" not in keys:
                raise DataError(
                    path, f"no array 'y'; pass --columns (arrays: {', '.join(keys) or 'none'})"
                )
            columns = ["y"]
        parts, names = [], []
        for c in columns:
            if c not in keys:
                raise DataError(path, f"no array {c!r} (arrays: {', '.join(keys) or 'none'})")
            try:
                a = archive[c]
            except ValueError:
                raise DataError(path, f"array {c!r} holds objects, not numbers") from None
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
                raise DataError(path, f"array {c!r} is not numeric (dtype {a.dtype})")
            if a.ndim == 1:
                a = a[:, None]
            if a.ndim not in (2, 3):
                raise DataError(
                    path, f"array {c!r} must be (T,), (T, k) or (S, T, k); got shape {a.shape}"
                )
            parts.append(a.astype(float))
            k = a.shape[-1]
            names += [c] if k == 1 else [f"{c}{i}" for i in range(k)]
        if len({p.ndim for p in parts}) != 1 or len({p.shape[:-1] for p in parts}) != 1:
            raise DataError(
                path,
                "the selected arrays have different lengths: "
                + ", ".join(f"{c} {p.shape}" for c, p in zip(columns, parts, strict=True)),
            )
        y = np.concatenate(parts, -1)
        T = y.shape[-2]
        notes = []
        time_name = "t"
        if time_column is not None:
            if time_column not in keys:
                raise DataError(path, f"no array {time_column!r} (arrays: {', '.join(keys)})")
            time = np.asarray(archive[time_column])
            if not np.issubdtype(time.dtype, np.number) or time.shape != (T,):
                raise DataError(path, f"array {time_column!r} must be numeric of shape ({T},)")
            time = time.astype(float)
            if not np.all(np.diff(time) > 0):
                raise DataError(path, f"the time stamps in array {time_column!r} do not increase")
            time_name = time_column
        else:
            time = np.arange(T, dtype=float)
            for k in ("time", "t"):  # as ppl-dyn simulate writes it
                a = archive[k] if k in keys and k not in columns else None
                if (
                    a is not None
                    and a.shape == (T,)
                    and np.issubdtype(a.dtype, np.number)
                    and np.all(np.diff(a) > 0)
                ):
                    time, time_name = a.astype(float), k
                    notes.append(f"time axis from array {k!r}")
                    break
    if np.any(np.isinf(y)):
        raise DataError(path, "the data contain infinite values")
    return y, time, tuple(names), time_name, tuple(notes)


def load_series(
    path,
    *,
    columns: Optional[Sequence[str] | str] = None,
    time_column: Optional[str] = None,
    sequence_column: Optional[str] = None,
    min_steps: int = 10,
) -> Series:
    """Read observations from a ``.csv``/``.tsv``/``.txt`` or ``.npz`` file (see the
    module docstring).

    Raises:
        DataError: one line ``"FILE: problem"`` for a missing or unreadable file, an
            unknown column, a non-numeric or infinite cell, a column with no observed
            value, or fewer than ``min_steps`` time steps.
    """
    p = Path(path)
    try:
        names = _split_names(columns)
    except ValueError as err:
        raise DataError(p, f"--columns: {err}") from None
    if not p.exists():
        raise DataError(p, "no such file")
    if p.is_dir():
        raise DataError(p, "is a directory, not a data file")
    suffix = p.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            read = _read_csv
        elif suffix == ".npz":
            read = _read_npz
        else:
            raise DataError(
                p, f"unknown file type {p.suffix!r}; expected {', '.join(TEXT_SUFFIXES)} or .npz"
            )
        y, time, names, time_name, notes = read(p, names, time_column, sequence_column)
    except OSError as err:
        raise DataError(p, f"cannot read it ({err.strerror or err})") from None
    series = Series(y, time, tuple(names), str(p), time_name, notes)
    return check_series(series, min_steps=min_steps, time_name=time_name)


def check_series(series: Series, *, min_steps: int = 10, time_name: str = "t") -> Series:
    """Validate shapes and contents of a :class:`Series` (raises :class:`DataError`)."""
    y, src = series.y, series.source
    T = y.shape[-2]
    if T < min_steps:
        raise DataError(src, f"too short: {T} time steps, need at least {min_steps}")
    flat = y.reshape(-1, y.shape[-1])
    for j, name in enumerate(series.names):
        n_obs = int(np.sum(np.isfinite(flat[:, j])))
        if n_obs == 0:
            raise DataError(src, f"column {name!r} has no observed values (all missing)")
        if n_obs < 2:
            raise DataError(src, f"column {name!r} has only {n_obs} observed value")
    obs_steps = np.any(np.isfinite(y), -1)  # ([S,] T)
    n_obs_steps = int(np.min(np.sum(obs_steps, -1)))
    if n_obs_steps < min_steps:
        raise DataError(
            src, f"too short: {n_obs_steps} observed time steps, need at least {min_steps}"
        )
    return series._replace(time_name=time_name)

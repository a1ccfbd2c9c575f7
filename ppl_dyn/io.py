"""Reading time series from CSV / NPZ files for the command line, with errors that name
the file and the problem.

Every problem raises :class:`DataError`, whose message is one line of the form
``FILE: problem`` (the CLI prints it and exits with status 2).

* **CSV**: a header row, then one row per time step. ``columns`` picks the observed
  columns by name (default: every column but the time column and the sequence column).
  Empty cells and ``NA`` / ``NaN`` / ``nan`` are missing values (NaN); any other cell that
  is not a number is an error naming its row and column. A ``sequence_column`` splits
  the rows into equally long sequences (in order of first appearance).
* **NPZ**: ``columns`` names arrays in the archive (default ``y``); each is ``(T,)``,
  ``(T, k)`` or ``(S, T, k)`` and they are joined along the last axis. ``time_column``
  names a ``(T,)`` array.

A series must have at least ``min_steps`` time steps, at least one observed (finite)
value in every column, and no infinite values.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["DataError", "Series", "load_series", "MISSING_TOKENS"]

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
        time_name: name of the time column (``"t"`` when implicit).
    """

    y: np.ndarray
    time: np.ndarray
    names: tuple
    source: str
    time_name: str = "t"


def _cell(path, text: str, row: int, col: str) -> float:
    s = text.strip()
    if s.lower() in MISSING_TOKENS:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        raise DataError(
            path, f"row {row}, column {col!r}: {text!r} is not a number"
        ) from None
    if math.isinf(v):
        raise DataError(path, f"row {row}, column {col!r}: infinite value {text!r}")
    return v


def _split_names(columns) -> Optional[list]:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = columns.split(",")
    names = [c.strip() for c in columns]
    if not names or any(not c for c in names):
        raise ValueError(f"empty column name in {columns!r}")
    return names


def _read_csv(path: Path, columns, time_column, sequence_column):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(1 << 16)
            f.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            rows = list(csv.reader(f, dialect))
    except UnicodeDecodeError:
        raise DataError(path, "not a text CSV file (cannot decode it as UTF-8)") from None
    except csv.Error as err:
        raise DataError(path, f"malformed CSV ({err})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(path, "the file is empty")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataError(path, f"duplicate column names in the header: {dup}")
    special = [c for c in (time_column, sequence_column) if c is not None]
    for c in special:
        if c not in header:
            raise DataError(path, f"no column {c!r} (columns: {', '.join(header)})")
    if columns is None:
        columns = [h for h in header if h not in special]
        if not columns:
            raise DataError(path, "no data columns besides the time/sequence columns")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            path,
            f"no column {missing[0]!r} (columns: {', '.join(header)})",
        )
    idx = [header.index(c) for c in columns]
    body = rows[1:]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(
                path, f"row {i} has {len(r)} fields, the header has {len(header)}"
            )
    y = np.array(
        [[_cell(path, r[j], i, header[j]) for j in idx] for i, r in enumerate(body, start=2)],
        dtype=float,
    ).reshape(len(body), len(idx))
    if time_column is not None:
        j = header.index(time_column)
        time = np.array([_cell(path, r[j], i, time_column) for i, r in enumerate(body, 2)])
        if np.any(np.isnan(time)):
            raise DataError(path, f"column {time_column!r} has missing time stamps")
    else:
        time = np.arange(len(body), dtype=float)
    if sequence_column is not None:
        j = header.index(sequence_column)
        labels = [r[j].strip() for r in body]
        order = list(dict.fromkeys(labels))
        groups = [np.array([lab == g for lab in labels]) for g in order]
        lengths = {int(m.sum()) for m in groups}
        if len(lengths) != 1:
            raise DataError(
                path,
                f"the sequences in column {sequence_column!r} have different lengths "
                f"{sorted(lengths)}; they must be equally long",
            )
        y = np.stack([y[m] for m in groups])
        time = time[groups[0]]
    return y, time, tuple(columns)


def _read_npz(path: Path, columns, time_column, sequence_column):
    if sequence_column is not None:
        raise DataError(path, "--sequence-column applies to CSV files; in an NPZ file "
                        "give y a leading sequence axis (S, T, k)")
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
                raise DataError(path, f"array {c!r} must be (T,), (T, k) or (S, T, k); "
                                f"got shape {a.shape}")
            parts.append(a.astype(float))
            k = a.shape[-1]
            names += [c] if k == 1 else [f"{c}{i}" for i in range(k)]
        if len({p.ndim for p in parts}) != 1 or len({p.shape[:-1] for p in parts}) != 1:
            raise DataError(path, "the selected arrays have different lengths: "
                            + ", ".join(f"{c} {p.shape}" for c, p in zip(columns, parts,
                                                                         strict=True)))
        y = np.concatenate(parts, -1)
        T = y.shape[-2]
        if time_column is not None:
            if time_column not in keys:
                raise DataError(path, f"no array {time_column!r} (arrays: {', '.join(keys)})")
            time = np.asarray(archive[time_column])
            if not np.issubdtype(time.dtype, np.number) or time.shape != (T,):
                raise DataError(path, f"array {time_column!r} must be numeric of shape ({T},)")
            time = time.astype(float)
        else:
            time = np.arange(T, dtype=float)
    if np.any(np.isinf(y)):
        raise DataError(path, "the data contain infinite values")
    return y, time, tuple(names)


def load_series(
    path,
    *,
    columns: Optional[Sequence[str] | str] = None,
    time_column: Optional[str] = None,
    sequence_column: Optional[str] = None,
    min_steps: int = 10,
) -> Series:
    """Read observations from a ``.csv`` or ``.npz`` file (see the module docstring).

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
        if suffix == ".csv":
            y, time, names = _read_csv(p, names, time_column, sequence_column)
        elif suffix == ".npz":
            y, time, names = _read_npz(p, names, time_column, sequence_column)
        else:
            raise DataError(p, f"unknown file type {p.suffix!r}; expected .csv or .npz")
    except OSError as err:
        raise DataError(p, f"cannot read it ({err.strerror or err})") from None
    return check_series(Series(y, time, tuple(names), str(p)), min_steps=min_steps,
                        time_name=time_column or "t")


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

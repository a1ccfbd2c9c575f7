"""Small real time series shipped with the package (no downloads).

Each loader returns a :class:`Dataset` whose ``y`` has shape ``(T, 1)`` and is ready for
the models (NaN marks missing values, which every E-step treats as missing data).

=============  ======  ==================================================================
name           T       source (nile, sunspots, co2 via the statsmodels datasets)
=============  ======  ==================================================================
``nile``       100     annual flow of the Nile at Aswan, 1871-1970, in 10^8 m^3 (Cobb
                       1978, Biometrika 65(2):243-251; the classic local-level example of
                       Durbin & Koopman)
``sunspots``   309     yearly sunspot numbers 1700-2008 (NOAA National Geophysical Data
                       Center)
``co2``        2284    weekly atmospheric CO2 at Mauna Loa, March 1958 - December 2001, ppm;
                       59 weeks missing (Keeling & Whorf 2004, CDIAC, Oak Ridge National
                       Laboratory)
``lynx``       114     annual Canadian lynx trappings 1821-1934 (counts; the classic
                       strongly nonlinear ~10-year cycle; Brockwell & Davis 1991, series G,
                       via R's datasets package)
``discoveries`` 100    yearly numbers of important discoveries and inventions 1860-1959
                       (small counts; The World Almanac and Book of Facts 1975, via R's
                       datasets package)
=============  ======  ==================================================================
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "load", "nile", "sunspots", "co2", "lynx", "discoveries", "names"]


class Dataset(NamedTuple):
    """A univariate series: ``time`` ``(T,)`` and ``y`` ``(T, 1)`` (NaN = missing)."""

    name: str
    time: np.ndarray
    y: np.ndarray
    units: str
    description: str
    source: str


_META = {
    "nile": (
        "nile.csv",
        "year",
        "volume",
        "10^8 m^3 per year",
        "Annual flow of the Nile at Aswan, 1871-1970 (apparent change point near 1898).",
        "Cobb, G. W. (1978), Biometrika 65(2), 243-251; public domain "
        "(via statsmodels.datasets.nile).",
    ),
    "sunspots": (
        "sunspots.csv",
        "YEAR",
        "SUNACTIVITY",
        "sunspot number",
        "Yearly sunspot numbers, 1700-2008.",
        "NOAA National Geophysical Data Center; public domain (via statsmodels.datasets.sunspots).",
    ),
    "co2": (
        "co2.csv",
        "date",
        "co2",
        "ppm",
        "Weekly atmospheric CO2 at Mauna Loa, 1958-03-29 to 2001-12-29 (59 weeks missing). "
        "Time is in decimal years.",
        "Keeling, C. D. and Whorf, T. P. (2004), CDIAC, Oak Ridge National Laboratory; "
        "public domain (via statsmodels.datasets.co2).",
    ),
    "lynx": (
        "lynx.csv",
        "year",
        "lynx",
        "trappings per year",
        "Annual numbers of lynx trapped in the Mackenzie River district of Canada, "
        "1821-1934: counts with a strongly nonlinear cycle of about 10 years.",
        "Brockwell, P. J. and Davis, R. A. (1991), Time Series and Forecasting Methods, "
        "2nd ed., Springer, series G; after Elton and Nicholson (1942) (via R's datasets "
        "package).",
    ),
    "discoveries": (
        "discoveries.csv",
        "year",
        "discoveries",
        "discoveries per year",
        "Yearly numbers of great inventions and scientific discoveries, 1860-1959 (small counts).",
        "The World Almanac and Book of Facts, 1975 (via R's datasets package).",
    ),
}


def names() -> list[str]:
    """Names of the shipped datasets."""
    return sorted(_META)


def _decimal_year(yyyymmdd: str) -> float:
    import datetime

    d = datetime.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    start = datetime.date(d.year, 1, 1)
    days = (datetime.date(d.year + 1, 1, 1) - start).days
    return d.year + (d - start).days / days


def load(name: str) -> Dataset:
    """Load a shipped dataset by name (see :func:`names`)."""
    if name not in _META:
        raise ValueError(f"unknown dataset {name!r}; available: {names()}")
    fname, tcol, ycol, units, desc, source = _META[name]
    text = resources.files(__name__).joinpath(fname).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    raw_t = [r[tcol] for r in rows]
    t = np.array([_decimal_year(v) for v in raw_t] if name == "co2" else raw_t, dtype=float)
    y = np.array([float(r[ycol]) if r[ycol].strip() else np.nan for r in rows])
    return Dataset(name, t, y[:, None], units, desc, source)


def nile() -> Dataset:
    """Annual Nile flow at Aswan, 1871-1970 (T = 100)."""
    return load("nile")


def sunspots() -> Dataset:
    """Yearly sunspot numbers, 1700-2008 (T = 309)."""
    return load("sunspots")


def co2() -> Dataset:
    """Weekly Mauna Loa CO2, 1958-2001 (T = 2284, 59 missing)."""
    return load("co2")


def lynx() -> Dataset:
    """Annual Canadian lynx trappings, 1821-1934 (T = 114, counts)."""
    return load("lynx")


def discoveries() -> Dataset:
    """Yearly numbers of great discoveries, 1860-1959 (T = 100, counts)."""
    return load("discoveries")

"""Files as people have them: separators, header-less files, time columns (numbers, ISO
dates, year + month), sequence labels and simulated states, read by ``ppl_dyn.io``.

Expected values come from the file contents written here and NumPy's own calendar
(``datetime64``), not from the reader."""

import numpy as np
import pytest

from ppl_dyn.io import DataError, decimal_year, load_series

T = 24
RNG = np.random.default_rng(0)
A = np.round(RNG.normal(size=T), 4)
B = np.round(RNG.normal(size=T), 4)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def numpy_decimal_year(iso: str) -> float:
    day = np.datetime64(iso, "s")
    year = day.astype("datetime64[Y]")
    start, end = (
        year.astype("datetime64[s]"),
        (year + np.timedelta64(1, "Y")).astype("datetime64[s]"),
    )
    return int(str(year)) + float((day - start) / (end - start))


def test_a_file_without_header_keeps_its_first_row(tmp_path):
    path = write(tmp_path, "raw.csv", [f"{a},{b}" for a, b in zip(A, B, strict=True)])
    s = load_series(path)
    assert s.names == ("column1", "column2")
    np.testing.assert_array_equal(s.y, np.stack([A, B], -1))  # row 1 is data, not a header
    assert any("no header" in n for n in s.notes)


@pytest.mark.parametrize(
    "name, sep, fmt",
    [
        ("d.tsv", "\t", str),
        ("d.csv", ";", lambda v: str(v).replace(".", ",")),  # decimal comma
        ("d.csv", ";", str),
        ("d.txt", "   ", str),  # aligned columns
        ("d.txt", ",", str),
    ],
)
def test_separators(tmp_path, name, sep, fmt):
    rows = [sep.join(["t", "a", "b"])]
    rows += [sep.join([str(t), fmt(a), fmt(b)]) for t, (a, b) in enumerate(zip(A, B, strict=True))]
    s = load_series(write(tmp_path, name, rows))
    assert s.names == ("a", "b") and s.time_name == "t"
    np.testing.assert_array_equal(s.y, np.stack([A, B], -1))
    np.testing.assert_array_equal(s.time, np.arange(T))


def test_year_column_is_the_time_axis_not_data(tmp_path):
    rows = ["year,flow"] + [f"{1871 + t},{a}" for t, a in enumerate(A)]
    s = load_series(write(tmp_path, "nile.csv", rows))
    assert s.names == ("flow",) and s.time_name == "year"
    np.testing.assert_array_equal(s.time, 1871 + np.arange(T))
    np.testing.assert_array_equal(s.y[:, 0], A)


@pytest.mark.parametrize(
    "stamps",
    [
        [
            str(np.datetime64("2021-01-01") + np.timedelta64(7 * t, "D")) for t in range(T)
        ],  # weekly dates
        [
            f"{np.datetime64('2020-02-27T06:00') + np.timedelta64(36 * t, 'm')}" for t in range(T)
        ],  # date-times
        [
            f"{np.datetime64('2019-11-30T23:00') + np.timedelta64(5 * t, 'm')}Z" for t in range(T)
        ],  # UTC, 'Z'
    ],
)
def test_iso_dates_are_detected_and_read_as_decimal_years(tmp_path, stamps):
    rows = ["when,a"] + [f"{d},{a}" for d, a in zip(stamps, A, strict=True)]
    s = load_series(write(tmp_path, "dates.csv", rows))
    assert s.names == ("a",) and s.time_name == "when (decimal year)"
    expected = [numpy_decimal_year(d.rstrip("Z")) for d in stamps]
    np.testing.assert_allclose(s.time, expected, rtol=0, atol=1e-12)


def test_months_and_quarters_are_exact_fractions():
    assert decimal_year("2021-03") == 2021 + 2 / 12
    assert decimal_year("1999-12") == 1999 + 11 / 12
    assert decimal_year("2021Q3") == decimal_year("2021-Q3") == 2021.5
    for text in ("2021-13", "March 2021", "12.5", "", "2021-02-30"):
        assert decimal_year(text) is None, text


def test_time_column_given_as_iso_dates(tmp_path):
    months = [str(np.datetime64("2010-01") + np.timedelta64(t, "M")) for t in range(T)]
    rows = ["month_start,a,b"] + [f"{m},{a},{b}" for m, a, b in zip(months, A, B, strict=True)]
    s = load_series(write(tmp_path, "m.csv", rows), time_column="month_start")
    np.testing.assert_allclose(s.time, 2010 + np.arange(T) / 12, rtol=0, atol=1e-12)
    assert s.names == ("a", "b")


def test_year_and_month_columns_make_one_time_axis(tmp_path):
    rows = ["Year,Month,co2"] + [f"{1990 + t // 12},{t % 12 + 1},{a}" for t, a in enumerate(A)]
    s = load_series(write(tmp_path, "co2.csv", rows))
    assert s.names == ("co2",)
    np.testing.assert_allclose(s.time, 1990 + np.arange(T) / 12, rtol=0, atol=1e-12)


def test_time_labels_that_do_not_increase_are_not_fitted(tmp_path):
    rows = ["month,a"] + [f"{t % 12 + 1},{a}" for t, a in enumerate(A)]
    s = load_series(write(tmp_path, "cyc.csv", rows))
    assert s.names == ("a",)
    np.testing.assert_array_equal(s.time, np.arange(T))
    assert any("month" in n and "not fitted" in n for n in s.notes)
    # unless named
    s = load_series(write(tmp_path, "cyc.csv", rows), columns="month,a")
    assert s.names == ("month", "a")


def test_simulated_file_round_trip_fits_only_the_observations(tmp_path):
    """The layout ``ppl-dyn simulate`` writes: t, sequence, y*, latent_x*."""
    rows = ["t,sequence,y0,y1,latent_x0"]
    for seq in range(2):
        rows += [f"{t},{seq},{A[t] + seq},{B[t]},{9.0}" for t in range(T)]
    s = load_series(write(tmp_path, "sim.csv", rows))
    assert s.names == ("y0", "y1") and s.y.shape == (2, T, 2)
    np.testing.assert_array_equal(s.y[1, :, 0], A + 1)
    np.testing.assert_array_equal(s.time, np.arange(T))
    assert any("latent_x0" in n for n in s.notes)


@pytest.mark.parametrize(
    "rows, kwargs, problem",
    [
        (
            ["t,a"] + [f"{(t * 7) % T},{a}" for t, a in enumerate(A)],
            {"time_column": "t"},
            "do not increase",
        ),
        (
            ["t,a"] + [f"{t if t != 5 else ''},{a}" for t, a in enumerate(A)],
            {"time_column": "t"},
            "row 7, column 't': missing is not a time stamp",
        ),
        (
            ["d,a"]
            + [f"2020-01-{t + 1:02d},{a}" if t != 3 else f"soon,{a}" for t, a in enumerate(A)],
            {"time_column": "d"},
            "row 5, column 'd': 'soon'",
        ),
        (["a,b"] + [f"{a},x{b}" for a, b in zip(A, B, strict=True)], {}, "'x"),
    ],
)
def test_bad_time_and_cells_name_the_row(tmp_path, rows, kwargs, problem):
    with pytest.raises(DataError, match=problem.replace("(", r"\(")) as err:
        load_series(write(tmp_path, "bad.csv", rows), **kwargs)
    assert str(err.value).startswith(str(tmp_path / "bad.csv")) and "\n" not in str(err.value)

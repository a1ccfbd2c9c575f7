"""benchmarks/run_all.py builds its Markdown table correctly (synthetic rows, no benchmark
is run): speed-ups are anchor / ours, unknown values are shown as "—", targets are met or
not, and each script's JSON format converts to rows."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(table: str) -> list[list[str]]:
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | case | ours (s) | anchor | anchor (s)")
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[2:]]


def test_table_ratio_is_anchor_over_ours_and_missing_is_dash(run_all):
    rows = [
        dict(
            benchmark="EM",
            case="a",
            ours_s=0.5,
            anchor="dynamax",
            anchor_s=2.0,
            ratio=None,
            target=1.0,
        ),
        dict(
            benchmark="EM",
            case="b",
            ours_s=4.0,
            anchor="pykalman",
            anchor_s=1.0,
            ratio=99.0,
            target=2.0,
        ),  # a stale ratio is recomputed from the times
        dict(
            benchmark="EM",
            case="c",
            ours_s=0.25,
            anchor="pykalman",
            anchor_s=None,
            ratio=None,
            target=50.0,
        ),
        dict(
            benchmark="EM",
            case="d",
            ours_s=None,
            anchor=None,
            anchor_s=None,
            ratio=None,
            target=None,
            note="timed out after 10 s",
        ),
        dict(
            benchmark="NUTS",
            case="e",
            ours_s=None,
            anchor="latent",
            anchor_s=None,
            ratio=3.0,
            target=None,
        ),  # only a ratio is known
    ]
    cells = _cells(run_all.build_table(rows))
    assert len(cells) == 5 and all(len(c) == 8 for c in cells)
    a, b, c, d, e = cells
    assert a == ["EM", "a", "0.5", "dynamax", "2", "4×", "≥ 1×", "yes"]
    assert b[5] == "0.25×" and b[6] == "≥ 2×" and b[7] == "no"
    assert c[2] == "0.25" and c[3] == "pykalman" and c[4:] == ["—", "—", "≥ 50×", "—"]
    assert d[1] == "d (timed out after 10 s)" and d[2:] == ["—"] * 6
    assert e[5] == "3×" and e[6:] == ["—", "—"]


def test_make_row_speedup_and_number_formats(run_all):
    row = run_all.make_row("x", "y", 0.004, "anchor", 0.6, target=100.0)
    assert row["ratio"] == pytest.approx(150.0)
    assert set(row) == {"benchmark", "case", "ours_s", "anchor", "anchor_s", "ratio", "target"}
    assert run_all.make_row("x", "y", 0.0, "a", 1.0)["ratio"] is None
    assert run_all.make_row("x", "y", float("nan"), "a", 1.0)["ratio"] is None
    table = run_all.build_table([run_all.make_row("x", "y", 123.4, "a", 0.001234)])
    assert "| 123 | a | 0.00123 | 1e-05× |" in table


def test_converters_read_each_scripts_json(run_all):
    lds = {
        "settings": {"fit_iters": 100},
        "results": [
            {
                "name": "T1000",
                "ours": {"per_iter_s": 0.004, "fit_s": 8.0},
                "dynamax": {"per_iter_s": 0.006, "fit_s": 4.0, "model": "LinearGaussianSSM"},
                "pykalman": {"per_iter_s": 0.64},
            },
            {
                "name": "batch",
                "ours": {"per_iter_s": 0.07, "fit_s": 30.0},
                "dynamax": {"per_iter_s": 0.035, "fit_s": 12.0},
                "pykalman": None,
            },
            {"name": "hung", "hung": True},
        ],
    }
    rows = run_all.rows_lds_em(lds)
    assert [r["ratio"] for r in rows[:3]] == pytest.approx([1.5, 160.0, 0.5])
    assert rows[4]["anchor"] == "pykalman" and rows[4]["anchor_s"] is None
    assert rows[-1]["ours_s"] is None and "hung" in rows[-1]["note"]

    particle = {
        "config": {"T": 1000, "compare_n": 1000},
        "ours": [{"dtype": "float64", "dx": 2, "N": 1000, "median_s": 3.0}],
        "particles": [{"dx": 2, "N": 1000, "total_s": 90.0}],
        "bound": [
            {"dtype": "float32", "dx": 2, "N": 4000, "T": 1000, "ours_s": 30.0, "sum_s": 10.0}
        ],
    }
    rows = run_all.rows_particle_smoother(particle)
    assert [r["ratio"] for r in rows] == pytest.approx([30.0, 1 / 3])
    assert rows[0]["target"] == 100.0

    eks = {
        "meta": {"num_particles": 100},
        "rows": [{"T": 1000, "I": 11, "dx": 1, "eks_s": 0.01, "particle_s": 0.15}],
    }
    (row,) = run_all.rows_eks_rbf(eks)
    assert row["ratio"] == pytest.approx(15.0) and row["target"] is None

    def case(ess_per_s, wall_s):
        return {"ess_per_s_params": ess_per_s, "wall_s": wall_s}

    nuts = {
        "results": {
            "latent/numpyro/T=1000": case(0.1, 100.0),
            "marginal/numpyro/T=1000": case(2.0, 50.0),
            "latent/blackjax/T=1000": case(0.2, 80.0),
            "marginal/blackjax/T=1000": case(4.0, 40.0),
            "dynamax/blackjax/T=1000": {"error": "Traceback ...\nboom"},
            "marginal/blackjax/T=1000/4 chains/init=em": case(1.0, 10.0),
        }
    }
    rows = run_all.rows_nuts(nuts)
    assert len(rows) == 5
    npy = next(r for r in rows if "numpyro: s per effective draw" in r["case"])
    assert npy["ratio"] == pytest.approx(20.0) and npy["target"] == 5.0
    dyn = next(r for r in rows if r["anchor"].startswith("dynamax"))
    assert dyn["anchor_s"] is None and dyn["note"] == "no result"
    wall = next(r for r in rows if "marginal: wall time" in r["case"])
    assert wall["ratio"] == pytest.approx(50.0 / 40.0)
    assert all(r["case"].startswith("T=1000") for r in rows)  # the init rows are not timings


def test_render_lists_each_script_status(run_all):
    text = run_all.render(
        [run_all.make_row("nuts", "all cases", None, None, None, note="failed (exit code 1)")],
        {"nuts": "failed (exit code 1)"},
        quick=True,
    )
    assert "all cases (failed (exit code 1))" in text
    assert "`nuts` failed (exit code 1)" in text and "--quick" in text
    assert "`lds_em` not run" in text


def test_keep_rows_replaces_rebuilt_benchmarks_in_place_and_keeps_the_rest(run_all):
    old = run_all.render(
        [
            run_all.make_row("A", "a1", 1.0, "x", 2.0),
            run_all.make_row("B", "b1", 1.0, "y", 3.0),
            run_all.make_row("B", "b2", 1.0, "y", 4.0),
            run_all.make_row("C", "c1", 1.0, "z", 5.0),
        ],
        {"lds_em": "from old.json", "nuts": "from nuts.json"},
        quick=False,
    )
    new_rows = [
        run_all.make_row("B", "b-new", 2.0, "y", 8.0),
        run_all.make_row("D", "d1", 1.0, "w", 1.0),
    ]
    text = run_all.render(new_rows, {"lds_em": "from new.json"}, quick=False, keep_text=old)
    body = [
        ln.split("|")[2].strip()
        for ln in text.splitlines()
        if ln.startswith("| ") and not ln.startswith("| benchmark")
    ]
    assert body == ["a1", "b-new", "c1", "d1"]  # B replaced where it was, D appended
    assert "4×" in text  # the new B row's ratio, 8 / 2
    status = run_all.kept_status(old)
    assert status == {"lds_em": "from old.json", "nuts": "from nuts.json"}


def test_run_script_ok_failed_and_timed_out(run_all, tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "mode = open(out + '.mode').read()\n"
        "if mode == 'fail':\n    sys.exit(3)\n"
        "if mode == 'hang':\n    time.sleep(60)\n"
        "json.dump({'quick': '--quick' in sys.argv}, open(out, 'w'))\n"
    )
    out = tmp_path / "r.json"
    for mode, timeout, expected in (
        ("ok", 60.0, "ok"),
        ("fail", 60.0, "failed (exit code 3)"),
        ("hang", 2.0, "timed out after 2 s"),
    ):
        (tmp_path / "r.json.mode").write_text(mode)
        out.unlink(missing_ok=True)
        assert run_all.run_script(str(script), str(out), True, timeout) == expected
        if mode == "ok":
            assert out.read_text() == '{"quick": true}'


def test_smoothers_rows_compare_each_linear_method_with_ffbsm_at_equal_error(run_all):
    data = {
        "T": 1000,
        "dx": 2,
        "device": "TFRT_CPU_0",
        "target": {
            "ffbsm": {"N": 10000, "seconds": 300.0, "mse": 1e-5, "extrapolated": True},
            "paris": {"N_star": 20000.0, "seconds": 3.0, "speedup": 100.0},
            "ffbsi-mcmc": {"N_star": 15000.0, "seconds": 30.0, "speedup": 10.0},
        },
    }
    rows = run_all.rows_smoothers(data)
    assert [r["ratio"] for r in rows] == [100.0, 10.0]
    cells = _cells(run_all.build_table(rows))
    assert [c[-1] for c in cells] == ["yes", "no"]  # target >= 20x
    assert all("extrapolated" in c[1] and "CPU" in c[1] for c in cells)
    assert run_all.rows_smoothers({"target": {}}) == []

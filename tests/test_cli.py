"""The `ppl-dyn` command line: demo, simulate, fit (every model), bad inputs, staging.

Fits run in-process (``cli.main``) at tiny sizes so that JAX compiles once per model;
the demo runs as a subprocess, as a user would start it.
"""

import json
import math
import os
import subprocess
import sys

import arviz as az
import numpy as np
import pytest

from ppl_dyn import cli, workflows

FIT_FILES = (
    "metrics.json",
    "params.npz",
    "idata.nc",
    "data.png",
    "fit.png",
    "states.png",
    "forecast.png",
    "report.html",
)
PNG = b"\x89PNG\r\n\x1a\n"


def _finite_numbers(obj):
    """Every number in a JSON tree (None allowed only where a value is undefined)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _finite_numbers(x)]
    return [v for x in obj for v in _finite_numbers(x)]


def test_demo_writes_metrics_figure_idata_and_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppl_dyn.cli",
            "demo",
            "--out",
            str(out),
            "--num-steps",
            "60",
            "--num-sequences",
            "2",
            "--num-iters",
            "15",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["em_monotone"] is True
    assert len(metrics["log_marginals"]) == metrics["em_iterations"]
    # EM started from a prior draw must end near (or above) the truth's likelihood
    assert metrics["log_marginal_fitted"] > metrics["log_marginals"][0]
    png = (out / "demo.png").read_bytes()
    assert png[:8] == PNG and len(png) > 10_000
    assert set(json.loads((out / "params.json").read_text())) >= {"A", "C", "Q", "R"}
    with np.load(out / "params.npz") as z:
        assert z["A"].shape == (2, 2) and z["C"].shape == (3, 2)
    idata = az.from_netcdf(str(out / "idata.nc"))
    assert {"posterior", "observed_data", "log_likelihood"} <= set(idata.groups())
    assert "demo.png" in (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in proc.stdout
    assert not list(tmp_path.glob(".demo.*")), "staging directories left behind"


def test_demo_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppl_dyn.cli",
            "demo",
            "--out",
            str(tmp_path / "x"),
            "--num-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--num-steps" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------
# simulate + fit
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """An LDS (prior-drawn parameters, seed 3) as CSV and NPZ: T = 50, 2 outputs."""
    d = tmp_path_factory.mktemp("sim")
    for ext in ("csv", "npz"):
        rc = cli.main(
            [
                "simulate",
                "--model",
                "lds",
                "--state-dim",
                "2",
                "--obs-dim",
                "2",
                "--num-steps",
                "50",
                "--seed",
                "3",
                "--out",
                str(d / f"sim.{ext}"),
            ]
        )
        assert rc == 0
    return d


def test_simulate_writes_csv_and_npz_with_true_parameters(simulated):
    header = (simulated / "sim.csv").read_text().splitlines()[0]
    assert header == "t,y0,y1,latent_x0,latent_x1"
    with np.load(simulated / "sim.npz") as z:
        assert z["y"].shape == (50, 2) and z["x"].shape == (50, 2)
        assert z["param_A"].shape == (2, 2) and z["param_R"].shape == (2, 2)
        y_npz = z["y"]
    y_csv = np.loadtxt(simulated / "sim.csv", delimiter=",", skiprows=1)[:, 1:3]
    np.testing.assert_allclose(y_csv, y_npz)  # same seed, same draw, both formats


def _fit(tmp_path, simulated, *extra, name="run", data="sim.csv"):
    out = tmp_path / name
    argv = [
        "fit",
        "--data",
        str(simulated / data),
        "--out",
        str(out),
        "--quiet",
        "--num-iters",
        "4",
        "--forecast-steps",
        "5",
        *extra,
    ]
    assert cli.main(argv) == 0
    for f in FIT_FILES:
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(f".{name}.*")), "staging directories left behind"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in _finite_numbers(metrics))
    # simulate's file read as meant with no flags: time axis t, the states not fitted
    assert metrics["columns"] == ["y0", "y1"]
    if data.endswith(".csv"):
        assert metrics["time_axis"] == "t"
        assert metrics["data_notes"] == [
            "time axis from column 't'",
            "simulated states latent_x0, latent_x1 not fitted",
        ]
    for f in ("data.png", "fit.png", "states.png", "forecast.png"):
        assert (out / f).read_bytes()[:8] == PNG
    return out, metrics


def test_fit_lds_em_improves_on_its_start_and_writes_everything(tmp_path, simulated, capsys):
    out, m = _fit(tmp_path, simulated, "--model", "lds", "--state-dim", "2", "--num-iters", "8")
    printed = capsys.readouterr().out
    assert "report:" in printed
    assert printed.strip().splitlines()[-1].startswith("verdict: fit OK (EM, log p(y)")
    assert m["verdict"]["ok"] is True and m["verdict"]["reasons"] == []
    params = json.loads((out / "params.json").read_text())  # as the demo writes it
    assert set(params) >= {"A", "C", "Q", "R"} and np.shape(params["A"]) == (2, 2)
    assert (m["model"], m["method"], m["e_step"]) == ("lds", "em", "kalman")
    assert (m["num_steps"], m["obs_dim"], m["state_dim"]) == (50, 2, 2)
    # MAP-EM by default (the models' priors): with the exact E-step the log posterior
    # never decreases, and the fit beats its starting values
    assert m["objective"] == "map" and m["em_monotone"] is True
    assert m["objective_final"] > m["objective_initial"]
    assert m["log_marginal_final"] > m["log_marginal_initial"]
    assert m["log_marginal_final"] >= m["log_marginals"][-1] - 1e-8
    assert len(m["log_marginals"]) == m["em_iterations"] <= 8
    # standardised data: the recorded mean and scale are the columns' moments
    y = np.loadtxt(simulated / "sim.csv", delimiter=",", skiprows=1)[:, 1:3]
    np.testing.assert_allclose(m["data_mean"], y.mean(0))
    np.testing.assert_allclose(m["data_scale"], y.std(0))
    assert m["standardized"] is True and all(s > 0 for s in m["data_scale"])
    assert 0.5 <= m["posterior_predictive_coverage"] <= 1.0
    assert (out / "em_curve.png").is_file()
    with np.load(out / "params.npz") as z:
        assert {k: z[k].shape for k in ("A", "C", "Q", "R")} == {
            "A": (2, 2),
            "C": (2, 2),
            "Q": (2, 2),
            "R": (2, 2),
        }
        assert np.all(np.linalg.eigvalsh(z["Q"]) > 0)
    idata = az.from_netcdf(str(out / "idata.nc"))
    assert {"posterior", "observed_data", "log_likelihood", "predictions", "sample_stats"} <= set(
        idata.groups()
    )
    assert idata.predictions["y"].shape[-2:] == (5, 2)
    ll = idata.log_likelihood["y"].values.sum()  # one-step-ahead terms sum to log p(y)
    assert ll == pytest.approx(m["log_marginal_final"], rel=1e-8)


@pytest.mark.parametrize(
    "model, state_dim, e_step",
    [
        ("tanh-rnn", 2, "eks"),
        ("rbf", 1, "eks"),
    ],
)
def test_fit_nonlinear_models_em(tmp_path, simulated, model, state_dim, e_step):
    out, m = _fit(
        tmp_path,
        simulated,
        "--model",
        model,
        "--state-dim",
        str(state_dim),
        "--num-iters",
        "3",
        data="sim.npz",
    )
    assert (m["model"], m["e_step"]) == (model, e_step)
    assert m["columns"] == ["y0", "y1"]
    assert m["log_marginal_final"] > m["log_marginal_initial"]
    with np.load(out / "params.npz") as z:
        if model == "rbf":  # centres and widths are saved with the weights
            assert z["A"].shape == (1, z["centres"].shape[0] + 1)
            assert z["widths"].shape == (z["centres"].shape[0],)
        else:
            assert z["A"].shape == (2, 2)


@pytest.mark.slow
def test_fit_tanh_rnn_particle_em(tmp_path, simulated):
    _, m = _fit(
        tmp_path,
        simulated,
        "--model",
        "tanh-rnn",
        "--state-dim",
        "2",
        "--e-step",
        "particle",
        "--num-particles",
        "50",
        "--num-iters",
        "3",
    )
    assert m["e_step"] == "particle"


@pytest.mark.slow
def test_fit_nuts_on_shipped_dataset(tmp_path):
    out = tmp_path / "nuts"
    rc = cli.main(
        [
            "fit",
            "--dataset",
            "nile",
            "--model",
            "lds",
            "--method",
            "nuts",
            "--state-dim",
            "1",
            "--num-iters",
            "10",
            "--num-warmup",
            "40",
            "--num-samples",
            "40",
            "--num-chains",
            "2",
            "--forecast-steps",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    m = json.loads((out / "metrics.json").read_text())
    # 2 chains of 40 draws: the diagnostics decide, and the exit status follows them
    assert rc == (0 if m["verdict"]["ok"] else cli.FIT_FAILED)
    assert m["data"] == "dataset:nile" and m["method"] == "nuts"
    assert m["num_divergent"] >= 0 and (out / "trace.png").is_file()
    html = (out / "report.html").read_text()
    assert "r_hat" in html and "divergent transitions" in html


@pytest.mark.slow
def test_fit_lds_sgd(tmp_path, simulated):
    out, m = _fit(
        tmp_path,
        simulated,
        "--model",
        "lds",
        "--state-dim",
        "2",
        "--method",
        "sgd",
        "--num-iters",
        "5",
        "--learning-rate",
        "0.01",
        data="sim.npz",
    )
    assert (m["method"], m["sgd_steps"]) == ("sgd", 5)
    assert (out / "sgd_curve.png").is_file()
    # Adam with a small step from the factor-analysis start: the log posterior (the
    # default objective) goes up; log p(y) alone at the start is not recorded for SGD
    assert m["objective"] == "map" and m["log_marginal_initial"] is None
    assert m["objective_final"] > m["objective_initial"]


def test_a_fit_that_fails_says_so_and_exits_3(tmp_path, capsys):
    """Adam with a step size far too large for the data: every step lowers log p(y).
    SGD returns its best iterate (the start), and the CLI says the fit failed, in one
    line at the end, in metrics.json and on the report's first line, with status 3."""
    out = tmp_path / "sgd"
    rc = cli.main(
        [
            "fit",
            "--dataset",
            "nile",
            "--model",
            "lds",
            "--state-dim",
            "1",
            "--method",
            "sgd",
            "--num-iters",
            "6",
            "--learning-rate",
            "3",
            "--forecast-steps",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == cli.FIT_FAILED == 3
    assert printed[-1].startswith("verdict: FIT FAILED: SGD never improved")
    m = json.loads((out / "metrics.json").read_text())
    assert m["verdict"]["ok"] is False and m["best_step"] == 0
    # it returns its start: the objective (log posterior by default) is the first one
    assert m["objective"] == "map" and m["log_marginal_initial"] is None
    assert m["objective_final"] == m["objective_initial"] == m["log_marginals"][0]
    html = (out / "report.html").read_text()
    assert html.index("verdict: FIT FAILED") < html.index("Run directory")


@pytest.mark.slow
def test_a_non_mixing_nuts_run_exits_3_with_the_verdict(tmp_path, capsys):
    """Five warm-up steps and ten draws per chain cannot mix: the verdict names the
    failed diagnostics and the status is 3."""
    out = tmp_path / "nuts"
    rc = cli.main(["fit", "--dataset", "nile", "--model", "lds", "--method", "nuts",
                   "--state-dim", "1", "--num-iters", "3", "--num-warmup", "5",
                   "--num-samples", "10", "--num-chains", "2", "--forecast-steps", "2",
                   "--out", str(out), "--quiet", "--no-report"])  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 3 and last.startswith("verdict: FIT FAILED:")
    assert "ESS" in last or "R-hat" in last


def test_verdict_of_non_finite_outputs_and_nuts_diagnostics():
    ok = cli.fit_verdict(
        {
            "method": "em",
            "log_marginal_initial": -10.0,
            "log_marginal_final": -5.0,
            "data_scale": [1.0],
        }
    )
    assert ok["ok"] and ok["line"].startswith("verdict: fit OK")
    bad = cli.fit_verdict(
        {
            "method": "em",
            "log_marginal_initial": -10.0,
            "log_marginal_final": -5.0,
            "data_scale": [None],
        }
    )
    assert not bad["ok"] and "data_scale is not finite" in bad["line"]
    worse = cli.fit_verdict(
        {"method": "em", "log_marginal_initial": -10.0, "log_marginal_final": -50.0}
    )
    assert not worse["ok"] and "ended below its start" in worse["line"]
    nuts = cli.fit_verdict({"method": "nuts", "log_marginal_final": -5.0, "diagnostic_problems": [
        "R-hat of A is 1.100 (should be < 1.01): ...", "3 transitions hit the maximum tree "
        "depth (10): ..."]})  # fmt: skip
    assert not nuts["ok"] and "R-hat of A is 1.100" in nuts["line"]
    assert "tree depth" not in nuts["line"]  # inefficiency, not failure


def test_fit_sgd_refuses_a_particle_e_step(tmp_path, simulated, capsys):
    rc = cli.main(
        [
            "fit",
            "--method",
            "sgd",
            "--e-step",
            "particle",
            "--model",
            "tanh-rnn",
            "--data",
            str(simulated / "sim.npz"),
            "--out",
            str(tmp_path / "sgd"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "particle" in err
    assert not (tmp_path / "sgd").exists()


# --------------------------------------------------------------------------------------
# bad inputs: one line naming the file, exit 2, nothing written
# --------------------------------------------------------------------------------------

GOOD_ROWS = "\n".join(f"{t},{np.sin(t / 3):.4f},{np.cos(t / 5):.4f}" for t in range(30))


T_COL = ["--time-column", "t"]


@pytest.mark.parametrize(
    "name, content, flags, problem",
    [
        ("missing.csv", None, [], "no such file"),
        ("cols.csv", "t,a,b\n" + GOOD_ROWS, T_COL + ["--columns", "a,zz"], "no column 'zz'"),
        ("time.csv", "t,a,b\n" + GOOD_ROWS, ["--time-column", "time"], "no column 'time'"),
        (
            "text.csv",
            "t,a,b\n" + GOOD_ROWS.replace("0.3272", "abc", 1),
            T_COL,
            "row 3, column 'a': 'abc' is not a number",
        ),
        ("short.csv", "t,a,b\n" + "\n".join(GOOD_ROWS.splitlines()[:5]), T_COL, "too short"),
        (
            "nan.csv",
            "t,a,b\n" + "\n".join(f"{t},nan,1.{t}" for t in range(30)),
            T_COL,
            "column 'a' has no observed values",
        ),
        ("inf.csv", "t,a,b\n" + GOOD_ROWS.replace("0.3272", "inf", 1), T_COL, "infinite"),
        ("ragged.csv", "t,a,b\n" + GOOD_ROWS + "\n99,1.0", T_COL, "fields"),
        ("empty.csv", "", [], "empty"),
        ("const.csv", "t,a\n" + "\n".join(f"{t},2.5" for t in range(30)), T_COL, "constant"),
        ("data.xlsx", "1,2\n", [], "unknown file type"),
        ("bad.npz", "this is not a zip archive", [], "not a readable NPZ"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, name, content, flags, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    rc = cli.main(["fit", "--data", str(path), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and problem in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ([name] if content is not None else [])


def test_bad_npz_column_and_shape(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, y=np.ones((20, 2)), s=np.array(["a"] * 20), t=np.arange(19.0))
    for flags, problem in (
        (["--columns", "q"], "no array 'q'"),
        (["--columns", "s"], "not numeric"),
        (["--time-column", "t"], "must be numeric of shape (20,)"),
    ):
        rc = cli.main(["fit", "--data", str(path), "--out", str(tmp_path / "o"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and str(path) in err and problem in err, err
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_not_a_run_is_refused(tmp_path, simulated, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = cli.main(["fit", "--data", str(simulated / "sim.npz"), "--out", str(out)])
    assert rc == 2 and "not a ppl-dyn run directory" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_failure_during_fit_leaves_nothing(tmp_path, simulated, monkeypatch, capsys):
    def boom(args, series, units, yz, mean, scale, out, phases):
        (out / "metrics.json").write_text("{}")
        raise FloatingPointError("EM diverged")

    monkeypatch.setattr(workflows, "_fit_into", boom)
    out = tmp_path / "deep" / "run"
    rc = cli.main(["fit", "--data", str(simulated / "sim.npz"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "EM diverged" in err
    assert list(tmp_path.iterdir()) == []  # neither the run nor the parent it created


def test_unwritable_out_and_ctrl_c_end_in_one_line(tmp_path, simulated, monkeypatch, capsys):
    data = ["fit", "--data", str(simulated / "sim.npz"), "--quiet", "--no-report"]
    assert cli.main([*data, "--out", "/proc/ppl-dyn-test/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write /proc/ppl-dyn-test" in err[0]
    assert cli.main([*data, "--out", str(simulated / "sim.npz" / "run")]) == 2
    assert "is not a directory" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "_fit_into", interrupted)
    out = tmp_path / "run"
    assert cli.main([*data, "--out", str(out)]) == cli.INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ppl-dyn fit: interrupted; nothing written"]
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_staging_folders_of_killed_runs_are_removed(tmp_path, simulated, monkeypatch):
    (tmp_path / ".run.tmp-999999999-abc").mkdir()  # a run killed with SIGKILL
    (tmp_path / ".run.old-999999999-def").mkdir()
    live = tmp_path / f".run.tmp-{os.getppid()}-xyz"  # a live process's: kept
    live.mkdir()

    def ok(args, series, units, yz, mean, scale, d, phases):
        (d / "metrics.json").write_text('{"model": "lds"}')
        return {"model": "lds"}

    monkeypatch.setattr(workflows, "_fit_into", ok)
    out = tmp_path / "run"
    assert cli.main(["fit", "--data", str(simulated / "sim.npz"), "--out", str(out),
                     "--no-report"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", live.name])


def test_fit_replaces_an_earlier_run_only_when_complete(tmp_path, simulated, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')

    def ok(args, series, units, yz, mean, scale, d, phases):
        (d / "metrics.json").write_text('{"model": "lds", "new": true}')
        return {"model": "lds"}

    monkeypatch.setattr(workflows, "_fit_into", ok)
    assert (
        cli.main(["fit", "--data", str(simulated / "sim.npz"), "--out", str(out), "--no-report"])
        == 0
    )
    assert json.loads((out / "metrics.json").read_text()) == {"model": "lds", "new": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_report_of_a_non_run_directory_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "not a ppl-dyn run directory" in err
    assert not (tmp_path / "report.html").exists()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bench_dispatches_to_the_checkout_runner(capfd):
    # an unknown script name is rejected by benchmarks/run_all.py itself (exit 2, listing
    # the scripts): proves the subcommand found and ran the checkout's runner
    from ppl_dyn.cli import main

    rc = main(["bench", "--only", "no-such-benchmark"])
    assert rc == 2
    err = capfd.readouterr().err
    assert "unknown benchmark" in err and "lds_em" in err, err


def test_an_error_exit_does_not_import_jax(tmp_path):
    """The command line parses and checks its input before it imports JAX: a bad
    argument ends at once (the time is printed, not asserted)."""
    import subprocess
    import sys
    import time

    code = ("import sys; from ppl_dyn import cli; "
            "rc = cli.main(['fit', '--data', '/nonexistent.csv', '--out', sys.argv[1]]); "
            "print(rc, 'jax' in sys.modules, 'numpyro' in sys.modules)")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    wall = time.perf_counter() - t0
    print(f"\nCLI error exit in a fresh process: {wall:.2f} s")
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "no such file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_commands_share_a_persistent_compilation_cache(tmp_path):
    """A second command of the same size loads its compiled programs from the cache
    (``PPL_DYN_CACHE_DIR``) and draws the same numbers; ``off`` writes nothing. The
    wall times are printed, not asserted."""
    import os
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"

    def simulate(name, where):
        env = {**os.environ, "PPL_DYN_CACHE_DIR": where}
        argv = ["simulate", "--num-steps", "30", "--seed", "4", "--out", str(tmp_path / name)]
        code = f"import sys; from ppl_dyn import cli; sys.exit(cli.main({argv!r}))"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return time.perf_counter() - t0, (tmp_path / name).read_text()

    cold, first = simulate("a.csv", str(cache))
    entries = sorted(p.name for p in cache.iterdir())
    assert any(e.startswith("jit_draw") for e in entries), entries  # the model's draw
    warm, second = simulate("b.csv", str(cache))
    assert sorted(p.name for p in cache.iterdir()) == entries  # loaded, nothing recompiled
    assert second == first
    off = tmp_path / "off"
    _, third = simulate("c.csv", "off")
    assert third == first and not off.exists()
    print(f"\nsimulate in a fresh process: {cold:.2f} s cold cache, {warm:.2f} s warm")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PPL_DYN_CACHE_DIR", str(tmp_path / "c"))
    assert cli.cache_dir() == tmp_path / "c"
    for off in ("off", "", "0"):
        monkeypatch.setenv("PPL_DYN_CACHE_DIR", off)
        assert cli.cache_dir() is None
    monkeypatch.delenv("PPL_DYN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.cache_dir() == tmp_path / "xdg" / "ppl_dyn" / "xla"


def test_fit_objective_ml_is_plain_likelihood_em(tmp_path, simulated):
    _, m = _fit(tmp_path, simulated, "--model", "lds", "--objective", "ml", name="ml")
    assert m["objective"] == "ml" and m["em_monotone"] is True
    # the objective is log p(y) itself: its first value is the first log-marginal
    assert m["objective_initial"] == m["log_marginals"][0]
    assert m["objective_final"] == m["log_marginals"][-1]


def test_backtest_fits_the_head_and_scores_the_held_out_tail(tmp_path, capsys):
    from ppl_dyn import datasets

    out = tmp_path / "bt"
    argv = ["backtest", "--dataset", "nile", "--state-dim", "1", "--holdout", "15",
            "--horizons", "3,1", "--num-iters", "20", "--num-paths", "200", "--out",
            str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fitted on the first 85 steps, 15 held out" in printed and "| 3 |" in printed
    r = json.loads((out / "backtest.json").read_text())
    assert (r["filter"], r["objective"], r["horizons"]) == ("kalman", "map", [1, 3])
    assert (out / "backtest.png").read_bytes()[:8] == PNG and (out / "backtest.md").is_file()
    # every held-out target reachable from an origin at or after the fitted span's end
    assert r["scores"]["1"]["n"] == 15 and r["scores"]["3"]["n"] == 13
    # the naive forecast's scores, recomputed from the data
    y = np.asarray(datasets.load("nile").y, float).reshape(-1)
    for k in (1, 3):
        err = y[84 : 100 - k] - y[84 + k :]
        np.testing.assert_allclose(r["naive"][str(k)]["rmse"], np.sqrt(np.mean(err**2)))
        s = r["scores"][str(k)]
        assert 0 <= s["coverage"] <= 1 and s["crps"] > 0 and s["mae_median"] > 0


def test_backtest_refuses_a_holdout_that_leaves_too_little(tmp_path, capsys):
    rc = cli.main(["backtest", "--dataset", "nile", "--holdout", "95", "--out",
                   str(tmp_path / "bt")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--holdout must be in [1, 90]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bt").exists()


@pytest.mark.parametrize("value", ["0", "-1", "big"])
def test_a_bad_spectral_radius_bound_is_a_usage_error(tmp_path, capsys, value):
    rc = cli.main(["fit", "--dataset", "nile", "--max-spectral-radius", value, "--out",
                   str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--max-spectral-radius must be > 0" in err and len(err.splitlines()) == 1

"""EM with the sequence axis, or the particle axis of one sequence, sharded over a Mesh
equals EM on one device.

The 8 devices are CPU devices made by ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
which must be set before JAX initialises: the checks run in a subprocess. The sequence
counts (13) are not multiples of 8, so the sharded runs also pad with length-0 sequences.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    import ppl_dyn
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.infer.em import shard_sequences
    from ppl_dyn.infer._run import pad_to_multiple
    from ppl_dyn.models import lds

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=30, num_sequences=13,
                           state_dim=2, obs_dim=2)
    y = np.array(sim["y"])
    y[3, 7, 1] = np.nan  # a missing entry inside a sequence
    lengths = np.random.default_rng(0).integers(1, 31, size=13)
    start = {k: np.asarray(v) * (1.1 if k == "A" else 1.0) for k, v in sim["params"].items()}
    out = {}
    for name, data in (("complete", dict(y=y)),
                       ("ragged", dict(y=[y[s, :n] for s, n in enumerate(lengths)]))):
        runs = {}
        for where, m in (("one", None), ("mesh", mesh)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = EM(lds, KalmanSmoother()).run(
                    jax.random.key(1), 3, init_params=start, state_dim=2,
                    progress_bar=False, mesh=m, **data)
            runs[where] = res
        a, b = runs["one"], runs["mesh"]
        out[name] = {
            "lls": [a.log_marginals.tolist(), b.log_marginals.tolist()],
            "max_param_diff": max(float(np.max(np.abs(np.asarray(a.params[k])
                                                      - np.asarray(b.params[k]))))
                                  for k in a.params),
            "param_scale": max(float(np.max(np.abs(np.asarray(v)))) for v in a.params.values()),
        }
    # where the data went: 13 sequences padded to 16, two per device
    kwargs, mask = pad_to_multiple({"y": y}, None, 8)
    _, dyn, (m,) = shard_sequences(mesh, start, kwargs, (mask,))
    out["shards"] = sorted({tuple(s.data.shape) for s in dyn["y"].addressable_shards})
    out["mask_shards"] = sorted({tuple(s.data.shape) for s in m.addressable_shards})
    out["devices"] = len(dyn["y"].sharding.device_set)
    out["padded_mask_rows"] = int((~mask).all(1).sum())
    print("RESULT" + json.dumps(out))
    """
)


def _run_on_8_cpu_devices(script: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_sharded_em_equals_unsharded_em_on_8_cpu_devices():
    out = _run_on_8_cpu_devices(SCRIPT)
    assert out["devices"] == 8
    assert out["shards"] == [[2, 30, 2]] and out["mask_shards"] == [[2, 30]]
    assert out["padded_mask_rows"] == 3
    for name in ("complete", "ragged"):
        one, mesh = out[name]["lls"]
        assert len(one) == 3
        for a, b in zip(one, mesh, strict=True):
            assert abs(a - b) <= 1e-9 * abs(a), (name, one, mesh)
        assert one[-1] > one[0]  # EM made progress (exact E-step: monotone)
        assert out[name]["max_param_diff"] <= 1e-9 * out[name]["param_scale"], out[name]


# --------------------------------------------------------------------------------------
# the particle axis of one long sequence split over a Mesh (ParticleSmoother.particle_mesh)
# --------------------------------------------------------------------------------------

PARTICLE_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    import ppl_dyn
    from ppl_dyn.infer import EM, ParticleSmoother
    from ppl_dyn.infer._compile import jit_model
    from ppl_dyn.infer.particle import particle_linear_statistics
    from ppl_dyn.models import lds
    from ppl_dyn.state_space import bind

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("particles",))
    sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50, state_dim=2, obs_dim=2)
    y = np.array(sim["y"])
    y[7, 1] = np.nan  # a missing entry
    start = {k: np.asarray(v) * (1.1 if k == "A" else 1.0) for k, v in sim["params"].items()}

    def e_step(mesh):
        # chunk_size 16: four FFBSm chunks per step, each with its 64 columns split
        return ParticleSmoother(64, chunk_size=16, particle_mesh=mesh)

    def posterior_and_stats(mesh):
        def run(params, y, key):
            ss, spec = bind(lds, params, y=y, state_dim=2)
            post = e_step(mesh).posterior(key, ss, spec.y, spec.u)
            stats = particle_linear_statistics(post, ss, spec.y, spec.u)
            return post.log_marginal[0], post.means[0], jax.tree.leaves(stats)
        return jit_model(run).lower(start, y, jax.random.key(1)).compile()

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(s) - np.asarray(t)))) for s, t in zip(a, b))

    out, runs = {}, {}
    for where, m in (("one", None), ("mesh", mesh)):
        compiled = posterior_and_stats(m)
        hlo = compiled.as_text()
        out["collectives_" + where] = {
            c: hlo.count(f" {c}(") + hlo.count(f" {c}-start(") for c in ("all-gather", "all-reduce")
        }
        ll, means, stats = compiled(start, y, jax.random.key(1))
        em = EM(lds, e_step(m)).run(jax.random.key(2), 1, init_params=start, y=y,
                                    state_dim=2, progress_bar=False)
        mcmc = ParticleSmoother(64, mode="ffbsi-mcmc", num_trajectories=32,
                                particle_mesh=m).smooth(start, lds, rng_key=jax.random.key(3),
                                                        y=y, state_dim=2)
        runs[where] = (ll, means, stats, em, mcmc)
    a, b = runs["one"], runs["mesh"]
    out["ll"] = [float(a[0]), float(b[0])]
    out["means_diff"] = max_diff([a[1]], [b[1]])
    out["stats_diff"] = max_diff(a[2], b[2])
    out["stats_scale"] = max(float(np.max(np.abs(np.asarray(s)))) for s in a[2])
    out["em_lls"] = [a[3].log_marginals.tolist(), b[3].log_marginals.tolist()]
    out["em_param_diff"] = max_diff([a[3].params[k] for k in a[3].params],
                                    [b[3].params[k] for k in a[3].params])
    out["em_param_change"] = max_diff([a[3].params[k] for k in a[3].params],
                                      [start[k] for k in a[3].params])
    out["mcmc_ll"] = [float(a[4].log_marginal), float(b[4].log_marginal)]
    out["mcmc_means_diff"] = max_diff([a[4].means], [b[4].means])
    out["sharding"] = list(b[4].particles.sharding.spec)  # particles (T, N, dx)
    errors = []
    for kw in (dict(particle_mesh="particles"), dict(num_particles=60, particle_mesh=mesh)):
        try:
            ParticleSmoother(**kw).smooth(start, lds, rng_key=jax.random.key(0), y=y,
                                          state_dim=2)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def particle_mesh_run():
    return _run_on_8_cpu_devices(PARTICLE_SCRIPT)


@pytest.mark.slow
def test_particle_sharded_posterior_equals_unsharded_on_8_cpu_devices(particle_mesh_run):
    out = particle_mesh_run
    # printed, not asserted: the sharded program really is partitioned
    print("collectives:", out["collectives_one"], "(one device),", out["collectives_mesh"])
    print({k: out[k] for k in ("ll", "means_diff", "stats_diff", "mcmc_ll", "mcmc_means_diff")})
    one, mesh = out["ll"]
    assert abs(one - mesh) <= 1e-9 * abs(one), out["ll"]
    assert out["means_diff"] <= 1e-9, out["means_diff"]
    assert out["stats_diff"] <= 1e-9 * out["stats_scale"], out
    # the linear-cost modes start from the sharded filter output
    one, mesh = out["mcmc_ll"]
    assert abs(one - mesh) <= 1e-9 * abs(one), out["mcmc_ll"]
    assert out["mcmc_means_diff"] <= 1e-9, out["mcmc_means_diff"]
    assert out["sharding"][:2] == [None, "particles"], out["sharding"]


@pytest.mark.slow
def test_em_step_with_sharded_particle_e_step_equals_unsharded(particle_mesh_run):
    out = particle_mesh_run
    print({k: out[k] for k in ("em_lls", "em_param_diff", "em_param_change")})
    one, mesh = out["em_lls"]
    assert len(one) == 1 and abs(one[0] - mesh[0]) <= 1e-9 * abs(one[0]), out["em_lls"]
    assert out["em_param_change"] > 1e-3  # the step moved the parameters ...
    assert out["em_param_diff"] <= 1e-9, out  # ... identically on one device and on 8


@pytest.mark.slow
def test_particle_mesh_indivisible_num_particles_raises(particle_mesh_run):
    bad_type, indivisible = particle_mesh_run["errors"]
    assert "particle_mesh must be a jax.sharding.Mesh" in bad_type
    assert "num_particles (60)" in indivisible and "particle axes (8)" in indivisible


def test_particle_mesh_must_be_a_mesh():
    from ppl_dyn.infer import ParticleSmoother
    from ppl_dyn.models import lds

    y = np.zeros((5, 2))
    with pytest.raises(ValueError, match="particle_mesh must be a jax.sharding.Mesh"):
        ParticleSmoother(8, particle_mesh=("particles",)).smooth(
            {}, lds, rng_key=jax.random.key(0), y=y, state_dim=2
        )

"""EM with the sequence axis sharded over a Mesh equals EM on one device.

The 8 devices are CPU devices made by ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
which must be set before JAX initialises: the check runs in a subprocess. The sequence
counts (13) are not multiples of 8, so the sharded runs also pad with length-0 sequences.
"""

import json
import os
import subprocess
import sys
import textwrap

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


def test_sharded_em_equals_unsharded_em_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
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

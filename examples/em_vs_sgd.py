"""EM versus Adam on the exact log-marginal likelihood of a linear dynamical system.

The seed-004 comparison: on the same simulated data, from the same starting point, EM
(Kalman smoother + closed-form M-step) and Adam at several learning rates (gradient of the
Kalman log-marginal, ``ppl_dyn.infer.SGD``). Saves one figure (log-marginal per iteration,
log x-axis) and prints how many iterations each method needs to come within 0.1 nats of
the best log-marginal any of them found.

Run: python examples/em_vs_sgd.py [--small] [--out DIR]
"""

import argparse
import json
import pathlib
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ppl_dyn.infer import EM, SGD, KalmanSmoother  # noqa: E402
from ppl_dyn.models import lds  # noqa: E402

TOL = 0.1  # nats

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="tiny smoke run")
parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
args = parser.parse_args()
out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="em_vs_sgd_"))
out.mkdir(parents=True, exist_ok=True)

if args.small:
    T, S, em_iters, sgd_steps, rates = 30, 2, 10, 30, (1e-2, 1e-1)
else:
    T, S, em_iters, sgd_steps, rates = 200, 4, 500, 5000, (1e-3, 1e-2, 1e-1)

# the true system: a slowly rotating 2-d state seen through 3 noisy channels
A = np.array([[0.95, 0.2], [-0.2, 0.95]])
C = np.array([[1.0, 0.0], [0.3, 1.0], [0.5, -0.5]])
Q, R = 0.05 * np.eye(2), 0.1 * np.eye(3)
rng = np.random.default_rng(0)
x = np.zeros((S, T, 2))
x[:, 0] = rng.normal(size=(S, 2))  # x_1 ~ N(0, I)
for t in range(1, T):
    x[:, t] = x[:, t - 1] @ A.T + rng.multivariate_normal(np.zeros(2), Q, size=S)
y = x @ C.T + rng.multivariate_normal(np.zeros(3), R, size=(S, T))
data = dict(y=y, state_dim=2)
# one starting point for every method: a draw from the model's priors
start = EM(lds, KalmanSmoother()).init(jax.random.key(1), **data).params


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


histories, seconds = {}, {}
em = EM(lds, KalmanSmoother())
em.run(jax.random.key(2), 1, init=start, progress_bar=False, **data)  # compile
res, seconds["EM"] = timed(
    lambda: em.run(jax.random.key(2), em_iters, init=start, progress_bar=False, **data)
)
histories["EM"] = res.log_marginals
# one optimiser object with the learning rate as state: every rate reuses one compiled step
adam = optax.inject_hyperparams(optax.adam)(learning_rate=rates[0])
sgd = SGD(lds, KalmanSmoother(), adam)
sgd.run(jax.random.key(2), 1, init=start, progress_bar=False, **data)  # compile
for lr in rates:
    state = sgd.init(jax.random.key(2), init_params=start, **data)
    hyper = state.opt_state.hyperparams
    rate = jnp.asarray(lr, dtype=hyper["learning_rate"].dtype)
    state = state._replace(
        opt_state=state.opt_state._replace(hyperparams={**hyper, "learning_rate": rate})
    )
    name = f"Adam lr={lr:g}"
    res, seconds[name] = timed(
        lambda state=state: sgd.run(
            jax.random.key(2), sgd_steps, init_state=state, progress_bar=False, **data
        )
    )
    histories[name] = res.log_marginals

best = max(float(np.max(h)) for h in histories.values())


def iterations_to(h, target):
    """Updates made before the log-marginal first reaches ``target`` (None: never)."""
    hit = np.flatnonzero(h >= target)
    return int(hit[0]) if hit.size else None


def iterations_to_stay(h, target):
    """Updates after which the log-marginal never drops below ``target`` again."""
    miss = np.flatnonzero(h < target)
    if miss.size and miss[-1] == len(h) - 1:
        return None
    return int(miss[-1]) + 1 if miss.size else 0


summary = {}
print(
    f"T={T}, S={S}: best log-marginal {best:.3f}; iterations to come within {TOL} nats"
    " (first time, and for good):"
)
for name, h in histories.items():
    k = iterations_to(h, best - TOL)
    k_stay = iterations_to_stay(h, best - TOL)
    per_iter = 1e3 * seconds[name] / len(h)
    summary[name] = {
        "iterations_to_within_tol": k,
        "iterations_to_stay_within_tol": k_stay,
        "iterations_run": len(h),
        "final_log_marginal": float(h[-1]),
        "best_log_marginal": float(np.max(h)),
        "ms_per_iteration": per_iter,
    }
    reached = f"{k:>6d}" if k is not None else f"{'>' + str(len(h)):>6s}"
    stays = f"{k_stay:>6d}" if k_stay is not None else f"{'>' + str(len(h)):>6s}"
    print(
        f"  {name:<14s} first {reached}, for good {stays}   final {h[-1]:11.3f}"
        f"   {per_iter:6.2f} ms/iteration"
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name, h in histories.items():
    it = np.arange(1, len(h) + 1)
    style = dict(lw=2.2, color="k") if name == "EM" else dict(lw=1.4)
    ax1.plot(it, h, label=name, **style)
    ax2.plot(it, np.maximum(best - h, 1e-4), label=name, **style)
ax1.set(
    xscale="log",
    xlabel="iteration",
    ylabel="log-marginal likelihood (nats)",
    ylim=(best - 50 * max(1.0, T * S / 800), best + 5),
    title="log p(y | theta_k)",
)
ax2.axhline(TOL, color="grey", ls=":", lw=1)
ax2.set(
    xscale="log",
    yscale="log",
    xlabel="iteration",
    ylabel="best - log-marginal (nats)",
    title=f"gap to the best value (dotted: {TOL} nats; floor 1e-4)",
)
ax1.legend(loc="lower right")
fig.suptitle(f"EM vs Adam on the exact Kalman log-marginal (LDS, T={T}, S={S})")
fig.tight_layout()
fig.savefig(out / "em_vs_sgd.png", dpi=120)
(out / "em_vs_sgd.json").write_text(json.dumps({"best": best, "tol": TOL, **summary}, indent=2))
print(f"figure and numbers in {out}")

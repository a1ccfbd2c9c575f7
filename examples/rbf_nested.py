"""Learn nonlinear dynamics from inputs and outputs only (Ghahramani & Roweis, 1999).

Factor analysis -> LDS by EM -> RBF model by EM with the extended Kalman smoother, in
one call (``fit_nested``), then a forecast comparison on held-out data and a plot of the
learned map. Run: python examples/rbf_nested.py [--small] [--out DIR]
"""

import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

from ppl_dyn.infer import ExtendedKalmanSmoother, KalmanSmoother, fit_nested  # noqa: E402
from ppl_dyn.models import lds, rbf, rbf_features  # noqa: E402

small = "--small" in sys.argv
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
T = 300 if small else 2000

# a state that saturates: x_t = tanh(1.5 x_{t-1}) + u_t + noise, observed with noise
rng = np.random.default_rng(0)
u = rng.normal(size=(T, 1))
x = np.zeros(T)
for t in range(1, T):
    x[t] = np.tanh(1.5 * x[t - 1]) + u[t, 0] + 0.1 * rng.normal()
y = (x + 0.2 * rng.normal(size=T))[:, None]
half = T // 2

fit = fit_nested(
    jax.random.key(0),
    y=y[:half],
    u=u[:half],
    state_dim=1,
    lds_iters=10 if small else 50,
    rbf_iters=3 if small else 20,
    progress_bar=not small,
)
print(
    "training log-likelihood: LDS %.1f -> RBF (EKS) %.1f"
    % (fit.lds.log_marginals[-1], fit.rbf.log_marginals[-1])
)
test = dict(y=y[half:], u=u[half:], state_dim=1)
ll_lds = KalmanSmoother().smooth(fit.lds.params, lds, **test).log_marginal
post = ExtendedKalmanSmoother().smooth(
    fit.rbf.params, rbf, centres=fit.centres, widths=fit.widths, **test
)
print("held-out log-likelihood:  LDS %.1f, RBF (EKS) %.1f" % (ll_lds, post.log_marginal))

if out is not None:
    from ppl_dyn.plots import _plt

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    m = np.asarray(post.means)[:, 0]
    grid = np.linspace(m.min(), m.max(), 200)
    A, b = np.asarray(fit.rbf.params["A"])[0], float(fit.rbf.params["b"][0])
    f = np.asarray(rbf_features(grid[:, None], fit.centres, fit.widths)) @ A + b
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(grid, f, "b-", label="learned map f(x) (latent coordinates)")
    ax.set_xlabel("x_t")
    ax.set_ylabel("E[x_{t+1} | x_t] without the input")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rbf_map.png", dpi=110)
    print("figure:", out / "rbf_map.png")

"""Projected gradient descent learns a SISO linear system in controllable canonical form.

Reproduces the qualitative claims of Hardt, Ma & Recht (seed 002) on simulated data:

1. a true system satisfying the Pac-Man condition is learned exactly by projected GD on
   the population risk, at the true order and over-parameterised;
2. over-parameterisation weakens the condition: a stable system *outside* the Pac-Man
   region is out of reach at its own order but learned exactly at a larger order;
3. on noisy data the impulse-response error falls with the sequence length T and with the
   number of sequences N.

Run: python examples/canonical_lds.py [--small] [--out DIR]
"""

import argparse
import json
import os
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ppl_dyn import canonical as cn  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="a smoke run of a few seconds")
parser.add_argument("--out", default=None, help="folder for the figure and metrics.json")
args = parser.parse_args()
out = args.out or tempfile.mkdtemp(prefix="canonical_lds_")
os.makedirs(out, exist_ok=True)
start = time.time()

K = 50  # lags compared: h = (D, CB, CAB, ..., CA^{K-2}B)
LR = 0.05  # plain projected gradient descent, as in the seed
POP_ITERS = 600 if args.small else 4000
EMP_ITERS = 500 if args.small else 3000
POP_T = 200  # horizon of the population risk
NOISE = 0.5  # output noise standard deviation in the N/T study

# true system 1: inside the Pac-Man region (two complex pole pairs of modulus 0.84, 0.79)
inside = cn.CanonicalParams(
    jnp.array([0.16, 0.24, 0.01, 0.44]), jnp.array([1.0, -0.5, 0.8, 0.3]), jnp.asarray(0.5)
)
# true system 2: stable (poles 0.85 e^{+-i pi/4}) but outside the region
poles = 0.85 * np.exp(1j * np.pi / 4 * np.array([1, -1]))
outside = cn.CanonicalParams(
    jnp.asarray(np.poly(poles).real[1:]), jnp.array([1.0, -0.5]), jnp.asarray(0.2)
)


def describe(name, p):
    check = cn.check_pacman(p.a)
    radius = np.max(np.abs(np.roots(np.r_[1.0, np.asarray(p.a)])))
    print(
        f"{name}: a = {np.round(np.asarray(p.a), 4).tolist()}, Pac-Man margin "
        f"{float(check.margin):+.4f} (satisfied: {bool(check.satisfied)}), "
        f"spectral radius {radius:.3f}"
    )
    return {
        "a": np.asarray(p.a).tolist(),
        "margin": float(check.margin),
        "spectral_radius": float(radius),
    }


def ir_error(p, truth):
    return float(jnp.linalg.norm(cn.impulse_response(p, K) - cn.impulse_response(truth, K)))


metrics = {
    "true_inside": describe("true system (inside)", inside),
    "true_outside": describe("true system (outside)", outside),
}
h_norm = {
    "inside": float(jnp.linalg.norm(cn.impulse_response(inside, K))),
    "outside": float(jnp.linalg.norm(cn.impulse_response(outside, K))),
}

# --- 1 and 2: projected GD on the population risk ------------------------------------
pop_runs = [("inside", inside, 4), ("outside", outside, 2), ("outside", outside, 4)]
if not args.small:
    pop_runs += [("inside", inside, 8), ("outside", outside, 8)]
pop = {}
print(
    f"\nprojected GD on the population risk (T = {POP_T}, {POP_ITERS} steps, "
    f"lr {LR}, start a = c = 0, d = 0)"
)
print(f"{'system':>8} {'order':>5} {'final risk':>11} {'|h - h*|':>10} {'rel.':>9} {'margin':>7}")
for name, truth, order in pop_runs:
    fit = cn.fit_canonical_population(truth, order, POP_T, num_iters=POP_ITERS, learning_rate=LR)
    err = ir_error(fit.params, truth)
    margin = float(cn.check_pacman(fit.params.a).margin)
    pop[(name, order)] = fit
    metrics[f"population_{name}_order{order}"] = {
        "final_risk": float(fit.losses[-1]),
        "ir_error": err,
        "relative_ir_error": err / h_norm[name],
        "learned_margin": margin,
    }
    print(
        f"{name:>8} {order:>5} {float(fit.losses[-1]):11.2e} {err:10.2e} "
        f"{err / h_norm[name]:9.2e} {margin:+7.3f}"
    )

# --- 3: empirical risk, error vs T and vs N ------------------------------------------
T_values = [25, 50] if args.small else [25, 50, 100, 200, 400, 800]
N_values = [1, 4] if args.small else [1, 2, 4, 8, 16, 32, 64]
T_fixed_N, N_fixed_T = 4, 50
reps = 1 if args.small else 5
order = 4


def fit_masked(u, y, mask):
    fit = cn.fit_canonical(u, y, order, num_iters=EMP_ITERS, learning_rate=LR, mask=mask)
    return ir_error(fit.params, inside), fit


# one data array per replicate and study; shorter sequences / fewer sequences are masks
# (the model starts at rest and is causal, so masking the tail equals truncating), so the
# compiled loop is reused across the whole sweep
err_T = np.zeros((reps, len(T_values)))
err_N = np.zeros((reps, len(N_values)))
histories = {}
for r in range(reps):
    key_T, key_N = jax.random.split(jax.random.key(100 + r))
    u, y = cn.sample_data(
        key_T, inside, num_sequences=T_fixed_N, num_steps=max(T_values), noise_std=NOISE
    )
    for i, T in enumerate(T_values):
        mask = jnp.zeros_like(y).at[:, :T].set(1.0)
        err_T[r, i], fit = fit_masked(u, y, mask)
        histories[("T", T)] = fit.losses
    u, y = cn.sample_data(
        key_N, inside, num_sequences=max(N_values), num_steps=N_fixed_T, noise_std=NOISE
    )
    for i, N in enumerate(N_values):
        mask = jnp.zeros_like(y).at[:N].set(1.0)
        err_N[r, i], fit = fit_masked(u, y, mask)

print(
    f"\nimpulse-response error |h - h*| over {K} lags (|h*| = {h_norm['inside']:.3f}); "
    f"order {order}, noise sd {NOISE}, {EMP_ITERS} projected GD steps; "
    f"median [min, max] over {reps} data sets"
)
print(f"{'study':>5} {'N':>4} {'T':>5} {'error':>9} {'range':>22}")
rows = []
for i, T in enumerate(T_values):
    e = err_T[:, i]
    rows.append(
        {
            "study": "T",
            "N": T_fixed_N,
            "T": T,
            "median": float(np.median(e)),
            "min": float(e.min()),
            "max": float(e.max()),
        }
    )
for i, N in enumerate(N_values):
    e = err_N[:, i]
    rows.append(
        {
            "study": "N",
            "N": N,
            "T": N_fixed_T,
            "median": float(np.median(e)),
            "min": float(e.min()),
            "max": float(e.max()),
        }
    )
for row in rows:
    print(
        f"{row['study']:>5} {row['N']:>4} {row['T']:>5} {row['median']:9.4f} "
        f"[{row['min']:8.4f}, {row['max']:8.4f}]"
    )
metrics["error_vs_T_and_N"] = rows


def slope(x, e):
    return float(np.polyfit(np.log(x), np.log(np.median(e, axis=0)), 1)[0])


metrics["log_log_slope_T"] = slope(T_values, err_T)
metrics["log_log_slope_N"] = slope(N_values, err_N)
print(
    f"log-log slopes: error ~ T^{metrics['log_log_slope_T']:.2f} (N = {T_fixed_N}), "
    f"error ~ N^{metrics['log_log_slope_N']:.2f} (T = {N_fixed_T})"
)

# --- figure ----------------------------------------------------------------------------
fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
lags = np.arange(K)
big = 4 if args.small else 8
for col, (name, truth, orders) in enumerate(
    [("inside", inside, (4, big)), ("outside", outside, (2, big))]
):
    a_ = ax[0, col]
    a_.plot(lags, cn.impulse_response(truth, K), "k-", lw=3, alpha=0.4, label="true")
    for o, style in zip(orders, ("C0--", "C3:"), strict=True):
        a_.plot(
            lags,
            cn.impulse_response(pop[(name, o)].params, K),
            style,
            lw=1.5,
            label=f"learned, order {o}",
        )
    a_.set_title(f"impulse response, true system {name} the Pac-Man region")
    a_.set_xlabel("lag k")
    a_.legend()
a_ = ax[0, 2]
for (name, o), fit in pop.items():
    a_.semilogy(np.maximum(np.asarray(fit.losses), 1e-32), label=f"{name}, order {o}")
a_.set_title("population risk during projected GD")
a_.set_xlabel("iteration")
a_.legend(fontsize=8)
a_ = ax[1, 0]
circle = np.linspace(0, 2 * np.pi, 2000)
for label, a_vec, style in [
    ("true (inside)", inside.a, "k-"),
    (f"learned order {big} (inside)", pop[("inside", big)].params.a, "C0--"),
    ("true (outside)", outside.a, "C1-"),
    (f"learned order {big} (outside)", pop[("outside", big)].params.a, "C3:"),
]:
    _, q = cn.pacman_values(a_vec, 2000)
    a_.plot(q.real, q.imag, style, label=label)
w = np.linspace(0, 4, 2)
a_.fill_between(w, -w, w, color="g", alpha=0.08, label="wedge Re q > |Im q|")
a_.axhline(0, color="grey", lw=0.5)
a_.axvline(0, color="grey", lw=0.5)
a_.set_xlim(-1.5, 4)
a_.set_ylim(-2.75, 2.75)
a_.set_title(r"$q_a(z) = p_a(z)/z^n$ on $|z| = 1$ (Pac-Man)")
a_.legend(fontsize=7)
for a_, xs, e, xl, other in [
    (ax[1, 1], T_values, err_T, "sequence length T", f"N = {T_fixed_N}"),
    (ax[1, 2], N_values, err_N, "number of sequences N", f"T = {N_fixed_T}"),
]:
    med = np.median(e, axis=0)
    a_.loglog(xs, med, "o-", label=f"median over {reps} data sets ({other})")
    a_.fill_between(xs, e.min(axis=0), e.max(axis=0), alpha=0.2)
    a_.loglog(xs, med[0] * (np.asarray(xs) / xs[0]) ** -0.5, "k:", label=r"$\propto x^{-1/2}$")
    a_.set_xticks(xs, [str(x) for x in xs])
    a_.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a_.set_xlabel(xl)
    a_.set_ylabel(r"$\|h - h^*\|$")
    a_.set_title(f"impulse-response error vs {xl.split()[-1]}")
    a_.legend(fontsize=8)
fig.tight_layout()
path = os.path.join(out, "canonical_lds.png")
fig.savefig(path, dpi=110)
metrics["seconds"] = time.time() - start
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
print(f"\nfigure: {path}  ({metrics['seconds']:.0f} s)")

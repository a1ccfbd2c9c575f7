"""The regressor feature maps ``phi(x)`` of a :class:`~ppl_dyn.LinearStructure`, as values.

At the bottom of the package (JAX only). A :class:`Features` value carries everything the
library needs to know about one feature map: the map itself, its arguments (RBF centres
and widths), where the state enters it linearly (for the spectral-radius bound and the
ridge), and, optionally, its Gaussian moments (what a Kalman or extended Kalman E-step
needs for the closed-form M-step's statistics). :class:`~ppl_dyn.state_space.Regression`
takes one (or a built-in's name: ``"linear"``, ``"tanh"``, ``"rbf"``), so a user's own
feature map plugs into the closed-form M-step without an edit to the library.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np


def linear_features(x):
    """``phi(x) = x``."""
    return x


def tanh_features(x):
    """``phi(x) = tanh(x)`` element-wise."""
    return jnp.tanh(x)


def rbf_features(x, centres, widths):
    r"""Features :math:`[\rho_1(x), \dots, \rho_I(x), x]` with
    :math:`\rho_i(x) = \mathcal N(x; c_i, S_i)`, :math:`S_i = w_i^2 I`.

    ``x``: ``(..., dx)``; ``centres``: ``(I, dx)``; ``widths``: ``(I,)`` standard deviations.
    """
    dx = centres.shape[-1]
    s2 = widths**2
    sq = jnp.sum((x[..., None, :] - centres) ** 2, -1)  # (..., I)
    rho = jnp.exp(-0.5 * sq / s2 - 0.5 * dx * jnp.log(2 * jnp.pi * s2))
    return jnp.concatenate([rho, x], -1)


_STATE_COLUMNS = (None, "all", "last")


class Features(NamedTuple):
    """One feature map ``phi`` of a regression ``z = W phi(x) + V u + c + noise``.

    Attributes:
        name: a label (messages, ArviZ dims).
        fn: ``(x, *args) -> phi(x)`` for states ``x`` ``(..., dx)``, features
            ``(..., k)``; pure JAX.
        args: extra arguments of ``fn`` (e.g. RBF centres and widths).
        moments: ``(m, P, *args) -> (E[phi], E[phi phi^T], E[d phi/dx])`` under
            ``x ~ N(m, P)`` (``(k,)``, ``(k, k)``, ``(k, dx)``), for Gaussian E-steps;
            None: only particle E-steps can compute the statistics of this map (a
            Gaussian one refuses by name). The built-in maps have theirs in
            :mod:`ppl_dyn.infer.feature_moments`.
        state_columns: where ``x`` itself sits in ``phi``: ``"all"`` (``phi(x) = x``),
            ``"last"`` (``phi(x) = [g(x); x]``, the last ``dx`` columns) or None. The
            spectral-radius bound acts on those columns, the ridge on the others. It is
            checked against ``fn`` when a model is verified
            (:func:`~ppl_dyn.requirements.verify_structure`).
        elementwise: ``phi`` maps each state coordinate on its own (``k = dx``; ArviZ
            then names the weight's columns by state).
    """

    name: str
    fn: Callable
    args: tuple = ()
    moments: Optional[Callable] = None
    state_columns: Optional[str] = None
    elementwise: bool = False

    def __call__(self, x):
        return self.fn(x, *self.args)

    @property
    def is_identity(self) -> bool:
        return self.state_columns == "all"

    def check(self, dx: int, dtype=np.float64, num_points: int = 3) -> None:
        """``ValueError`` when the declared ``state_columns`` / ``elementwise`` do not
        hold for ``fn`` at a few random states (checked, not assumed)."""
        if self.state_columns not in _STATE_COLUMNS:
            raise ValueError(
                f"Features {self.name!r}: state_columns must be one of {_STATE_COLUMNS}; "
                f"got {self.state_columns!r}"
            )
        x = np.random.default_rng(0).normal(size=(num_points, dx)).astype(dtype)
        phi = np.asarray(self(jnp.asarray(x)))
        if phi.ndim != 2 or phi.shape[0] != num_points:
            raise ValueError(
                f"Features {self.name!r}: fn must map states (..., {dx}) to features "
                f"(..., k); states {x.shape} gave {phi.shape}"
            )
        tol = 1e-6 * max(1.0, float(np.max(np.abs(x))))
        if self.state_columns == "all" and (phi.shape != x.shape or np.abs(phi - x).max() > tol):
            raise ValueError(f"Features {self.name!r} declares phi(x) = x, but fn differs")
        if self.state_columns == "last" and (
            phi.shape[1] < dx or np.abs(phi[:, -dx:] - x).max() > tol
        ):
            raise ValueError(
                f"Features {self.name!r} declares phi(x) = [g(x); x], but the last {dx} "
                "columns of fn(x) are not x"
            )
        if self.elementwise and phi.shape[1] != dx:
            raise ValueError(
                f"Features {self.name!r} declares elementwise, but maps {dx} states to "
                f"{phi.shape[1]} features"
            )


#: ``phi(x) = x``.
LINEAR = Features("linear", linear_features, state_columns="all", elementwise=True)
#: ``phi(x) = tanh(x)`` element-wise.
TANH = Features("tanh", tanh_features, elementwise=True)


def rbf(centres, widths) -> Features:
    """``phi(x) = [rho_1(x) .. rho_I(x); x]`` (:func:`rbf_features`)."""
    return Features("rbf", rbf_features, (centres, widths), state_columns="last")


def features_named(name, args: tuple = ()) -> Features:
    """The built-in feature map called ``name`` (``"linear"``, ``"tanh"``, ``"rbf"``)
    with ``args``; a :class:`Features` value is returned as it is."""
    if isinstance(name, Features):
        if args:
            raise ValueError(
                f"Features {name.name!r} carries its own args; pass feature_args=() with it"
            )
        return name
    if name == "linear" and not args:
        return LINEAR
    if name == "tanh" and not args:
        return TANH
    if name == "rbf" and len(args) == 2:
        return rbf(*args)
    if name in ("linear", "tanh", "rbf"):
        raise ValueError(
            f"feature {name!r} takes {'(centres, widths)' if name == 'rbf' else 'no'} "
            f"feature_args; got {len(args)}"
        )
    raise ValueError(
        f"unknown feature {name!r}; known: ['linear', 'rbf', 'tanh'], or pass a "
        "ppl_dyn.Features value"
    )


#: The feature maps by name: ``(x, *feature_args) -> phi(x)``.
FEATURES = {"linear": linear_features, "tanh": tanh_features, "rbf": rbf_features}

"""Built-in state-space models, written as plain NumPyro functions."""

from ppl_dyn.models.lds import lds, lds_canonical_params
from ppl_dyn.models.lstm import lstm
from ppl_dyn.models.rbf import rbf, rbf_features, rbf_grid
from ppl_dyn.models.tanh_rnn import tanh_rnn

__all__ = ["lds", "lds_canonical_params", "tanh_rnn", "rbf", "rbf_features", "rbf_grid", "lstm"]

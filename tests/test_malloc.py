"""``ppl_dyn.keep_freed_memory()`` raises glibc's trim threshold once per process
(ppl_dyn._malloc), unless the user opts out; the library never does it by itself (a
setting of the whole process, issue 22). Each case runs in a fresh interpreter: nothing
happens on import nor in a particle E-step, the call sets it where glibc is present, and
the two opt-outs leave the allocator alone."""

import os
import subprocess
import sys

import pytest

CODE = """
import jax, ppl_dyn
from ppl_dyn import _malloc
from ppl_dyn.models import tanh_rnn
from ppl_dyn.infer import ParticleSmoother
sim = ppl_dyn.simulate(jax.random.key(0), tanh_rnn, num_steps=5, state_dim=2, obs_dim=1)
assert not _malloc._state["done"]  # nothing happens on import
ParticleSmoother(num_particles=8).smooth(sim["params"], tanh_rnn, rng_key=jax.random.key(1),
                                         y=sim["y"], state_dim=2)
assert not _malloc._state["done"]  # nor in a particle E-step
ppl_dyn.keep_freed_memory()
print("APPLIED", _malloc._state["done"], _malloc._state["applied"])
"""


def _run(extra_env):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("APPLIED")[-1].split()


def _glibc():
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(
            ctypes.CDLL(None), "gnu_get_libc_version"
        )
    except OSError:
        return False


def test_the_call_keeps_freed_memory_on_glibc():
    done, applied = _run({})
    assert done == "True"
    assert applied == str(_glibc())


@pytest.mark.parametrize(
    "env", [{"PPL_DYN_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}]
)
def test_opt_out_leaves_the_allocator_alone(env):
    done, applied = _run(env)
    assert (done, applied) == ("True", "False")

"""Several processes, one JAX program: start them, and join them in ``jax.distributed``.

JAX's multi-controller runtime runs the same script in every process; after
``jax.distributed.initialize`` a ``jax.sharding.Mesh`` can span the devices of all of
them, and ``EM.run(..., mesh=mesh)`` shards the sequences over it (``docs/scale.md``).
This module holds the two small pieces around that:

* :func:`initialize`: ``jax.distributed.initialize`` with the process layout read from
  the environment (this module's launcher, SLURM, or arguments), and JAX's CPU
  collectives (gloo) switched on when the processes run on CPUs. It must run before
  JAX's backend starts, and ``import ppl_dyn`` starts it (BlackJAX creates arrays when
  imported): call it before importing the rest of the library, or let the launcher's
  environment do it (``import ppl_dyn`` joins a process started by the launcher);
* a local launcher, ``python -m ppl_dyn.launch --num-processes N script.py ...``,
  which starts ``N`` copies of a script on this machine with a coordinator on
  ``localhost`` (:func:`launch_local`). The tests run their multi-process EM with it.

Example (a script run by the launcher; each process passes its own sequences)::

    import jax, numpy as np
    import ppl_dyn                                 # joins the processes of the launcher
    from jax.sharding import Mesh
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    my_ys = load_my_part(jax.process_index())      # a list of (L_s, obs_dim) arrays
    res = EM(lds, KalmanSmoother()).run(jax.random.key(0), 50, y=my_ys, state_dim=2,
                                        mesh=mesh, process_local=True)
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Optional, Sequence

__all__ = [
    "initialize",
    "initialize_from_environment",
    "launch_local",
    "ENV_PROCESS_ID",
    "ENV_NUM_PROCESSES",
    "ENV_COORDINATOR",
]

ENV_PROCESS_ID = "PPL_DYN_PROCESS_ID"
ENV_NUM_PROCESSES = "PPL_DYN_NUM_PROCESSES"
ENV_COORDINATOR = "PPL_DYN_COORDINATOR"


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    cpu_collectives: bool = True,
) -> None:
    """Join this process to the others (``jax.distributed.initialize``).

    Arguments not given are read from ``PPL_DYN_COORDINATOR``, ``PPL_DYN_NUM_PROCESSES``
    and ``PPL_DYN_PROCESS_ID`` (set by :func:`launch_local`); when those are absent too,
    JAX's own cluster detection runs (SLURM, Open MPI, Cloud TPU). With one process and
    nothing to join it returns without initialising anything.

    ``cpu_collectives``: use JAX's gloo implementation of the cross-process collectives
    for CPU devices (without it, a mesh of CPU devices in several processes cannot
    reduce). Call before any other JAX operation.
    """
    import jax

    global _JOINED
    if _JOINED:
        return
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in os.environ:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in os.environ:
        process_id = int(os.environ[ENV_PROCESS_ID])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes == 1 and coordinator_address is None:
        return
    if coordinator_address is None and num_processes is None and process_id is None:
        if not any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
            return  # one process, nothing to join
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    _JOINED = True


_JOINED = False


def initialize_from_environment() -> None:
    """:func:`initialize` when this process was started by :func:`launch_local` (its
    environment names a process id), else nothing. ``import ppl_dyn`` calls it first
    thing: importing the library initialises JAX's backend (BlackJAX creates arrays at
    import), after which ``jax.distributed.initialize`` can no longer run."""
    if ENV_PROCESS_ID in os.environ and ENV_COORDINATOR in os.environ:
        initialize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    env: Optional[dict] = None,
    timeout: Optional[float] = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``num_processes`` copies of the command ``argv`` (e.g. ``[sys.executable,
    "script.py"]``) on this machine, each with ``PPL_DYN_PROCESS_ID``,
    ``PPL_DYN_NUM_PROCESSES`` and ``PPL_DYN_COORDINATOR=localhost:<free port>`` in its
    environment, so that :func:`initialize` joins them. Waits for all of them and
    returns their completed processes (output captured), in process order; if one fails
    the others are stopped."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int; got {num_processes!r}")
    base = dict(os.environ if env is None else env)
    base[ENV_NUM_PROCESSES] = str(num_processes)
    base[ENV_COORDINATOR] = f"localhost:{_free_port()}"
    import tempfile

    procs, files = [], []
    for pid in range(num_processes):
        e = dict(base)
        e[ENV_PROCESS_ID] = str(pid)
        # output to files, not pipes: a process blocked on a full pipe would stall the
        # collectives of all the others
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen(list(argv), env=e, stdout=out, stderr=err, text=True))
    results = []
    try:
        for p, (out, err) in zip(procs, files, strict=True):
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            results.append(
                subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
            )
            if p.returncode != 0:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in files:
            out.close()
            err.close()
    return results

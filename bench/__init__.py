"""hvdagents benchmarks: ``python -m bench`` (``make bench``).

Each benchmark is one module with the MPI worker scripts it launches under ``bench/workers/``:

- :mod:`bench.overhead` — TorchAgent/KerasAgent(Sync) against bare Horovod loops.
- :mod:`bench.allreduce` — our Horovod all-reduce path against raw mpi4py, and tensor fusion.
- :mod:`bench.store` — the RMA ``ParameterWindow`` against memcpy and a two-sided parameter server.
- :mod:`bench.straggler` — time to a target test loss with and without a slow rank.
- :mod:`bench.scaling` — an alpha-beta model of all-reduce, the sharded store and a central server.

Results land in ``bench/results/`` (JSON per benchmark, ``RESULTS.md``, PNG plots).
Importing this package has no side effects.
"""

__all__: list[str] = []

"""MPI worker scripts the benchmarks launch (``mpirun ... python bench/workers/<name>.py``)."""

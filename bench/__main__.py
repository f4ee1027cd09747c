"""``python -m bench``: run the benchmarks, write ``RESULTS.md`` and the plots, print the table.

    python -m bench                      # everything, full sizes (about 45 minutes on 2 cores)
    python -m bench --quick              # tiny sizes, one repetition (a smoke run)
    python -m bench --only allreduce --only scaling --out /tmp/bench

Each benchmark writes ``<name>.json`` and ``<name>.png`` into ``--out``; ``RESULTS.md`` is then
rebuilt from every JSON found there, so ``--only`` refreshes one section and keeps the others.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from . import (
    allreduce,
    convergence,
    crosshost,
    cycle_time,
    longrun,
    lowbandwidth,
    memory,
    overhead,
    scaling,
    sharded,
    store,
    straggler,
)
from ._common import DEFAULT_OUT, JobFailed, md_table, read_json

__all__ = ["BENCHMARKS", "main", "render_results"]

#: Run order: scaling reads allreduce's fitted latency, so allreduce comes first.
BENCHMARKS: dict[str, ModuleType] = {
    "overhead": overhead,
    "allreduce": allreduce,
    "cycle_time": cycle_time,
    "crosshost": crosshost,
    "store": store,
    "straggler": straggler,
    "scaling": scaling,
    "memory": memory,
    "longrun": longrun,
    "lowbandwidth": lowbandwidth,
    "convergence": convergence,
    "sharded": sharded,
}

TITLES = {
    "overhead": "Wrapper overhead",
    "allreduce": "All-reduce bandwidth and tensor fusion",
    "cycle_time": "Horovod's cycle time",
    "crosshost": "Across two hosts (TCP)",
    "store": "Parameter store throughput",
    "straggler": "Straggler: time to a target loss",
    "scaling": "Scaling model (α–β)",
    "memory": "Host memory per rank",
    "longrun": "Long asynchronous runs (200 epochs)",
    "lowbandwidth": "Weak sync on a slow network (DiLoCo)",
    "convergence": "DiLoCo against Sync, trained to the plateau, on a slow network",
    "sharded": "Sharded data parallelism (ZeRO)",
}

SUMMARY_HEADERS = ["benchmark", "metric", "ours", "baseline", "ours / baseline"]


def _machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; {machine['mpi']}; "
            f"Horovod {machine['horovod']}, torch {machine['torch']}, TensorFlow {machine['tensorflow']}, "
            f"Keras {machine['keras']}, mpi4py {machine['mpi4py']}, NumPy {machine['numpy']}, "
            f"Python {machine['python']}; {machine['os']}")


def render_results(out: Path) -> str:
    """``RESULTS.md`` from every benchmark JSON in ``out`` (a summary table, then one section each)."""
    payloads = {name: p for name in BENCHMARKS if (p := read_json(out, name)) is not None}
    if not payloads:
        return "# hvdagents benchmarks\n\nNo results yet: run `python -m bench`.\n"
    rows: list[list[str]] = []
    sections: dict[str, str] = {}
    for name, payload in payloads.items():
        try:
            rows += BENCHMARKS[name].summary_rows(payload)
            sections[name] = BENCHMARKS[name].markdown(payload)
        except (KeyError, TypeError, IndexError):  # a JSON written by an older version of the benchmark
            sections[name] = f"`{name}.json` has an older layout: rerun `python -m bench --only {name}`."
    first = next(iter(payloads.values()))
    quick = any(p.get("quick") for p in payloads.values())
    dates = sorted({p["machine"]["date_utc"] for p in payloads.values()})
    lines = [
        "# hvdagents benchmarks",
        "",
        f"Machine: {_machine_line(first['machine'])}.",
        f"Taken {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''} UTC with `python -m bench`"
        f"{' --quick (tiny sizes: smoke numbers, not measurements)' if quick else ''}; details and formulas in "
        "`bench/README.md`. Numbers are median [min–max] over interleaved repetitions; ratios are taken "
        "per repetition against the baseline measured in the same job.",
        "",
        md_table(SUMMARY_HEADERS, rows),
    ]
    for name, section in sections.items():
        lines += ["", f"## {TITLES[name]}", "", section]
        if (out / f"{name}.png").exists():
            lines += ["", f"![{TITLES[name]}]({name}.png)"]
    return "\n".join(lines) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (smoke run)")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; 0 when all succeeded, 1 when any failed (the rest still run)."""
    args = _parse(argv)
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    started = time.monotonic()
    for name in selected:
        t0 = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        try:
            BENCHMARKS[name].run(args.out, args.quick)
        except JobFailed as exc:
            failed.append(name)
            print(f"[bench] {name} FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"[bench] {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    text = render_results(args.out)
    (args.out / "RESULTS.md").write_text(text)
    print()
    print(text)
    print(f"[bench] {len(selected)} benchmark(s) in {time.monotonic() - started:.0f} s; results in {args.out}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

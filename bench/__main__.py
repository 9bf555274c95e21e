"""`python -m bench [--quick] [--only NAME] [--out FILE]`: run the benchmarks, print one table, write it as Markdown."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import BENCHMARKS
from headstart.env import configure_environment

ISOLATED = ("HEADSTART_ROOT", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "TORCH_HOME", "DVC_SITE_CACHE_DIR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the benchmarks work (< 2 minutes)")
    parser.add_argument("--only", action="append", default=[], choices=BENCHMARKS, help="run only this (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench.md"), help="Markdown copy of the table")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    args = parser.parse_args(argv)

    # A project of its own, set before Prefect or MLflow is imported: the user's state stays untouched.
    root = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    for key in ISOLATED:
        os.environ.pop(key, None)
    configure_environment(root)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the library's progress bars; the benchmarks log their own

    from bench.suite import machine, run_benchmarks
    from bench.timing import log, render_markdown, render_text
    from bench.workspace import Workspace

    started = time.perf_counter()
    try:
        rows = run_benchmarks(Workspace(root / "bench", quick=args.quick), args.only)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    command = "python -m bench" + (" --quick" if args.quick else "") + "".join(f" --only {n}" for n in args.only)
    preamble = [
        f"Machine: {machine()}.",
        f"Command: `{command}` ({minutes:.1f} min). Each figure: median [min-max] of "
        "the repetitions, both sides of a ratio measured in the same repetition.",
    ]
    print(render_text(rows))
    print("\n".join(preamble))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(rows, preamble))
    log(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

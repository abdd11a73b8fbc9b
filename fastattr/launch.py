"""Running many `fastattr` processes side by side (`fastattr compare` and `fastattr compare --rlhf`)."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_all(jobs: dict[str, tuple[list[str], str]], n_parallel: int, out: Path, n_runs: int) -> list[str] | None:
    """Runs each job `label: (command, log name)` as a subprocess, `n_parallel` at a time, its output appended to
    OUT/logs/<log name>.log, with a progress bar. Returns the labels of the jobs that failed, or None after Ctrl-C
    (the runs got it too and stop, each keeping its last finished round). `n_runs`: all runs, finished ones included."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"compare: {n_runs - len(jobs)} of {n_runs} runs already finished; running {len(jobs)} with "
          f"{min(n_parallel, max(len(jobs), 1))} parallel jobs (logs in {out / 'logs'})", flush=True)

    def launch(label: str) -> tuple[str, int]:
        cmd, name = jobs[label]
        with open(out / "logs" / f"{name}.log", "a") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            return label, subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode

    from tqdm.auto import tqdm

    failed = []
    pool = ThreadPoolExecutor(max_workers=n_parallel)
    try:
        with tqdm(total=len(jobs), unit="run", desc="compare") as bar:
            for label, rc in pool.map(launch, jobs):
                bar.update(1)
                if rc != 0:
                    failed.append(label)
                    bar.write(f"compare: {label} failed (exit {rc}); see {out / 'logs'}")
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        print(f"\ncompare: interrupted; finished rounds are kept: run the same command again to resume "
              f"({out / 'runs'})", file=sys.stderr)
        return None
    pool.shutdown()
    return failed

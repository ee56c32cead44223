"""The cost of a store write, two source trees against each other (A/B by process): each run
is a process of one tree on an empty store of the engine keeping every derived table, given
the same journal writes of 1,000 demo events; the two trees alternate ``--rounds`` times, and
the first five writes of each run are not counted (warm-up).

    git worktree add /tmp/before <commit>
    python -m bench.write_ab --before /tmp/before/src [--after src] [--engine chdb]
                             [--writes 100] [--rounds 6]

Prints CPU (the process's, the engine's threads included) and wall per write for each tree;
results in bench/out/write-ab-<engine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import OUT, ROOT, machine

WORKER = r'''
import json, shutil, sys, tempfile, time
from datetime import UTC, datetime
from pathlib import Path
from bench.apply_bench import _batches
from tally.rollups import activity
from tally.rollups.spec import derived_tables
from tally.storage.base import WriteSet
from tally.storage.factory import open_backend
folder = Path(tempfile.mkdtemp(dir=sys.argv[3]))
store = open_backend(sys.argv[2], folder, derived=derived_tables, retired=activity.RETIRED)
cpu_s, wall_s = [], []
start = datetime(2026, 11, 1, tzinfo=UTC)
for seq, prepared in enumerate(_batches(int(sys.argv[1]), start, 0), 1):
    cpu, wall = time.process_time(), time.perf_counter()
    if hasattr(store, "begin_group"):  # a tree from before the checked ClickHouse write
        store.begin_group(seq)
    store.write(WriteSet(events=[prepared]), journal_seq=seq)
    cpu_s.append(time.process_time() - cpu)
    wall_s.append(time.perf_counter() - wall)
store.close()
shutil.rmtree(folder, ignore_errors=True)
print(json.dumps([cpu_s, wall_s]))
'''
WARM = 5  # writes of each run not counted


def run(trees: dict[str, Path], engine: str, writes: int, rounds: int) -> dict[str, Any]:
    spent: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in trees}
    scratch = OUT / "write-ab"
    scratch.mkdir(parents=True, exist_ok=True)
    for i in range(rounds):
        for name in list(trees) if i % 2 == 0 else list(reversed(trees)):
            env = {**os.environ, "PYTHONPATH": f"{trees[name]}{os.pathsep}{ROOT}"}
            out = subprocess.run([sys.executable, "-c", WORKER, str(writes), engine,
                                  str(scratch)], capture_output=True, text=True, check=True,
                                 cwd=ROOT, env=env)
            cpu, wall = json.loads(out.stdout.strip().splitlines()[-1])
            spent[name][0].extend(cpu[WARM:])
            spent[name][1].extend(wall[WARM:])
    result: dict[str, Any] = {"engine": engine, "writes": writes, "rounds": rounds,
                              "trees": {k: str(v) for k, v in trees.items()},
                              "machine": machine()}
    for name, (cpu, wall) in spent.items():
        result[name] = {"cpu_ms": round(statistics.mean(cpu) * 1000, 1),
                        "wall_p50_ms": round(statistics.median(wall) * 1000, 1),
                        "writes": len(cpu)}
    result["cpu_ratio"] = round(result["after"]["cpu_ms"] / result["before"]["cpu_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the src/ of one tree")
    parser.add_argument("--after", type=Path, default=ROOT / "src")
    parser.add_argument("--engine", choices=("chdb", "duckdb"), default="chdb")
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    result = run({"before": args.before.resolve(), "after": args.after.resolve()},
                 args.engine, args.writes, args.rounds)
    (OUT / f"write-ab-{args.engine}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()

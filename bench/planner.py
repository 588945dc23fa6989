"""How long the mesh planner takes on the large cases, against composing their config.

Every entry point composes and validates the config before it plans, so that is the baseline,
measured in the same run: the ratio says what planning adds to it. Each stage runs `--repeat`
times; the median is reported.

    python bench/planner.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from trainer.config import RunConfig, load
from trainer.plan import candidates, choose

LARGE = ("parallelism=auto", "data.seq_len=8192", "data.micro_batch_size=1",
         "trainer.precision=bf16-mixed", "parallelism.param_dtype=bfloat16")
CASES = {
    "tiny, 1 cpu rank": ("parallelism=auto",),
    "llama3_8b, 4 x trn2_ultraserver": ("model=llama3_8b", "hardware=trn2_ultraserver",
                                        "cluster.nodes=4", *LARGE),
    "llama3_70b, 36 x trn3_ultraserver": ("model=llama3_70b", "hardware=trn3_ultraserver",
                                          "cluster.nodes=36", *LARGE),
    "llama3_405b, 36 x gb200_nvl72": ("model=llama3_405b", "hardware=gb200_nvl72",
                                      "cluster.nodes=36", *LARGE),
}


def median_seconds(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(overrides: tuple[str, ...], repeat: int) -> dict[str, float]:
    compose_s = median_seconds(lambda: load(list(overrides)), repeat)
    run: RunConfig = load(list(overrides))
    return {"world": run.world_size, "candidates": len(candidates(run)),
            "compose_s": compose_s,
            "plan_s": median_seconds(lambda: choose(run), repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    print(f"{'case':36} {'ranks':>6} {'plans':>6} {'compose ms':>11} {'plan ms':>8} "
          f"{'plan / compose':>15}")
    for name, overrides in CASES.items():
        r = bench_case(overrides, repeat)
        print(f"{name:36} {r['world']:>6} {r['candidates']:>6} {r['compose_s'] * 1e3:>11.1f} "
              f"{r['plan_s'] * 1e3:>8.1f} {r['plan_s'] / r['compose_s']:>15.3f}")


if __name__ == "__main__":
    main()

"""Held-out accuracy gains of the text methods on the embedded arithmetic model (several seeds).

    python bench/llm_embedded_gains.py --methods grpo dpo simpo --seeds 0 1 2

Runs ``configs/llm_<method>_arith.yaml`` through the shared training loop once per seed and
reports the held-out greedy accuracy (``eval/arithmetic_reward`` on 500 problems never trained
on) before and after, the gain (mean and sample std over seeds) and the process CPU time. One
torch thread per run, so CPU minutes are comparable across machines and loads. Prints a table,
writes JSON. A benchmark, never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffalign.config import add_overrides_argument  # noqa: E402


def run_one(method: str, seed: int, out_dir: Path, overrides: list[str]) -> dict:
    from diffalign.config import load_config
    from diffalign.train import train

    cfg = load_config(f"llm_{method}_arith.yaml", [
        f"seed={seed}", f"run_name=llm_{method}_arith_s{seed}", f"output.dir={out_dir}",
        "logging.progress_bar=false", "logging.tensorboard=false", "output.checkpoint_every=0",
        "output.save_final=false", *overrides,
    ])
    cpu, wall = time.process_time(), time.time()
    result = train(cfg)
    key = "arithmetic_reward"
    return {
        "method": method, "seed": seed, "steps": result.step,
        "before": result.start_eval[key], "after": result.end_eval[key],
        "gain": result.end_eval[key] - result.start_eval[key],
        "cpu_minutes": (time.process_time() - cpu) / 60, "wall_minutes": (time.time() - wall) / 60,
    }


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        gains = [r["gain"] for r in mine]
        out.append({
            "method": method, "seeds": [r["seed"] for r in mine], "before": mine[0]["before"],
            "after_mean": statistics.mean(r["after"] for r in mine),
            "gain_mean": statistics.mean(gains), "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "gain_min": min(gains), "gain_max": max(gains),
            "cpu_minutes_mean": statistics.mean(r["cpu_minutes"] for r in mine),
        })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo", "simpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_overrides_argument(parser)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "llm_embedded_gains")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            rows.append(run_one(method, seed, args.out, args.overrides))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    print(f"\n{'method':<8} {'before':>7} {'after':>7} {'gain mean':>10} {'gain std':>9} {'min..max':>14} {'CPU min':>8}")
    for s in summary:
        print(f"{s['method']:<8} {s['before']:7.3f} {s['after_mean']:7.3f} {s['gain_mean']:+10.3f} {s['gain_std']:9.3f} "
              f"{s['gain_min']:+6.3f}..{s['gain_max']:+6.3f} {s['cpu_minutes_mean']:8.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "summary": summary,
                                                       "overrides": args.overrides, "torch": torch.__version__},
                                                      indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()

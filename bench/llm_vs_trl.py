"""Throughput and peak memory of our text DPO / GRPO steps against trl's, same model and data.

    python bench/llm_vs_trl.py [--steps 20] [--repeats 3] [--model llm/arith]
                               [--out outputs/bench/llm_vs_trl.json]

Each (framework, method) runs in its own subprocess (so peak RSS is its own): full fine-tuning of
the same model, the same rows, batch sizes and generation settings, one torch thread, each
framework's own training loop (``diffalign.train.train`` / ``trl``'s ``Trainer.train``), each
case ``--repeats`` times with the two frameworks back to back, taking turns going first. Steps
are timed after ``--warmup`` steps (the median step); tokens/s counts the non-padding tokens a
step processes (DPO: prompt + chosen and prompt + rejected; GRPO: prompts + generated
completions). Prints a table and writes JSON. Needs trl (``pip install --no-deps trl`` works with
this project's pins). A benchmark: the tests only run it once on a minimal budget (no timing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [("ours", "dpo"), ("trl", "dpo"), ("ours", "grpo"), ("trl", "grpo")]


def _dpo_rows(n: int) -> list[dict]:
    from diffalign.llm import load_rows

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows("arith_dpo", "preference").rows[:n]]


def _dpo_tokens_per_step(adapter, rows: list[dict], batch: int) -> float:
    prompts = adapter.encode_prompts([r["prompt"] for r in rows])
    chosen = adapter.encode_completions([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = adapter.encode_completions([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    per_pair = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)) / len(rows)
    return per_pair * batch


COMPLETION_LENGTHS: list[int] = []


def recording_reward(prompts, completions, completion_ids=None, **columns):
    """The arithmetic reward, recording completion lengths (tokens, EOS included) for tokens/s."""
    from diffalign.llm.tasks import arithmetic_reward

    COMPLETION_LENGTHS.extend(len(ids) for ids in completion_ids)
    return arithmetic_reward(prompts, completions, **columns)


def run_case(framework: str, method: str, a) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from diffalign.llm import CausalLMAdapter, resolve_model_path

    out = Path(tempfile.mkdtemp())
    step_times: list[float] = []
    tokens = {"n": 0.0}
    adapter = CausalLMAdapter.from_pretrained(a.model)
    rows = _dpo_rows(a.rows) if method == "dpo" else None
    steps = a.warmup + a.steps

    if framework == "ours":
        from diffalign.config import parse_config
        from diffalign.train import train

        if method == "dpo":
            opts = {"name": "llm_dpo", "dataset": rows, "beta": 0.1}
            batch = a.dpo_batch
        else:
            opts = {"name": "llm_grpo", "dataset": "arith:align", "prompts_per_generation": a.prompts,
                    "reward_funcs": ["__main__.recording_reward"],
                    "num_generations": a.generations, "max_completion_length": 6, "temperature": 0.6,
                    "loss_type": "dapo", "epsilon_high": 0.28}
            batch = a.prompts * a.generations
        cfg = parse_config({
            "model": {"family": "causal_lm", "path": a.model, "training": "full"}, "method": opts,
            "optimization": {"lr": 1e-5, "batch_size": batch, "max_steps": steps, "weight_decay": 0.0},
            "logging": {"every": 1, "tensorboard": False, "progress_bar": False},
            "output": {"dir": str(out), "save_final": False},
        })
        result = train(cfg)
        rows_logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        step_times = [r["time"] for r in rows_logged if "loss" in r]
    else:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step_times.append(time.perf_counter())

        common = dict(output_dir=str(out), max_steps=steps, learning_rate=1e-5, weight_decay=0.0, report_to="none",
                      save_strategy="no", logging_steps=10_000, use_cpu=True, bf16=False, lr_scheduler_type="constant",
                      dataloader_num_workers=0, gradient_checkpointing=False)  # trl defaults to True; ours is off
        if method == "dpo":
            args = trl.DPOConfig(per_device_train_batch_size=a.dpo_batch, beta=0.1, loss_type=["sigmoid"], **common)
            trainer = trl.DPOTrainer(model=adapter.model.requires_grad_(True), args=args,
                                     train_dataset=Dataset.from_list(rows), processing_class=adapter.tokenizer,
                                     callbacks=[Timer()])
        else:
            from diffalign.llm.tasks import arithmetic_rows

            args = trl.GRPOConfig(per_device_train_batch_size=a.prompts * a.generations, num_generations=a.generations,
                                  max_completion_length=6, temperature=0.6, loss_type="dapo", epsilon_high=0.28,
                                  beta=0.0, **common)
            trainer = trl.GRPOTrainer(model=resolve_model_path(a.model), reward_funcs=[recording_reward], args=args,
                                      train_dataset=Dataset.from_list(arithmetic_rows("align")),
                                      processing_class=adapter.tokenizer, callbacks=[Timer()])
        trainer.train()
    if method == "dpo":
        tokens["n"] = _dpo_tokens_per_step(adapter, rows, a.dpo_batch)
    else:  # the same prompts on average; the completions each framework sampled
        mean_length = sum(COMPLETION_LENGTHS) / len(COMPLETION_LENGTHS)
        tokens["n"] = a.prompts * a.generations * (mean_length + _mean_prompt_tokens(adapter))
    timed = step_times[a.warmup:]
    durations = [end - start for start, end in zip(timed, timed[1:])]
    seconds_per_step = statistics.median(durations)  # robust to the odd stalled step on a shared machine
    return {"framework": framework, "method": method, "steps_timed": len(durations),
            "seconds_per_step": seconds_per_step, "mean_seconds_per_step": sum(durations) / len(durations),
            "tokens_per_step": tokens["n"],
            "tokens_per_second": tokens["n"] / seconds_per_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _mean_prompt_tokens(adapter) -> float:
    from diffalign.llm.tasks import arithmetic_rows

    ids = adapter.encode_prompts([r["prompt"] for r in arithmetic_rows("align", 200)])
    return sum(map(len, ids)) / len(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llm/arith")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512, help="DPO pairs used")
    parser.add_argument("--dpo-batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16, help="GRPO prompts per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, the frameworks taking turns first")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "llm_vs_trl.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # framework:method, run in a subprocess
    a = parser.parse_args(argv)
    if a.case:
        print("RESULT " + json.dumps(run_case(*a.case.split(":"), a)))
        return
    runs = []
    for repeat in range(a.repeats):
        for method in dict.fromkeys(m for _, m in CASES):
            # the two frameworks run back to back and take turns going first: the machine's
            # drift over a run (10-40% here) falls on both, and the per-repeat ratio pairs them
            order = ["ours", "trl"] if repeat % 2 == 0 else ["trl", "ours"]
            for framework in order:
                runs.append({"repeat": repeat, **run_subprocess(framework, method, a)})
                print(json.dumps(runs[-1]), flush=True)
    results = summarize(runs)
    print(f"\n{'method':<6} {'framework':<9} {'s/step':>8} {'tokens/s':>10} {'peak RSS MB':>12}  (medians of "
          f"{a.repeats} runs)")
    for r in results:
        print(f"{r['method']:<6} {r['framework']:<9} {r['seconds_per_step']:8.3f} {r['tokens_per_second']:10.0f} "
              f"{r['peak_rss_mb']:12.0f}")
    for r in results:
        if r["framework"] == "trl":
            print(f"{r['method']}: trl / ours time per step, median over repeats {r['trl_over_ours']:.2f} "
                  f"(each repeat: {', '.join(f'{x:.2f}' for x in r['trl_over_ours_by_repeat'])}; > 1: ours faster)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"results": results, "runs": runs, "args": {k: str(v) for k, v in vars(a).items()}},
                                indent=2) + "\n")
    print(f"wrote {a.out}")


def run_subprocess(framework: str, method: str, a) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{framework}:{method}", "--model", a.model, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--rows", str(a.rows), "--dpo-batch", str(a.dpo_batch),
           "--prompts", str(a.prompts), "--generations", str(a.generations)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{framework}:{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def summarize(runs: list[dict]) -> list[dict]:
    """Per (framework, method): the medians over repeats; for trl also its time per step over
    ours in the same repeat."""
    out = []
    for framework, method in CASES:
        mine = [r for r in runs if r["framework"] == framework and r["method"] == method]
        row = {"framework": framework, "method": method, "repeats": len(mine),
               **{k: statistics.median(r[k] for r in mine)
                  for k in ("seconds_per_step", "tokens_per_step", "tokens_per_second", "peak_rss_mb")}}
        if framework == "trl":
            ours = {r["repeat"]: r for r in runs if r["framework"] == "ours" and r["method"] == method}
            ratios = [r["seconds_per_step"] / ours[r["repeat"]]["seconds_per_step"] for r in mine]
            row.update(trl_over_ours_by_repeat=ratios, trl_over_ours=statistics.median(ratios))
        out.append(row)
    return out


if __name__ == "__main__":
    main()

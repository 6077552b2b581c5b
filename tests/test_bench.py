"""Smoke tests of the image benchmarks: each script starts, runs on a minimal budget with tiny
models and writes its JSON with the expected keys. No timing is asserted (benchmarks measure;
tests do not)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# online methods shrunk to a few network calls per rollout
QUICK = [
    "grpo:method.num_steps=2", "grpo:method.group_size=2", "grpo:method.prompts_per_rollout=1",
    "awm:method.num_steps=2", "awm:method.group_size=2", "awm:method.timesteps_per_sample=2",
    "branch_grpo:method.num_steps=3", "branch_grpo:method.split_steps=[0,1]",
    "spo:method.num_steps=3", "spo:method.divert_start=1", "spo:method.num_candidates=2",
    "spo:method.prompts_per_rollout=1", "sft:optimization.batch_size=2", "diffusion_dpo:optimization.batch_size=2",
]


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_writes_every_method(tmp_path):
    out = tmp_path / "overhead.json"
    argv = ["--model", "tiny:sd3", "--steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "runs"),
            "--out", str(out)]
    for item in QUICK:
        argv += ["--set", item]
    assert _load("overhead").main(argv) == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"sft", "diffusion_dpo", "grpo", "awm", "branch_grpo", "spo"}
    for method, r in results.items():
        for key in ("update_s", "bare_s", "overhead_update", "nfe_update_per_step", "nfe_per_iteration",
                    "cpu_s_per_iteration", "bare_includes"):
            assert r[key] is not None, (method, key)
        # the bare step makes exactly the network calls our update makes
        assert r["nfe_bare_per_step"] == r["nfe_update_per_step"], method
        assert r["nfe_mismatched_steps"] == 0, method
    for method in ("grpo", "awm", "branch_grpo", "spo"):
        assert results[method]["rollout_nfe"] > 0 and results[method]["steps_per_iteration"] >= 1
    assert results["diffusion_dpo"]["nfe_update_per_step"] == 4 * 2  # policy + reference on 2 x 2 images


def test_memory_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    argv = ["--model", "tiny:sd3", "--methods", "sft", "--trainings", "lora", "full", "--steps", "1",
            "--set", "optimization.batch_size=2", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    assert _load("memory").main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["method"], r["training"]) for r in results] == [("sft", "lora"), ("sft", "full")]
    for r in results:
        assert r["peak_rss_mb"] >= r["baseline_peak_rss_mb"] > 0
        assert r["trainable_params"] > 0
    assert results[1]["trainable_params"] > results[0]["trainable_params"]  # full > LoRA


def test_dpo_vs_diffusers_losses_agree(tmp_path):
    out = tmp_path / "dpo.json"
    argv = ["--model", "tiny:sd", "--steps", "2", "--warmup", "1", "--batch", "2", "--workdir", str(tmp_path / "runs"),
            "--out", str(out)]
    assert _load("dpo_vs_diffusers").main(argv) == 0
    r = json.loads(out.read_text())["result"]
    for key in ("ours_it_per_s", "diffusers_it_per_s", "ratio_ours_over_diffusers", "loss_ours", "loss_diffusers",
                "loss_abs_diff", "grad_max_abs_diff"):
        assert r[key] is not None, key
    assert r["nfe_per_step_ours"] == r["nfe_per_step_diffusers"] == 8
    assert r["steps_side_first"] == 1  # of 2 timed steps: the two implementations take turns going first
    # same weights, same inputs: the same loss and gradients (the trained LoRA is non-zero)
    assert r["loss_abs_diff"] <= 1e-5
    assert r["grad_max_abs_diff"] <= 1e-5 * max(1.0, r["grad_max_abs"])


def test_alignment_writes_curves_and_plot(tmp_path):
    recipe = tmp_path / "grpo_tiny.yaml"
    recipe.write_text("""
run_name: grpo_tiny
model: {family: sd3, tiny: true, lora: {rank: 4}}
method:
  name: grpo
  prompts: world:align
  prompts_per_rollout: 1
  group_size: 2
  num_steps: 2
  guidance_scale: 3.0
  eval_prompts: world:heldout
  eval_max_prompts: 1
  eval_num_steps: 2
  eval_rewards: {verifier: {name: shapes, mode: strict}, shapes: {name: shapes}}
rewards: {jpeg_incompressibility: 1.0}
optimization: {lr: 1.0e-3, batch_size: 4, max_steps: 2}
logging: {every: 1, tensorboard: false}
""")
    out = tmp_path / "alignment.json"
    argv = ["--recipes", str(recipe), "--seeds", "0", "1", "--steps", "2", "--eval-every", "2",
            "--set", "grpo_tiny:logging.eval_every=1",  # a recipe's own override wins over --eval-every
            "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    assert _load("alignment").main(argv) == 0
    data = json.loads(out.read_text())
    assert Path(data["plot"]).is_file() and Path(data["plot"]).stat().st_size > 0
    (summary,) = data["summary"]
    assert summary["method"] == "grpo" and summary["seeds"] == [0, 1]
    assert [p["step"] for p in summary["curve"]] == [0, 1, 2]
    # per step: a rollout of 2 samples x 2 steps and an update on 4 transitions, CFG doubling both
    assert [p["nfe"]["mean"] for p in summary["curve"]] == [0, 16, 32]
    for point in summary["curve"]:
        for key in ("cpu_s", "reward", "accuracy"):
            assert point[key]["mean"] is not None and point[key]["std"] is not None
    run = data["runs"][0]
    assert run["eval_every"] == 1
    assert run["reward_key"] == "eval/shapes" and run["accuracy_key"] == "eval/verifier"
    assert run["train_reward"] and "nfe" in run["train_reward"][0]

    # --merge: the two seeds written by separate processes give back the same summary
    parts = []
    for i, part in enumerate(data["runs"]):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({"runs": [part]}))
    merged = tmp_path / "merged.json"
    assert _load("alignment").main(["--merge", *map(str, parts), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["summary"] == data["summary"]
    with pytest.raises(SystemExit, match="part9.json"):
        _load("alignment").main(["--merge", str(tmp_path / "part9.json"), "--out", str(merged)])


def test_llm_vs_trl_pairs_each_repeat(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "llm.json"
    argv = ["--steps", "2", "--warmup", "1", "--repeats", "2", "--rows", "16", "--dpo-batch", "4", "--prompts", "2",
            "--generations", "2", "--out", str(out)]
    _load("llm_vs_trl").main(argv)
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 8  # 2 repeats x 2 methods x 2 frameworks
    firsts = [data["runs"][i]["framework"] for i in (0, 4)]
    assert firsts == ["ours", "trl"]  # the frameworks take turns going first
    for r in data["results"]:
        assert r["repeats"] == 2
        for key in ("seconds_per_step", "tokens_per_second", "peak_rss_mb"):  # measured, not judged
            assert r[key] is not None, key
        if r["framework"] == "trl":
            assert len(r["trl_over_ours_by_repeat"]) == 2 and r["trl_over_ours"] is not None


@pytest.mark.parametrize("name", ["overhead", "memory", "dpo_vs_diffusers", "alignment", "llm_vs_trl"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out

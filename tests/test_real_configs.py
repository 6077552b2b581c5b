"""Every real-model recipe in configs/ runs with the family's tiny model swapped in.

``--set model.tiny=true`` is the one override that makes a recipe runnable on a CPU without
weights (tiny model, tiny reward stand-ins); the others below only make it quick.
"""

from pathlib import Path

import pytest

from diffalign.config import configs_dir, load_config
from diffalign.run_log import read_metrics
from diffalign.train import train

QUICK = {
    "grpo": ["method.num_steps=3", "method.group_size=2", "method.prompts_per_rollout=1",
             "method.eval_max_prompts=1", "optimization.batch_size=4", "optimization.gradient_accumulation_steps=1"],
    "sft": ["optimization.batch_size=2"],
    "branch_grpo": ["method.num_steps=4", "method.split_steps=[0,2]", "method.prompts_per_rollout=1",
                    "method.eval_max_prompts=1", "optimization.batch_size=4", "optimization.gradient_accumulation_steps=1"],
    "awm": ["method.num_steps=2", "method.group_size=2", "method.prompts_per_rollout=1", "method.timesteps_per_sample=2",
            "method.eval_max_prompts=1", "optimization.batch_size=4", "optimization.gradient_accumulation_steps=1"],
    **dict.fromkeys(["diffusion_dpo", "smpo", "inpo"], [
        "optimization.batch_size=2", "optimization.gradient_accumulation_steps=1",
        "method.eval_max_prompts=1", "method.eval_num_steps=2"]),
    **dict.fromkeys(["llm_dpo", "llm_simpo"], [
        "optimization.batch_size=2", "optimization.gradient_accumulation_steps=1", "method.max_rows=8",
        "method.eval_max_rows=2", "method.eval_max_new_tokens=4"]),
    "spo": ["method.num_steps=3", "method.divert_start=1", "method.num_candidates=2", "method.threshold=0.0",
            "method.prompts_per_rollout=1", "method.eval_max_prompts=1", "method.eval_num_steps=2",
            "optimization.batch_size=2", "optimization.gradient_accumulation_steps=1"],
    "step_aware_pm": ["optimization.batch_size=2", "optimization.gradient_accumulation_steps=1",
                      "method.eval_max_pairs=2", "method.eval_timesteps=[0,500]"],
    "llm_grpo": ["method.prompts_per_generation=1", "method.num_generations=2", "method.max_completion_length=4",
                 "method.max_rows=8", "method.eval_max_rows=2", "method.eval_max_new_tokens=4",
                 "optimization.batch_size=2", "optimization.gradient_accumulation_steps=1"],
}


def _real_model_configs() -> list[str]:
    names = []
    for path in sorted(configs_dir().glob("*.yaml")):
        cfg = load_config(path)
        if not cfg.model.tiny and not str(cfg.model.path).startswith("world/"):
            names.append(path.name)
    return names


@pytest.mark.parametrize("name", _real_model_configs())
def test_recipe_runs_tiny(name, tmp_path):
    method = load_config(name).method.name
    overrides = ["model.tiny=true", "optimization.max_steps=1", f"output.dir={tmp_path}",
                 "logging.tensorboard=false", "logging.progress_bar=false", "output.checkpoint_every=0"]
    cfg = load_config(name, overrides + QUICK.get(method, []))
    result = train(cfg)
    assert result.step == 1
    assert read_metrics(Path(result.output_dir) / "metrics.jsonl")[-1]["step"] == 1


def _world_configs() -> list[str]:
    return [p.name for p in sorted(configs_dir().glob("*.yaml")) if str(load_config(p).model.path).startswith("world/")]


# the world recipes' data settings, shrunk (synthetic pairs: 1 prompt x 2 images, 2 steps)
WORLD_QUICK = {
    "data": ["data.path={tmp}/pairs", "data.synthetic.prompts=[a red circle]", "data.synthetic.images_per_prompt=2",
             "data.synthetic.prompt_repeats=1", "data.synthetic.num_steps=2"],
    "eval": ["method.eval_images_per_prompt=1", "method.eval_num_steps=2"],
}


@pytest.mark.parametrize("name", _world_configs())
def test_world_recipe_runs_on_the_tiny_world(name, tiny_world, tmp_path):
    """Each configs/*_shapes.yaml runs one step on the tiny world models (the shipped ones are slow)."""
    base = load_config(name)
    overrides = ["optimization.max_steps=1", f"output.dir={tmp_path}", "logging.tensorboard=false",
                 "logging.progress_bar=false", "output.checkpoint_every=0", "logging.eval_every=0",
                 *QUICK.get(base.method.name, [])]
    if "shapes" in base.rewards:  # the tiny world's random models rarely meet a requirement: ties everywhere
        overrides.append("rewards={world_clip: 1.0}")
    if base.data.source == "synthetic":
        overrides += [item.format(tmp=tmp_path) for item in WORLD_QUICK["data"]]
    if getattr(base.method.options, "eval_prompts", None) is not None:
        overrides += WORLD_QUICK["eval"]
    if "step_aware" in base.rewards:  # SPO scores with the step-aware model its own recipe trains
        pm = train(load_config("step_aware_pm_shapes.yaml", [
            "optimization.max_steps=1", f"output.dir={tmp_path}/pm", "logging.progress_bar=false", "logging.tensorboard=false",
            "output.checkpoint_every=0", "logging.eval_every=0", *QUICK["step_aware_pm"],
            *[item.format(tmp=tmp_path) for item in WORLD_QUICK["data"]], "rewards={world_clip: 1.0}"]))
        overrides.append(f"rewards.step_aware.path={pm.output_dir / 'final'}")
    result = train(load_config(name, overrides))
    assert result.step == 1

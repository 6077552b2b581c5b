"""``diffalign demo`` end to end on tiny world models: trains, reloads, writes grid and curve."""

import torch

from diffalign.cli import main

QUICK = ["method.num_steps=2", "method.group_size=2", "method.prompts_per_rollout=1", "method.eval_max_prompts=2",
         "method.eval_num_steps=2", "method.timesteps_per_sample=2", "method.eval_images_per_prompt=1", "optimization.batch_size=4",
         "optimization.gradient_accumulation_steps=1", "optimization.max_steps=2", "logging.eval_every=0",
         "logging.progress_bar=false",
         # the tiny world's random models rarely meet a requirement; world CLIP scores always spread
         "rewards={world_clip: 1.0}"]


def test_demo_trains_reports_accuracy_and_writes_grid_and_curve(tiny_world, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffalign.demo import grid_prompts
    from diffalign.models import load_model
    from diffalign.world import kind_of

    overrides = [arg for item in [f"output.dir={tmp_path}", *QUICK] for arg in ("--set", item)]
    assert main(["demo", *overrides]) == 0
    out = capsys.readouterr().out
    assert "held-out verifier accuracy" in out and "% -> " in out and "requirements met" in out
    run = tmp_path / "awm_shapes"
    assert (run / "demo_grid" / "grid.png").is_file() and (run / "demo_grid" / "index.html").is_file()
    assert (run / "reward_curve.png").is_file()
    # every prompt kind is in the grid, two prompts each
    kinds = [kind_of(p) for p in grid_prompts()]
    assert len(kinds) == 2 * len(set(kinds)) >= 8
    # the adapter trained (non-zero LoRA up-weights) and reloads onto the world model
    weights = load_file(next((run / "final").glob("*.safetensors")))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    aligned = load_model("world/sd", adapter_dir=run / "final")
    assert any("lora" in name for name, _ in aligned.denoiser.named_parameters())


def test_demo_refuses_a_non_world_recipe(capsys):
    assert main(["demo", "--cfg", "sft_tiny.yaml"]) == 2
    assert "shapes world" in capsys.readouterr().err

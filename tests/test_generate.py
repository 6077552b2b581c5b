"""Generation with RLG, evaluate, grid and plot on tiny models; clear errors on bad input."""

import json

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.generate import generate_images
from diffalign.models import load_model
from diffalign.pipelines import build_tiny
from diffalign.rlg import rlg_predict

PROMPTS = ["a red circle", "two blue squares"]


def _perturbed_lora(family="sd3"):
    adapter = build_tiny(family)
    adapter.add_lora(rank=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


@pytest.fixture
def adapter_dir(tmp_path):
    adapter = _perturbed_lora()
    adapter.save_trained(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_rlg_endpoints_are_exactly_base_and_adapter(family):
    adapter = _perturbed_lora(family)
    kwargs = dict(num_steps=3, guidance_scale=3.0)
    tuned = generate_images(adapter, PROMPTS, [0], **kwargs)
    with adapter.reference():
        base = generate_images(adapter, PROMPTS, [0], **kwargs)
    assert not torch.equal(tuned, base)
    assert torch.equal(generate_images(adapter, PROMPTS, [0], rlg_scale=0.0, **kwargs), base)
    assert torch.equal(generate_images(adapter, PROMPTS, [0], rlg_scale=1.0, **kwargs), tuned)
    # the dial is continuous: w = 0.5 lies between the two
    half = generate_images(adapter, PROMPTS, [0], rlg_scale=0.5, **kwargs)
    assert 0 < (half - base).abs().mean() < (tuned - base).abs().mean()


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_one_batched_call_equals_two_separate_calls(family):
    adapter = _perturbed_lora(family)
    cond = adapter.encode_prompt(PROMPTS)
    x = adapter.initial_noise(2, generator=torch.Generator().manual_seed(0))
    t = adapter.sampling_schedule(4).timesteps[1]
    with torch.no_grad():
        mixed = rlg_predict(adapter, x, t, cond, 3.0, 1.5)
        aligned = adapter.predict(x, t, cond, 3.0)
        with adapter.reference():
            base = adapter.predict(x, t, cond, 3.0)
    torch.testing.assert_close(mixed, base + 1.5 * (aligned - base), atol=1e-5, rtol=1e-4)


def test_generate_cli_writes_pngs_with_settings(tmp_path, adapter_dir):
    out = tmp_path / "gen"
    code = main(["generate", "--model", "tiny:sd3", "--adapter", str(adapter_dir), "--prompt", "a red circle",
                 "--seeds", "0", "1", "--steps", "2", "--rlg-scale", "1.5", "--out", str(out)])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    info = Image.open(files[1]).text
    assert info["prompt"] == "a red circle" and info["seed"] == "1" and info["rlg_scale"] == "1.5"


def test_evaluate_grid_and_plot(tmp_path, adapter_dir):
    common = ["--model", "tiny:sd3", "--steps", "2", "--prompt-set", "world:heldout", "--max-prompts", "2"]
    code = main(["evaluate", *common, "--adapter", str(adapter_dir), "--rewards", "jpeg_compressibility",
                 "strict=shapes:mode=strict", "--rlg-scales", "0", "1", "2", "--out", str(tmp_path / "ev")])
    assert code == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert set(results) == {"base", "rlg_0", "adapter", "rlg_2"}
    assert results["rlg_0"]["jpeg_compressibility"]["win_rate_vs_base"] == 0.5  # identical images tie
    assert "win vs base" in (tmp_path / "ev" / "results.md").read_text()

    code = main(["grid", *common, "--columns", "base", str(adapter_dir), "--rewards", "jpeg_compressibility",
                 "--out", str(tmp_path / "grid")])
    assert code == 0
    assert (tmp_path / "grid" / "grid.png").is_file() and "cell_01_01.png" in (tmp_path / "grid" / "index.html").read_text()
    code = main(["grid", *common, "--adapter", str(adapter_dir), "--rlg-scales", "0", "1.5", "--out", str(tmp_path / "g2")])
    assert code == 0

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "reward": s / 10}) for s in range(1, 6)))
    assert main(["plot", str(run), "--keys", "reward", "--out", str(tmp_path / "curve.png")]) == 0
    assert Image.open(tmp_path / "curve.png").size[0] > 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
        (["generate", "--model", "tiny:sd3", "--adapter", "/nonexistent/lora", "--prompt", "x"], "holds no diffalign training output"),
        (["generate", "--model", "world/sd5", "--prompt", "x"], "unknown world model"),
        (["generate", "--model", "tiny:sd3", "--rlg-scale", "2", "--prompt", "x"], "--rlg-scale needs --adapter"),
        (["plot", "/nonexistent/run"], "No such file|does not exist"),
    ],
)
def test_bad_inputs_give_clear_errors(args, message, capsys):
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    assert main(["generate", "--model", "tiny:sd3", "--prompt-file", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err


def test_world_requirement_rates_count_each_requirement_type():
    """Evaluations on world prompts report how often each verifier requirement is met: all of
    them on the renderer's own scenes; with the captions shifted by one, presence fails."""
    from diffalign.evaluation import _RequirementRates, _world_kinds
    from diffalign.world import render_batch

    prompts = ["a red circle", "two cyan squares", "a magenta triangle left of a yellow circle",
               "a blue square and a green triangle"]
    assert _world_kinds(prompts) is not None and _world_kinds(["a photo of a cat"]) is None
    images = render_batch(prompts, rng=0)
    own = _RequirementRates()
    own.add(images, prompts)
    assert own.rates() == {"world_met/count": 1.0, "world_met/only_requested": 1.0, "world_met/present": 1.0,
                           "world_met/relation": 1.0}
    shifted = _RequirementRates()
    shifted.add(images, prompts[1:] + prompts[:1])
    assert shifted.rates()["world_met/present"] < 0.5 and shifted.total["relation"] == 1

"""The shared training loop: exact resume, atomic checkpoints, NaN guard, accelerate launch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import diffalign.checkpoint as checkpoint_module
from diffalign.checkpoint import checkpoint_dirs, latest_checkpoint
from diffalign.config import load_config
from diffalign.run_log import read_metrics
from diffalign.train import adamw, train
from diffalign.trainers import register_trainer
from diffalign.trainers.sft import SFTTrainer

from helpers import assert_same_final_lora, final_lora

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    base = [f"output.dir={tmp_path}", "logging.tensorboard=false", "logging.progress_bar=false",
            "optimization.batch_size=4", "optimization.gradient_accumulation_steps=2"]
    return load_config("sft_tiny.yaml", base + list(overrides))


def test_resume_continues_exactly(tmp_path):
    straight = train(_cfg(tmp_path, "run_name=straight", "optimization.max_steps=4"))
    first = train(_cfg(tmp_path, "run_name=split", "optimization.max_steps=2", "output.checkpoint_every=2"))
    assert latest_checkpoint(first.output_dir / "checkpoints").name == "step_000002"
    resumed = train(_cfg(tmp_path, "run_name=split", "optimization.max_steps=4"), resume=True)
    assert resumed.step == 4
    assert_same_final_lora(straight.output_dir, resumed.output_dir)
    # and training really moved the weights away from the (gaussian-initialised) start
    rows = read_metrics(straight.output_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in rows)


def test_interrupted_checkpoint_leaves_previous_usable(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = checkpoint_module.save_file

    def crash_on_second_checkpoint(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "run_name=crash", "optimization.max_steps=4", "output.checkpoint_every=1"))
    root = tmp_path / "crash" / "checkpoints"
    assert [p.name for p in checkpoint_dirs(root)] == ["step_000001"]
    assert (root / ".tmp-step_000002").is_dir()  # the half-written one is ignored
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    result = train(_cfg(tmp_path, "run_name=crash", "optimization.max_steps=3", "output.checkpoint_every=1"), resume=True)
    assert result.step == 3
    assert [p.name for p in checkpoint_dirs(root)] == ["step_000002", "step_000003"]  # keep_last=2


def test_resume_refuses_a_different_model_or_method(tmp_path):
    train(_cfg(tmp_path, "run_name=r", "optimization.max_steps=1", "output.checkpoint_every=1"))
    with pytest.raises(Exception, match="'model' section differs"):
        train(_cfg(tmp_path, "run_name=r", "optimization.max_steps=2", "model.lora.rank=8"), resume=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_cfg(tmp_path, "run_name=fresh", "optimization.max_steps=2"), resume=True)


@register_trainer
class _NaNAfterTwoSteps(SFTTrainer):
    """SFT whose loss turns NaN after two micro-batches (to exercise the guard)."""

    name = "_test_nan_sft"
    calls = 0

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        type(self).calls += 1
        return (loss * float("nan") if type(self).calls > 2 else loss), metrics


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    cfg = _cfg(tmp_path, "run_name=nan", "optimization.max_steps=10", "optimization.max_nonfinite_steps=3",
               "optimization.gradient_accumulation_steps=1")
    cfg.method.name = "_test_nan_sft"
    _NaNAfterTwoSteps.calls = 0
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row had a NaN/Inf.*max_nonfinite_steps=3"):
        train(cfg)
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # the NaN steps never updated the weights


def test_accelerate_launch_runs_train_script(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "sft_tiny.yaml").read_text())
    config.update(run_name="launched", output={"dir": str(tmp_path)})
    config["optimization"].update(max_steps=2, batch_size=2)
    config["logging"] = {"progress_bar": False, "tensorboard": False}
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(accelerate), "launch", "diffalign/train.py", "--cfg", str(cfg_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "launched" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert len(read_metrics(tmp_path / "launched" / "metrics.jsonl")) == 2


def test_loop_adamw_is_bit_identical_to_torch_default():
    """``adamw`` takes the multi-tensor path on the CPU (faster); the updates are the same bits."""
    torch.manual_seed(0)
    shapes = [(8, 16), (16,), (4, 4, 3, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = adamw(ours, lr=1e-2, weight_decay=1e-2)
    opt_plain = torch.optim.AdamW(plain, lr=1e-2, weight_decay=1e-2)
    assert opt_ours.defaults["foreach"] is True and opt_plain.defaults["foreach"] is None
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in ((ours, opt_ours), (plain, opt_plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)
        assert not torch.equal(a, torch.zeros_like(a))


def test_fused_adamw_option_trains_like_adamw(tmp_path, monkeypatch):
    """``optimization.optimizer: adamw_fused`` swaps in torch's fused kernel: the same run to
    rounding (not bit for bit), and weights that moved."""
    import diffalign.train as train_module

    built = []

    def recording_adamw(params, **options):
        optimizer = adamw(params, **options)
        built.append(optimizer.defaults["fused"])
        return optimizer

    monkeypatch.setattr(train_module, "adamw", recording_adamw)
    plain = train(_cfg(tmp_path, "run_name=plain", "optimization.max_steps=3"))
    fused = train(_cfg(tmp_path, "run_name=fused", "optimization.max_steps=3", "optimization.optimizer=adamw_fused"))
    assert built == [None, True]
    a, b = final_lora(plain.output_dir), final_lora(fused.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    # the tolerance is far below what the steps moved
    start = train(_cfg(tmp_path, "run_name=start", "optimization.max_steps=1", "optimization.lr=1e-12"))
    moved = max((a[k] - v).abs().max().item() for k, v in final_lora(start.output_dir).items())
    assert moved > 1e-3


def test_unknown_optimizer_is_refused(tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="optimization.optimizer: must be one of"):
        _cfg(tmp_path, "optimization.optimizer=sgd")

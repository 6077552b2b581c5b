"""The model-adapter interface shared by every pipeline family.

An adapter wraps the components of a diffusers pipeline (it holds the pipeline object itself and
calls its own prompt encoding, latent packing and LoRA saving) and exposes the handful of
operations every alignment method needs:

- ``encode_prompt(prompts) -> Cond``: family-specific conditioning tensors, batch first.
- ``predict(x, t, cond, guidance_scale)``: one batched denoiser call with classifier-free
  guidance. ``x`` is always an *unpacked* latent ``[B, C, h, w]`` (Flux packs inside), ``t`` is in
  the adapter's time units: the integer DDPM timestep for epsilon/v models, sigma in [0, 1] for
  flow models. The adapter converts ``t`` to whatever its network expects.
- the noise schedule: ``sampling_schedule(num_steps, latent_hw)`` for samplers,
  ``sample_train_timesteps`` / ``add_noise`` / ``training_target`` for training losses.
- ``encode_images`` / ``decode`` with the family's VAE scaling and shift.
- LoRA via peft (``add_lora``), full fine-tuning (``enable_full_finetune``), the frozen base as
  ``reference()``, and saving in the format ``pipe.load_lora_weights(dir)`` reads.

Samplers, trainers and rewards only ever talk to this interface.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import Tensor

from diffalign.wrapping import TrainingWrapperSlot

LORA_TARGETS_DEFAULT = ("to_k", "to_q", "to_v", "to_out.0")
TRAINED_INFO_FILE = "diffalign_trained.json"

_MODEL_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """``model.dtype`` (a diffusers model's compute dtype), cached until the model's first
    parameter changes dtype (``.to(dtype)``, most layerwise castings) or ``DiffusionAdapter.to``
    runs (after a layerwise casting that skips the first parameter, call it).

    diffusers walks every submodule looking for layerwise-casting hooks on each ``.dtype``: 1.8 ms
    on the world's LoRA'd UNet, read on every denoiser call (``bench/dpo_vs_diffusers.py``).
    """
    first = next(model.parameters()).dtype
    cached = _MODEL_DTYPES.get(model)
    if cached is None or cached[0] != first:
        cached = _MODEL_DTYPES[model] = (first, model.dtype)
    return cached[1]


# --------------------------------------------------------------------------------------------
# Conditioning and schedules
# --------------------------------------------------------------------------------------------


@dataclass
class Cond:
    """Prompt conditioning for a batch: family-specific tensors, every one batch-first.

    ``embeds`` is the positive branch; ``negative`` the unconditional branch used by
    classifier-free guidance (``None`` when the family uses none, e.g. Flux with embedded
    guidance).
    """

    embeds: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return next(iter(self.embeds.values())).shape[0]

    def _map(self, fn) -> "Cond":
        neg = None if self.negative is None else {k: fn(v) for k, v in self.negative.items()}
        return Cond({k: fn(v) for k, v in self.embeds.items()}, neg)

    def select(self, index: Tensor | slice | list[int]) -> "Cond":
        """Rows ``index`` of every tensor (a sub-batch)."""
        return self._map(lambda v: v[index])

    def repeat_interleave(self, n: int) -> "Cond":
        """Each row repeated ``n`` times in place (prompt -> group of ``n`` samples)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def to(self, device=None, dtype=None) -> "Cond":
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return self._map(move)

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        first = conds[0]
        embeds = {k: torch.cat([c.embeds[k] for c in conds]) for k in first.embeds}
        negative = None
        if first.negative is not None:
            negative = {k: torch.cat([c.negative[k] for c in conds]) for k in first.negative}
        return Cond(embeds, negative)


@dataclass
class SamplingSchedule:
    """The discretisation a sampler walks: ``num_steps`` steps between ``num_steps + 1`` levels.

    ``timesteps[i]`` is the value passed to ``adapter.predict`` at step ``i`` (level ``i`` to
    ``i + 1``). Epsilon/v models fill ``alphas_cumprod`` (alpha-bar at each level; the last one is
    the scheduler's final alpha), flow models fill ``sigmas`` (ending at 0).
    """

    timesteps: Tensor
    alphas_cumprod: Tensor | None = None
    sigmas: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def is_flow(self) -> bool:
        return self.sigmas is not None


# --------------------------------------------------------------------------------------------
# The adapter base
# --------------------------------------------------------------------------------------------


class PromptSetting:
    """An adapter attribute that shapes prompt embeddings (e.g. ``max_sequence_length``):
    assigning it on an instance drops the cached negative-prompt embedding, which was encoded
    with the old value."""

    def __init__(self, default) -> None:
        self.default = default

    def __set_name__(self, owner, name: str) -> None:
        self.attribute = f"_{name}"

    def __get__(self, adapter, owner=None):
        return self if adapter is None else getattr(adapter, self.attribute, self.default)

    def __set__(self, adapter, value) -> None:
        setattr(adapter, self.attribute, value)
        adapter._negative_cache = None


class DiffusionAdapter(TrainingWrapperSlot, abc.ABC):
    """Base class: everything that is the same for SD1.5, SDXL, SD3 and Flux.

    A family adapter implements ``_encode`` and ``_forward`` (and inherits the schedule from
    ``EpsilonAdapter`` or ``FlowAdapter``) plus a ``tiny`` builder.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[type]
    denoiser_name: ClassVar[str]  # "unet" or "transformer"
    lora_layers_kwarg: ClassVar[str]  # save_lora_weights' argument for the denoiser's layers
    parameterization: str  # "epsilon", "v_prediction" or "flow"

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()
        self.training_mode = "frozen"  # becomes "lora" or "full"
        self._frozen_denoiser: torch.nn.Module | None = None  # reference for full fine-tuning
        self._use_reference = False
        self._lora_layers: tuple | None = None  # (peft adapter names, the LoRA layers)
        self._train_state: tuple | None = None  # what the last train() call set
        self._negative_cache: dict | None = None
        self.resolution: int | None = None  # overrides the native default image size

    # ---- components ---------------------------------------------------------------------

    @property
    def unwrapped_denoiser(self) -> torch.nn.Module:
        """The bare diffusers model inside the pipeline."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return next(self.unwrapped_denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.unwrapped_denoiser)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_resolution(self) -> int:
        """Image size used when none is given: ``self.resolution`` if set, else the native one."""
        return self.resolution or self._native_resolution()

    def _native_resolution(self) -> int:
        """The resolution the denoiser was built for (its sample size times the VAE factor)."""
        return int(self.unwrapped_denoiser.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for {self.family}, got {height}x{width}")
        return (self.latent_channels, height // f, width // f)

    def to(self, device=None, dtype=None) -> "DiffusionAdapter":
        self.pipe.to(device=device, dtype=dtype)
        if self._frozen_denoiser is not None:
            self._frozen_denoiser.to(device=device, dtype=dtype)
        self.clear_prompt_cache()
        _MODEL_DTYPES.clear()
        return self

    def clear_prompt_cache(self) -> None:
        """Forget the cached empty-prompt embedding (after a text encoder's weights change)."""
        self._negative_cache = None

    # ---- prompts ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Cond:
        """Encode prompts (and the unconditional branch) with the pipeline's own encoders.

        The empty negative prompt's embedding is computed once and cached (text encoders are
        frozen in every method of this suite).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        with torch.no_grad():
            embeds = self._encode(list(prompts))
            if not self.uses_negative_branch:
                return Cond(embeds, None)
            if negative_prompts is None:
                if self._negative_cache is None:
                    self._negative_cache = self._default_negative(embeds)
                negative = {k: v.expand(len(prompts), *v.shape[1:]).clone() for k, v in self._negative_cache.items()}
            else:
                if len(negative_prompts) != len(prompts):
                    raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
                negative = self._encode(list(negative_prompts))
        return Cond(embeds, negative)

    def _default_negative(self, embeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unconditional branch when no negative prompt is given: the empty prompt."""
        return self._encode([""])

    @property
    def uses_negative_branch(self) -> bool:
        """Whether guidance needs an unconditional branch (False for guidance-distilled Flux)."""
        return True

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's own prompt encoding for the positive branch, as named tensors."""

    # ---- denoiser --------------------------------------------------------------------------

    def predict(self, x: Tensor, t: Tensor | float, cond: Cond, guidance_scale: float = 1.0) -> Tensor:
        """The denoiser's prediction (eps, v or velocity) with classifier-free guidance.

        Guidance batches the unconditional and conditional branches into ONE network call
        (``uncond + w * (cond - uncond)``), exactly as the diffusers pipelines do, so a rollout
        and the training recomputation see identical batch compositions.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if len(cond) != x.shape[0]:
            raise ValueError(f"cond has {len(cond)} rows but x has {x.shape[0]}")
        if self._use_reference:  # the frozen base: the full-fine-tune copy, or the LoRA-disabled module
            denoiser = self._frozen_denoiser if self._frozen_denoiser is not None else self.unwrapped_denoiser
        else:
            denoiser = self.denoiser
        if guidance_scale == 1.0 or cond.negative is None:
            return self._forward(denoiser, x, t, cond.embeds, guidance_scale)
        both = {k: torch.cat([cond.negative[k], cond.embeds[k]]) for k in cond.embeds}
        out = self._forward(denoiser, torch.cat([x, x]), torch.cat([t, t]), both, guidance_scale)
        uncond, conditional = out.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    @abc.abstractmethod
    def _forward(self, denoiser, x: Tensor, t: Tensor, embeds: dict[str, Tensor], guidance_scale: float) -> Tensor:
        """One network call on unpacked latents; ``t`` in the adapter's time units."""

    # ---- schedule (implemented once in EpsilonAdapter and once in FlowAdapter) ---------------

    @abc.abstractmethod
    def sampling_schedule(self, num_steps: int, latent_hw: tuple[int, int] | None = None) -> SamplingSchedule:
        """The levels and model times of an ``num_steps``-step sampler, as the pipeline uses them."""

    @abc.abstractmethod
    def sample_train_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Random training times (the family's usual training distribution)."""

    @abc.abstractmethod
    def timesteps_from_uniform(self, u: Tensor) -> Tensor:
        """Training times at uniform quantiles ``u`` in [0, 1) (for stratified sampling)."""

    @abc.abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: ``x_t`` from clean latents and noise."""

    @abc.abstractmethod
    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses at ``(x_t, t)``: eps, v, or the velocity ``noise - x0``."""

    def initial_noise(
        self, batch: int, height: int | None = None, width: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard normal latents ``[B, C, h, w]`` (float32, drawn on CPU for reproducibility)."""
        height = height or self.default_resolution
        width = width or self.default_resolution
        shape = (batch, *self.latent_shape(height, width))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    # ---- VAE ---------------------------------------------------------------------------------

    def encode_images(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B,3,H,W]`` in [0, 1] -> scaled latents ``[B,C,h,w]`` (the denoiser's space)."""
        vae = self.vae
        with torch.no_grad():
            pixels = (images.to(device=next(vae.parameters()).device, dtype=model_dtype(vae)) * 2 - 1)
            dist = vae.encode(pixels).latent_dist
            latents = dist.sample(generator) if sample else dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images ``[B,3,H,W]`` in [0, 1] (float32). Gradients flow if enabled."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(model_dtype(vae)) / vae.config.scaling_factor + shift
        images = vae.decode(z).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # ---- training modes ----------------------------------------------------------------------

    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: list[str] | tuple[str, ...] = LORA_TARGETS_DEFAULT,
        dropout: float = 0.0,
        init: str | bool = "gaussian",
    ) -> None:
        """Attach a trainable LoRA (peft) to the denoiser; the base weights stay frozen.

        ``reference()`` then disables the adapter, giving the exact base model for free.
        """
        from peft import LoraConfig

        if self.training_mode != "frozen":
            raise RuntimeError(f"the denoiser is already in '{self.training_mode}' mode")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=list(target_modules),
            lora_dropout=dropout,
            init_lora_weights=init,
        )
        denoiser = self.unwrapped_denoiser
        denoiser.add_adapter(config)
        # LoRA parameters train in float32 even when the base is half precision
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.training_mode = "lora"

    def enable_full_finetune(self) -> None:
        """Train every denoiser weight; a frozen copy serves as ``reference()``."""
        if self.training_mode != "frozen":
            raise RuntimeError(f"the denoiser is already in '{self.training_mode}' mode")
        denoiser = self.unwrapped_denoiser
        self._frozen_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
        denoiser.requires_grad_(True)
        self.training_mode = "full"

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unwrapped_denoiser.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        """Training or inference mode (dropout) for the denoiser.

        Skips ``nn.Module.train``'s walk over every module (1.9 ms on the world's UNet, at every
        step of the loop) when nothing changed since the last call: the same module, the same
        adapters, the same mode, and the module still says so.
        """
        denoiser = self.denoiser
        state = (id(denoiser), self._loaded_adapters(), mode)
        if state == self._train_state and denoiser.training == mode:
            return
        denoiser.train(mode)
        self._train_state = state

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the frozen base model inside this context (LoRA disabled / frozen copy)."""
        # The reference never goes through a training wrapper (e.g. DDP): it is a no-grad side
        # computation and must not touch the wrapper's gradient-sync bookkeeping.
        lora = self.training_mode == "lora"
        if lora:
            self.set_lora_enabled(False)
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = False
            if lora:
                self.set_lora_enabled(True)

    def set_lora_enabled(self, enabled: bool) -> None:
        """diffusers' ``enable_adapters()`` / ``disable_adapters()`` on the denoiser, without
        their walk over every module on each call (2.6 of their 4.1 ms per pair of calls on the
        world's UNet, once per reference pass): the LoRA layers are found once per set of
        loaded adapters."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        denoiser = self.unwrapped_denoiser
        key = (id(denoiser), self._loaded_adapters())
        if self._lora_layers is None or self._lora_layers[0] != key:
            self._lora_layers = (key, [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)])
        for layer in self._lora_layers[1]:
            layer.enable_adapters(enabled)

    def _loaded_adapters(self) -> tuple[str, ...]:
        """The names of the peft adapters on the denoiser: new LoRA layers come with a new name."""
        return tuple(getattr(self.unwrapped_denoiser, "peft_config", None) or ())

    @contextlib.contextmanager
    def per_sample_lora(self, names: list[str]) -> Iterator[None]:
        """LoRA on some rows of a batch and not on others, in ONE forward pass.

        ``names[i]`` is ``"default"`` (the trained LoRA) or ``"__base__"`` (no LoRA) for row ``i``
        of the batch passed to ``predict``; when classifier-free guidance doubles the batch the
        pattern repeats. Uses peft's mixed-batch LoRA forward (``adapter_names``), injected with
        forward pre-hooks because diffusers' attention processors call the layers positionally.
        """
        from peft.tuners.lora import LoraLayer

        if self.training_mode != "lora":
            raise RuntimeError("per-sample LoRA needs a LoRA adapter (training_mode 'lora')")

        def inject(module, args, kwargs):
            rows = args[0].shape[0] if args else kwargs["x"].shape[0]
            if rows % len(names):
                raise RuntimeError(f"a LoRA layer saw {rows} rows, not a multiple of {len(names)} adapter names")
            return args, {**kwargs, "adapter_names": list(names) * (rows // len(names))}

        handles = [
            m.register_forward_pre_hook(inject, with_kwargs=True)
            for m in self.unwrapped_denoiser.modules()
            if isinstance(m, LoraLayer)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---- saving / loading --------------------------------------------------------------------

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The weights a checkpoint must hold: LoRA weights (peft names) or the full denoiser."""
        denoiser = self.unwrapped_denoiser
        if self.training_mode == "lora":
            from peft.utils import get_peft_model_state_dict

            return get_peft_model_state_dict(denoiser)
        return denoiser.state_dict()

    def load_trained_state_dict(self, state: dict[str, Tensor]) -> None:
        denoiser = self.unwrapped_denoiser
        if self.training_mode == "lora":
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(denoiser, state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"LoRA state has keys the model lacks, e.g. {unexpected[:3]}")
        else:
            denoiser.load_state_dict(state)

    def save_trained(self, directory: str | os.PathLike) -> None:
        """Save what was trained so plain diffusers can use it.

        LoRA: ``pipeline_class.save_lora_weights`` (with the LoRA config as metadata), loadable by
        ``pipe.load_lora_weights(directory)``. Full fine-tune: the denoiser's ``save_pretrained``
        folder under ``directory/<unet|transformer>``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        denoiser = self.unwrapped_denoiser
        if self.training_mode == "lora":
            self.pipeline_class.save_lora_weights(
                directory,
                **{
                    self.lora_layers_kwarg: self.trained_state_dict(),
                    f"{self.lora_layers_kwarg.replace('_layers', '')}_adapter_metadata": denoiser.peft_config[
                        "default"
                    ].to_dict(),
                },
            )
        elif self.training_mode == "full":
            denoiser.save_pretrained(directory / self.denoiser_name)
        else:
            raise RuntimeError("nothing is trained: call add_lora() or enable_full_finetune() first")
        info = {"family": self.family, "training_mode": self.training_mode}
        (directory / TRAINED_INFO_FILE).write_text(json.dumps(info, indent=2))

    def load_trained(self, directory: str | os.PathLike) -> None:
        """Load what ``save_trained`` wrote into this adapter (same family and mode)."""
        directory = Path(directory)
        info_path = directory / TRAINED_INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{directory} holds no diffalign training output ({TRAINED_INFO_FILE} missing)")
        info = json.loads(info_path.read_text())
        if info["family"] != self.family:
            raise ValueError(f"{directory} was trained for family '{info['family']}', not '{self.family}'")
        if info["training_mode"] == "lora":
            state, meta = self._read_lora_file(directory)
            if self.training_mode == "frozen":
                self.add_lora(
                    rank=meta["r"],
                    alpha=meta["lora_alpha"],
                    target_modules=sorted(meta["target_modules"]),
                    dropout=meta.get("lora_dropout", 0.0),
                )
            self.load_trained_state_dict(state)
        else:
            from diffalign.weights import load_safetensors

            weights = sorted((directory / self.denoiser_name).glob("*.safetensors"))
            if not weights:
                raise FileNotFoundError(f"no safetensors weights under {directory / self.denoiser_name}")
            state = {}
            for f in weights:
                state.update(load_safetensors(f))
            if self.training_mode == "frozen":
                self.enable_full_finetune()
            self.load_trained_state_dict(state)

    def _read_lora_file(self, directory: Path) -> tuple[dict[str, Tensor], dict]:
        """The denoiser's LoRA tensors and LoRA config from diffusers' saved LoRA file."""
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
        from safetensors import SafetensorError, safe_open

        path = directory / LORA_WEIGHT_NAME_SAFE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected LoRA weights written by save_trained)")
        prefix = f"{self.denoiser_name}."
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
                raw_meta = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a readable safetensors file ({reason}); the file is corrupt or truncated") from None
        meta = {k[len(prefix):]: v for k, v in raw_meta.items() if k.startswith(prefix)}
        if "r" not in meta:
            raise ValueError(f"{path} has LoRA weights without diffusers' LoRA metadata (rank unknown)")
        return state, meta

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The whole pipeline as a diffusers folder (``DiffusionPipeline.from_pretrained`` reads it)."""
        self.pipe.save_pretrained(directory)

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike, torch_dtype: torch.dtype | None = None, variant: str | None = None, **kwargs
    ) -> "DiffusionAdapter":
        """Load a local diffusers folder (or a hub id where a hub is reachable)."""
        local = Path(model).is_dir()
        if not local and (Path(model).is_absolute() or str(model).startswith(".") or str(model).count("/") != 1):
            raise FileNotFoundError(f"model directory '{model}' does not exist (and it is not a hub id 'org/name')")
        if local and not (Path(model) / "model_index.json").is_file():
            raise FileNotFoundError(f"{model} is not a diffusers pipeline folder ({Path(model) / 'model_index.json'} not found)")
        kwargs.setdefault("local_files_only", local)
        pipe = cls.pipeline_class.from_pretrained(model, torch_dtype=torch_dtype, variant=variant, **kwargs)
        return cls(pipe)

    @classmethod
    @abc.abstractmethod
    def tiny(cls, seed: int = 0) -> "DiffusionAdapter":
        """Random components at diffusers' fast-test sizes, built offline (tokenizers included)."""

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.unwrapped_denoiser.parameters())
        return f"{type(self).__name__}({self.parameterization}, {n / 1e6:.2f}M denoiser params, mode={self.training_mode})"

"""Typed run configuration: YAML recipes validated before any model loads.

A run config has one section per concern (``model``, ``method``, ``rewards``, ``data``,
``optimization``, ``logging``, ``output``) plus ``run_name`` and ``seed``. ``method`` holds
``name`` and that method's own options, validated by the trainer's config dataclass (one
``XConfig`` per method, trl-style). Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the key (``optimization.lr``) and what is allowed.

``--set a.b=c`` overrides any key (the value is parsed as YAML). ``--cfg NAME.yaml`` resolves
inside the shipped ``configs/`` folder when it is not an existing path.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


# --------------------------------------------------------------------------------------------
# Generic typed parsing
# --------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """``value`` checked against (and minimally converted to) type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: X's own message is the clearest
            return _coerce(value, non_null[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "1e-4" (no dot) as a string; accept any number spelling
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def from_dict(cls, data: Any, key: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}; allowed keys: {', '.join(names)}")
        kwargs[name] = _coerce(value, hints[name], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks name the field; add the section path
        raise ConfigError(f"{key}.{e}" if key else str(e)) from None


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def check(condition: bool, key: str, message: str) -> None:
    """Range checks in ``__post_init__``: ``check(lr > 0, "lr", "must be > 0")``.

    ``key`` is the field name; :func:`from_dict` prefixes the section path.
    """
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------
# The run configuration
# --------------------------------------------------------------------------------------------


DIFFUSION_FAMILIES = ("sd", "sdxl", "sd3", "flux")
TEXT_FAMILY = "causal_lm"  # transformers causal LMs (diffalign.llm)
# LoRA targets when model.lora.target_modules is not given: the attention projections
LORA_TARGETS = {
    "diffusion": ["to_k", "to_q", "to_v", "to_out.0"],  # diffusers attention
    TEXT_FAMILY: ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama / Qwen / Mistral attention
}


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float | None = None  # defaults to rank (scale 1)
    target_modules: list[str] | None = None  # default: LORA_TARGETS of the model's family
    dropout: float = 0.0

    def __post_init__(self):
        check(self.rank > 0, "rank", f"must be a positive integer, got {self.rank}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.target_modules is None or len(self.target_modules) > 0, "target_modules",
              "must name at least one module")


@dataclass
class ModelConfig:
    # diffusion: sd | sdxl | sd3 | flux (detected from path when omitted); text: causal_lm
    family: str | None = None
    # local diffusers folder, hub id, or a world model name ("world/eps"); causal_lm: a
    # transformers folder, hub id, or an embedded text model ("llm/arith")
    path: str | None = None
    # Smoke-test switch: the family's tiny random model (float32, its own resolution) instead of
    # `path`, and tiny random stand-ins for rewards that need weight files.
    tiny: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    variant: str | None = None
    resolution: int | None = None  # image size for generation and data; default: the model's own
    training: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = None  # T5 tokens (SD3, Flux)

    def __post_init__(self):
        check(self.family is None or self.family in (*DIFFUSION_FAMILIES, TEXT_FAMILY), "family",
              f"must be one of {list(DIFFUSION_FAMILIES)} (diffusion) or '{TEXT_FAMILY}' (text), got {self.family!r}")
        check(self.tiny or self.path is not None, "path", "is required unless model.tiny is true")
        check(not self.tiny or self.family is not None, "family", "is required when model.tiny is true")
        check(self.resolution is None or self.resolution > 0, "resolution", "must be positive")
        if self.family == TEXT_FAMILY:
            check(self.resolution is None, "resolution", f"is an image setting, not used by family {TEXT_FAMILY}")
            check(self.max_sequence_length is None, "max_sequence_length",
                  f"is a T5 setting, not used by family {TEXT_FAMILY} (see the method's max_*_length)")
        if self.lora.target_modules is None:
            self.lora.target_modules = list(LORA_TARGETS[TEXT_FAMILY if self.family == TEXT_FAMILY else "diffusion"])


@dataclass
class DataConfig:
    # "synthetic": preference pairs generated and reward-ranked at start-up, cached in `path`
    source: Literal["none", "folder", "parquet", "arrow", "world", "synthetic"] = "none"
    path: str | None = None
    split: Literal["pretrain", "align", "heldout"] = "pretrain"  # world prompts (source: world)
    image_column: str = "image"
    caption_column: str = "caption"
    random_flip: bool = False
    num_workers: int = 0
    max_rows: int | None = None
    # --- preference pairs (Pick-a-Pic v2 layout; diffalign.data.preferences)
    image_columns: list[str] = field(default_factory=lambda: ["jpg_0", "jpg_1"])
    label_column: str = "label_0"  # 1: first image wins, 0: second wins, 0.5: tie (dropped)
    prompt_dropout: float = 0.0  # empty-prompt probability per pair (0.2 in Diffusion-DPO's code)
    random_crop: bool = False  # one random crop per pair, the same for both images
    relabel: bool = False  # AI feedback: the run's `rewards:` pick each pair's winner
    synthetic: dict[str, Any] = field(default_factory=dict)  # source synthetic: SynthesisConfig options

    def __post_init__(self):
        needs_path = self.source in ("folder", "parquet", "arrow", "synthetic")
        check(not needs_path or self.path is not None, "path", f"is required for data.source '{self.source}'")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(0 <= self.prompt_dropout <= 1, "prompt_dropout", f"must be in [0, 1], got {self.prompt_dropout}")
        check(len(self.image_columns) == 2, "image_columns", f"must name two columns, got {self.image_columns}")
        check(not self.synthetic or self.source == "synthetic", "synthetic", "is only read with data.source: synthetic")
        if self.source == "synthetic":
            from diffalign.data.synthetic import SynthesisConfig

            from_dict(SynthesisConfig, self.synthetic, "synthetic")  # validate now, before any model loads


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    update_after_step: int = 0

    def __post_init__(self):
        check(0 < self.decay < 1, "decay", f"must be in (0, 1), got {self.decay}")


@dataclass
class OptimizationConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # adamw: torch's AdamW (multi-tensor); adamw_fused: its fused kernel (CUDA and CPU), faster
    # again but not bit-identical to adamw (last-bit rounding differences)
    optimizer: Literal["adamw", "adamw_fused"] = "adamw"
    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema: EMAConfig = field(default_factory=EMAConfig)
    max_nonfinite_steps: int = 10  # consecutive NaN/Inf losses or gradients before the run aborts

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/2", "must be in [0, 1)")
        check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.max_nonfinite_steps > 0, "max_nonfinite_steps", "must be > 0")


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    eval_every: int = 0  # 0: only at the start and the end
    check_rank_sync: bool = False  # after every step, verify all processes hold identical weights

    def __post_init__(self):
        check(self.every > 0, "every", "must be > 0")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")


@dataclass
class OutputConfig:
    dir: str = "outputs"
    checkpoint_every: int = 0  # optimizer steps; 0 disables periodic checkpoints
    keep_last: int = 2
    save_final: bool = True

    def __post_init__(self):
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.keep_last > 0, "keep_last", "must be > 0")


@dataclass
class RewardSpec:
    """One reward in ``rewards:``; ``key: weight`` is shorthand for ``{weight: w}``.

    The key is the registry name unless ``name`` is given (two CLIPs: ``clip_l: {name: clip,
    ...}`` and ``clip_h: {name: clip, ...}``); every other key is the plugin's own option.
    """

    weight: float = 1.0
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str
    options: Any = None  # the trainer's own config dataclass

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ConfigError(f"method.name: expected a string, got {self.name!r}")


@dataclass
class RunConfig:
    method: MethodConfig
    model: ModelConfig
    run_name: str = "run"
    seed: int = 0
    rewards: dict[str, RewardSpec] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimization": OptimizationConfig,
    "logging": LoggingConfig,
    "output": OutputConfig,
}


def _parse_rewards(raw: Any) -> dict[str, RewardSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"rewards: expected a mapping 'name: weight' or 'name: {{weight, ...}}', got {raw!r}")
    specs = {}
    for name, value in raw.items():
        key = f"rewards.{name}"
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            specs[name] = RewardSpec(weight=_coerce(value, float, key))
        elif isinstance(value, dict):
            value = dict(value)
            weight = _coerce(value.pop("weight", 1.0), float, f"{key}.weight")
            plugin = _coerce(value.pop("name", None), str | None, f"{key}.name")
            specs[name] = RewardSpec(weight=weight, name=plugin, kwargs=value)
        else:
            raise ConfigError(f"{key}: expected a weight or a mapping, got {value!r}")
    return specs


def parse_config(raw: dict) -> RunConfig:
    """Validate a raw mapping (from YAML) into a :class:`RunConfig`."""
    from diffalign.trainers import trainer_class

    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    allowed = {"run_name", "seed", "method", "rewards", *_SECTIONS}
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: unknown section{hint}; allowed: {', '.join(sorted(allowed))}")
    method_raw = raw.get("method")
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        raise ConfigError("method.name: required (e.g. 'sft', 'grpo', 'diffusion_dpo')")
    method_raw = dict(method_raw)
    name = method_raw.pop("name")
    try:
        cls = trainer_class(name)
    except ValueError as e:
        raise ConfigError(f"method.name: {e}") from None
    options = from_dict(cls.config_class, method_raw, "method")
    if "model" not in raw:
        raise ConfigError("model: required section (model.path or model.family + model.tiny)")
    sections = {key: from_dict(cls_, raw.get(key), key) for key, cls_ in _SECTIONS.items()}
    return RunConfig(
        method=MethodConfig(name=name, options=options),
        run_name=_coerce(raw.get("run_name", "run"), str, "run_name"),
        seed=_coerce(raw.get("seed", 0), int, "seed"),
        rewards=_parse_rewards(raw.get("rewards")),
        **sections,
    )


def config_to_dict(cfg: RunConfig) -> dict:
    """The inverse of :func:`parse_config` (what checkpoints store as ``config.yaml``)."""
    out = to_dict(cfg)
    method = out.pop("method")
    out["method"] = {"name": method["name"], **(method["options"] or {})}
    out["rewards"] = {
        key: {"weight": spec["weight"], **({"name": spec["name"]} if spec["name"] else {}), **spec["kwargs"]}
        for key, spec in out["rewards"].items()
    }
    return out


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


def configs_dir() -> Path:
    """The shipped recipes (``configs/`` in the repository, ``diffalign.configs`` when installed)."""
    return Path(str(resources.files("diffalign.configs")))


def resolve_config_path(name: str | os.PathLike) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    shipped = configs_dir() / path.name
    if not str(name).endswith((".yaml", ".yml")):
        shipped = shipped.with_suffix(".yaml")
    if shipped.is_file():
        return shipped
    available = sorted(p.name for p in configs_dir().glob("*.yaml"))
    raise ConfigError(f"--cfg {name}: no such file, and not a shipped config; shipped: {', '.join(available)}")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config mapping in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. optimization.lr=1e-4")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: malformed key '{key}'")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(name: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def add_overrides_argument(parser, metavar: str = "KEY=VALUE",
                           help: str = "override config keys, e.g. --set optimization.lr=1e-5 seed=1") -> None:
    """``--set`` for every command that loads a recipe: several assignments at once, repeatable,
    collected in ``args.overrides`` (the list :func:`load_config` takes)."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar=metavar,
                        help=f"{help} (repeatable)")

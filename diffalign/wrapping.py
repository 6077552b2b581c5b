"""The training loop's two names for a trained network, shared by every adapter.

``unwrapped_denoiser`` is the bare module (what checkpoints save and LoRA edits); ``denoiser`` is
what forward passes go through: the wrapper ``accelerate.prepare`` returned (DDP, FSDP) once the
loop assigns it, else the bare module.
"""

from __future__ import annotations

import abc

import torch


class TrainingWrapperSlot(abc.ABC):
    """Mixin: subclasses define ``unwrapped_denoiser``; the loop may assign ``denoiser``."""

    _wrapped_denoiser: torch.nn.Module | None = None

    @property
    @abc.abstractmethod
    def unwrapped_denoiser(self) -> torch.nn.Module:
        """The bare trained module."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module forward passes go through: the training wrapper if one was set."""
        return self._wrapped_denoiser if self._wrapped_denoiser is not None else self.unwrapped_denoiser

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        self._wrapped_denoiser = None if module is self.unwrapped_denoiser else module

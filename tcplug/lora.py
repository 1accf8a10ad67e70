"""LoRA adapters with peft: which modules get them, what stays frozen, what is exported.

A backbone names the module its adapters go into with a ``lora_target`` attribute (default:
the backbone itself; a model family points at the wrapped diffusers model, so adapter names
are the ones its pipeline loads). ``apply_lora`` injects the adapters and freezes everything
else in the backbone; the module's optimizer then sees only the adapters (and the trainable
parts of other components, e.g. zero-initialised conditioner adapters).
Exporting writes the adapters through the backbone's ``save_lora_weights(out, state_dict)``
(a family writes its pipeline's format: ``WanPipeline.load_lora_weights`` reads Wan's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tcplug.errors import TcplugError

ADAPTER = "default"


@dataclass
class LoraSpec:
    """``model.lora`` in a recipe.

    Args:
        rank: adapter rank ``r``.
        alpha: scaling numerator (the update is scaled by ``alpha / rank``); default ``rank``.
        target_modules: module names (or suffixes) that get adapters, as peft matches them;
            e.g. Wan's attention projections ``[to_q, to_k, to_v, to_out.0]``.
        dropout: dropout on the adapter input.
        init: peft's ``init_lora_weights`` (``true``: B = 0, the model is unchanged at start;
            ``gaussian``; ``false``: random B too, for tests).
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    init: bool | str = True

    def config(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise TcplugError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise TcplugError("model.lora.target_modules is empty")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          target_modules=list(self.target_modules), lora_dropout=self.dropout,
                          init_lora_weights=self.init)


def lora_target(backbone: nn.Module) -> nn.Module:
    """The module a backbone's adapters go into."""
    return getattr(backbone, "lora_target", None) or backbone


def apply_lora(backbone: nn.Module, spec: LoraSpec) -> int:
    """Inject adapters into ``lora_target(backbone)`` and freeze every other backbone parameter.
    Returns the number of trainable adapter parameters."""
    from peft import inject_adapter_in_model

    target = lora_target(backbone)
    try:
        inject_adapter_in_model(spec.config(), target, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in target.named_modules() if isinstance(m, nn.Linear)})
        raise TcplugError(
            f"model.lora.target_modules {list(spec.target_modules)} match no module of {type(target).__name__} "
            f"({exc}); its linear layers are named: {', '.join(names[:20])}"
        ) from None
    count = 0
    for name, p in backbone.named_parameters():
        trainable = "lora_" in name
        p.requires_grad_(trainable)
        count += p.numel() if trainable else 0
    if count == 0:
        raise TcplugError("model.lora added no trainable parameter")
    return count


def lora_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The adapters of ``backbone`` as a peft state dict (keys relative to its ``lora_target``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(lora_target(backbone), adapter_name=ADAPTER)


def export_lora(backbone: nn.Module, out: str) -> int:
    """Write ``backbone``'s adapters with its ``save_lora_weights``; returns the tensor count."""
    save = getattr(backbone, "save_lora_weights", None)
    if save is None:
        raise TcplugError(f"backbone {type(backbone).__name__} has no save_lora_weights: its family defines no "
                          "export format for adapters")
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(backbone).items()}
    if not state:
        raise TcplugError("the checkpoint's backbone has no LoRA adapters (was model.lora set?)")
    save(out, state)
    return len(state)


__all__ = ["LoraSpec", "apply_lora", "export_lora", "lora_state_dict", "lora_target"]

"""LoRA adapters with peft: which modules get them, what stays frozen, what is exported.

A backbone names the module its adapters go into with a ``lora_target`` attribute (default:
the backbone itself; a model family points at the wrapped diffusers model, so adapter names
are the ones its pipeline loads). ``apply_lora`` injects the adapters and freezes everything
else in the backbone; the module's optimizer then sees only the adapters (and the trainable
parts of other components, e.g. zero-initialised conditioner adapters).
Exporting writes the adapters through the backbone's ``save_lora_weights(out, state_dict, format)``
(a family writes its pipeline's format: ``WanPipeline.load_lora_weights`` reads Wan's; a family
may offer more, e.g. Wan's ``original`` key layout for ComfyUI and the Wan repository). The
``alpha / rank`` scale is folded into ``lora_B`` first, so a loader that assumes
``alpha = rank`` (diffusers without adapter metadata) applies the trained update exactly.
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


def lora_scale(backbone: nn.Module) -> float:
    """The adapters' ``alpha / rank`` (peft's ``scaling``) of ``backbone``; 1.0 without adapters."""
    from peft.tuners.lora import LoraLayer

    scales = {m.scaling[ADAPTER] for m in lora_target(backbone).modules()
              if isinstance(m, LoraLayer) and ADAPTER in m.scaling}
    if len(scales) > 1:
        raise TcplugError(f"the adapters have several alpha / rank scales {sorted(scales)}: cannot fold them into one file")
    return scales.pop() if scales else 1.0


def folded_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """:func:`lora_state_dict` on the CPU with ``alpha / rank`` folded into every ``lora_B``: the
    update ``B A`` of the file equals the trained ``(alpha / rank) B A`` at ``alpha = rank``."""
    scale = lora_scale(backbone)
    return {k: (v.detach().float() * scale if ".lora_B." in k else v.detach()).to(v.dtype).cpu().contiguous()
            for k, v in lora_state_dict(backbone).items()}


def export_lora(backbone: nn.Module, out: str, format: str | None = None) -> int:
    """Write ``backbone``'s adapters with its ``save_lora_weights`` in ``format`` (default: the
    family's first, ``diffusers``); returns the tensor count."""
    save = getattr(backbone, "save_lora_weights", None)
    if save is None:
        raise TcplugError(f"backbone {type(backbone).__name__} has no save_lora_weights: its family defines no "
                          "export format for adapters")
    formats = tuple(getattr(backbone, "lora_formats", ("diffusers",)))
    if format is not None and format not in formats:
        raise TcplugError(f"backbone {type(backbone).__name__} writes LoRA adapters as {', '.join(formats)}, "
                          f"not {format!r}")
    state = folded_state_dict(backbone)
    if not state:
        raise TcplugError("the checkpoint's backbone has no LoRA adapters (was model.lora set?)")
    if format is None or format == formats[0]:
        save(out, state)  # a third party's family may take (out, state_dict) only
    else:
        save(out, state, format=format)
    return len(state)


__all__ = ["LoraSpec", "apply_lora", "export_lora", "folded_state_dict", "lora_scale", "lora_state_dict", "lora_target"]

"""The published Wan transformer configurations, by name, for building a real-sized model with
random weights (no download): memory planning, speed and memory benchmarks, meta-device checks.

``WanBackbone(config="wan2.1-t2v-1.3b")`` builds the 1.3B model; under ``torch.device("meta")``
nothing is allocated (the 14B model's 14.3 billion parameters cost no memory).
The figures are those of the Wan repository's configs (``wan/configs/wan_t2v_1_3B.py``,
``wan_t2v_14B.py``) in diffusers' ``WanTransformer3DModel`` names; Wan 2.2's A14B experts (high and
low noise) each have the 14B shape.
"""

from __future__ import annotations

from tcplug import TcplugError

_SHARED = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
               freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: name -> ``WanTransformer3DModel`` config
CONFIGS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(_SHARED, num_attention_heads=12, ffn_dim=8960, num_layers=30),   # dim 1536
    "wan2.1-t2v-14b": dict(_SHARED, num_attention_heads=40, ffn_dim=13824, num_layers=40),   # dim 5120
    "wan2.2-t2v-a14b": dict(_SHARED, num_attention_heads=40, ffn_dim=13824, num_layers=40),  # each expert
}


def transformer_config(name: str) -> dict:
    """A copy of the published config ``name`` (one of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise TcplugError(f"wan: no published config named {name!r}; known: {', '.join(CONFIGS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in CONFIGS[name].items()}


__all__ = ["CONFIGS", "transformer_config"]

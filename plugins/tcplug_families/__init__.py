"""What every diffusers video-model family shares, written once (Wan and LTX-Video use it; a
third party's family can too). Built on tcplug's public API only; it registers no component.

- :func:`load_model`: a diffusers model from a local folder (never downloaded) or a config dict;
- :class:`FrameAttnProcessor`: a diffusers attention processor for a joint-token transformer's
  self-attention that keeps the model's projections, norms and rotary embedding and lets a tcplug
  :class:`~tcplug.AttentionVariant` decide which key frames each query frame sees;
- :class:`JointTokenBackbone`: a backbone around a transformer over frame-major tokens
  ``(B, T'·N, D)``: per-clip / per-frame / per-token timesteps, attention variants in every
  block, streaming with the K/V frame buffer, ControlNet-style residuals after each block, LoRA;
- :class:`FrozenVideoVAE`: a frozen video VAE as a latent design, normalised the way the model's
  pipeline normalises, whose encoder is loaded only when pixels are encoded;
- :class:`FrozenTextEncoder`: a frozen text encoder as a conditioner (prompts through the
  pipeline's own ``encode_prompt``, negative prompt for guidance, precomputed embeddings).

A family subclasses these and fills in what differs: how its attention projects and rotates
``q, k, v`` (:meth:`FrameAttnProcessor.qkv`), how its transformer is called
(:meth:`JointTokenBackbone.run`), its rotary embedding at absolute frame positions, its VAE's
normalisation and decode call, and its pipeline's ``encode_prompt``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcplug import (
    AttentionVariant,
    Backbone,
    LatentDesign,
    TcplugError,
    WorldConditioner,
    frame_index,
    shot_captions,
    shot_text_mask,
)

__version__ = "0.1.0"

LAYOUT = "a diffusers model folder holds transformer/, vae/, text_encoder/, tokenizer/ and scheduler/"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: weight storage a backbone's ``storage_dtype`` may ask for (computed in the model's dtype)
STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
#: modules left in the model's dtype: diffusers' defaults (embeddings, norms, the output projection) and adapters
STORAGE_SKIP = ("patch_embed", "patch_embedding", "condition_embedder", "time_embed", "caption_projection", "norm",
                "^proj_out$", "scale_shift_table", "lora_")


def subfolder(pretrained: str, sub: str, what: str) -> Path:
    """``pretrained/sub``, checked: a local folder (weights are never downloaded)."""
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        if root.is_absolute() or str(pretrained).startswith((".", "~")):
            raise TcplugError(f"{what}: pretrained={pretrained!r} is not a local folder: the model folder {root} does not "
                              "exist (moved or deleted? a checkpoint's recipe names the folder its weights were loaded from)")
        raise TcplugError(f"{what}: pretrained={pretrained!r} is not a local folder (weights are never downloaded)")
    path = root / sub
    if not path.is_dir():
        raise TcplugError(f"{what}: model folder {root} has no {sub}/ ({LAYOUT})")
    return path


def load_model(cls: type, what: str, pretrained: str | None, sub: str, config: dict | None,
               dtype: str | None = None) -> nn.Module:
    """A diffusers model from ``pretrained/sub`` (local files only) or from ``config``. Under
    ``torch.device("meta")`` a folder's model is built from its ``config.json`` alone (no weight
    is read or allocated: what ``tcplug plan`` measures)."""
    if (pretrained is None) == (config is None):
        raise TcplugError(f"{what}: give exactly one of pretrained (a local model folder) or config (a dict)")
    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise TcplugError(f"{what}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        torch_dtype = DTYPES[dtype]
    if pretrained is not None:
        path = subfolder(pretrained, sub, what)
        if torch.get_default_device().type == "meta":  # planning (`tcplug plan`): the folder's config, no weights read
            try:
                model = cls.from_config(cls.load_config(path))
            except Exception as exc:
                raise TcplugError(f"{what}: cannot read the config of {cls.__name__} in {path}: {_load_error(exc)}") from None
            return model.to(torch_dtype) if torch_dtype is not None else model
        # a folder with only pickle-format weights (.bin): say so, instead of diffusers' "defaulting to unsafe
        # serialization" (the load is weights-only, never unpickling code)
        safetensors = any(path.glob("*.safetensors"))
        try:
            model = cls.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype,
                                        use_safetensors=True if safetensors else False)
        except Exception as exc:
            raise TcplugError(f"{what}: cannot load {cls.__name__} from {path}: {_load_error(exc)}") from None
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if empty:
            raise TcplugError(f"{what}: the weights in {path} do not match its config.json: {len(empty)} tensor(s) of the "
                              f"model it describes have no weights (e.g. {empty[0]})")
        return model
    try:
        model = cls.from_config(dict(config))
    except Exception as exc:
        raise TcplugError(f"{what}: bad {cls.__name__} config: {type(exc).__name__}: {exc}") from None
    return model.to(torch_dtype) if torch_dtype is not None else model


def frame_positions(start: int | Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """Absolute latent-frame positions ``(t,)``: ``start .. start + t`` or, for a tensor, its values
    (the frames of a keyframes-first pass, ``context["frame_index"]``)."""
    if torch.is_tensor(start):
        return start.detach().to(device="cpu", dtype=dtype)
    return torch.arange(start, start + t, dtype=dtype)


def _load_error(exc: BaseException) -> str:
    """A model folder's load error in one line; a pickled payload named as such (torch's own text
    would advise ``weights_only=False``, which tcplug never uses)."""
    import pickle

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) for e in chain):
        return ("its weights file carries pickled objects beyond tensors, which could run code: tcplug loads only "
                "safetensors or plain tensors (re-save the folder with save_pretrained(safe_serialization=True))")
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


# ----- attention ---------------------------------------------------------------------------------
class FrameAttnProcessor:
    """A diffusers attention processor for a joint-token transformer's self-attention.

    Subclasses implement :meth:`qkv` (the model's own projections, norms and rotary embedding);
    the result is cut into frames ``(B, T', heads, N, head_dim)`` and handed to the tcplug
    variant (or, while streaming, to the K/V frame buffer); the output goes through the model's
    output projection. The backbone sets :attr:`grid` ``(T', N)`` (latent frames, tokens per
    frame; tokens are frame-major) before each forward, and :attr:`stream` / :attr:`rotary` while
    streaming (the K/V frame buffer, and the rotary embedding at the chunk's absolute positions).
    """

    def __init__(self, variant: AttentionVariant, index: int) -> None:
        self.variant, self.index = variant, index
        self.grid: tuple[int, int] | None = None
        self.stream = None
        self.rotary: Any = None
        self.kv_index: Tensor | None = None
        #: while streaming: latent-frame positions ``(T,)`` -> the rotary embedding of those frames
        self.rotary_fn: Any = None

    def qkv(self, attn: nn.Module, hidden_states: Tensor, rotary: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, D)`` -> query, key, value ``(B, L, heads, head_dim)`` as the model computes them."""
        raise NotImplementedError

    def rotate(self, x: Tensor, rotary: Any) -> Tensor:
        """The model's rotary embedding ``rotary`` (a ``(cos, sin)`` pair) applied to ``x (B, L,
        heads, head_dim)``, as :meth:`qkv` applies it. A family without it streams its sink frames
        at their own positions."""
        raise NotImplementedError

    def reposition(self, k: Tensor, old: Tensor, new: Tensor) -> Tensor:
        """Keys ``k (B, T, heads, N, D)`` rotated at latent-frame positions ``old (T,)``, moved to
        ``new``: rotated once more by the difference of the two embeddings' angles (rotary positions
        compose: ``R(new) = R(new - old) R(old)``). For a sink at rolling positions while streaming."""
        b, t, h, n, d = k.shape
        (c0, s0), (c1, s1) = self.rotary_fn(old), self.rotary_fn(new)
        delta = (c1 * c0 + s1 * s0, s1 * c0 - c1 * s0)  # cos, sin of (angle(new) - angle(old))
        flat = self.rotate(k.permute(0, 1, 3, 2, 4).reshape(b, t * n, h, d), delta)
        return flat.reshape(b, t, n, h, d).permute(0, 1, 3, 2, 4)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary: Any = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise TcplugError("tcplug frame attention is for the model's self-attention (attn1) only, without a mask")
        if self.grid is None:
            raise TcplugError("frame attention has no frame grid: call the model through its tcplug backbone")
        t, n = self.grid
        b, length, _ = hidden_states.shape
        if length != t * n:
            raise TcplugError(f"frame attention got {length} tokens for a grid of {t} frames x {n} tokens")
        query, key, value = self.qkv(attn, hidden_states, self.rotary if self.rotary is not None else rotary)

        def frames(y: Tensor) -> Tensor:  # (B, T'*N, H, D) -> (B, T', H, N, D)
            return y.view(b, t, n, attn.heads, -1).permute(0, 1, 3, 2, 4)

        q, k, v = frames(query), frames(key), frames(value)
        moves = self.rotary_fn is not None and type(self).rotate is not FrameAttnProcessor.rotate
        out = self.stream.attend(self.variant, self.index, q, k, v, self.reposition if moves else None) \
            if self.stream is not None else self.variant(q, k, v, self.kv_index)
        out = out.permute(0, 1, 3, 2, 4).reshape(b, t * n, -1).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class FrameTextAttnProcessor:
    """A diffusers processor for a joint-token transformer's cross-attention to the caption
    (``attn2``) that takes a per-token mask: ``mask`` ``(B, 1, T'*N, L)`` bool, which caption tokens
    each video token sees (per-shot captions: a frame sees the video's caption and its own shot's).
    The model's own projections and q/k norms, then SDPA with the mask. Without a mask (``None``)
    it hands the call to the model's own processor, unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.mask = inner, None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        if self.mask is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if getattr(attn, "add_k_proj", None) is not None:
            raise TcplugError("per-shot captions: an image-conditioned cross-attention (add_k_proj) is not supported")
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(encoder_hidden_states))
        v = attn.to_v(encoder_hidden_states)
        q, k, v = (y.unflatten(2, (attn.heads, -1)).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask.to(q.device))
        out = out.transpose(1, 2).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class AddResidual:
    """Forward hook adding one conditioner residual ``(B|1, T'|1, N|1, D)`` to a block's output
    ``(B, T'*N, D)``."""

    def __init__(self, residual: Tensor, b: int, t: int, n: int) -> None:
        self.residual, self.shape = residual, (b, t, n)

    def __call__(self, module, args, output):
        b, t, n = self.shape
        res = self.residual.to(output.dtype).expand(b, t, n, output.shape[-1])
        return output + res.reshape(b, t * n, -1)


# ----- backbone ----------------------------------------------------------------------------------
class JointTokenBackbone(Backbone):
    """A diffusers transformer over frame-major tokens as a tcplug backbone (base class).

    Latents ``(B, T', C, h, w)``; timesteps per clip ``(B,)``, per latent frame ``(B, T')`` or
    per token ``(B, T', N)`` with ``N = (h/p)(w/p)``: the last two reach the model as
    ``(B, T'*N)``, the per-token form Wan and LTX-Video take. ``attention`` installs a tcplug
    variant in every block's self-attention (:attr:`processor_cls`); causal variants stream with
    the K/V frame buffer. ``context["residuals"]`` (one tensor per block, broadcastable to
    ``(B, T', N, token_dim)``) is added after each block (ControlNet-style conditioners).

    A subclass sets :attr:`model`, :attr:`in_channels`, :attr:`patch_size`, :attr:`token_dim`,
    :attr:`num_blocks`, then calls :meth:`_setup`; and implements :attr:`blocks`, :meth:`run`,
    :meth:`rotary_at` and :meth:`save_lora_weights`.
    """

    processor_cls: type[FrameAttnProcessor] = FrameAttnProcessor
    family: str = "model"

    def _setup(self, attention: AttentionVariant | list[AttentionVariant] | None,
               gradient_checkpointing: bool, storage_dtype: str | None = None, offload: str | None = None,
               offload_dir: str | None = None) -> None:
        if offload not in (None, "cpu", "disk"):
            raise TcplugError(f"{self.family} backbone: offload {offload!r} is not one of cpu, disk")
        if offload == "disk" and not offload_dir:
            raise TcplugError(f"{self.family} backbone: offload: disk needs offload_dir (a folder for the blocks' weights)")
        self.offload, self.offload_dir = offload, offload_dir
        self._offload_applied = False
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise TcplugError(f"{self.family} backbone: storage_dtype {storage_dtype!r} is not one of "
                              f"{', '.join(STORAGE_DTYPES)}")
        self.storage_dtype = storage_dtype
        self._storage_applied = False
        self.variants: nn.ModuleList | None = None
        self._processors: list[FrameAttnProcessor] = []
        if attention is None:
            return
        variants = list(attention) if isinstance(attention, (list, tuple, nn.ModuleList)) else \
            [attention] + [copy.deepcopy(attention) for _ in range(self.num_blocks - 1)]
        if len(variants) != self.num_blocks:
            raise TcplugError(f"{self.family} got {len(variants)} attention variants for {self.num_blocks} blocks; "
                              f"give 1 or {self.num_blocks}")
        self.variants = nn.ModuleList(variants)
        for i, (block, variant) in enumerate(zip(self.blocks, variants)):
            proc = self.processor_cls(variant, i)
            block.attn1.set_processor(proc)
            self._processors.append(proc)

    def apply_storage_dtype(self) -> bool:
        """Store the frozen weights in :attr:`storage_dtype`, cast to the model's dtype layer by
        layer as each runs (diffusers' ``enable_layerwise_casting``); adapters (``lora_``), norms,
        embeddings and the output projection stay as they are. Done once, at the first forward (after
        the module has injected its LoRA adapters, which peft would otherwise create in fp8) or when
        called; True when it applied."""
        if self.storage_dtype is None or self._storage_applied:
            return False
        compute = next((p.dtype for n, p in self.model.named_parameters() if "lora_" not in n), torch.float32)
        self.model.enable_layerwise_casting(storage_dtype=STORAGE_DTYPES[self.storage_dtype], compute_dtype=compute,
                                            skip_modules_pattern=STORAGE_SKIP)
        self._storage_applied = True
        return True

    def apply_offload(self, device: torch.device) -> bool:
        """Keep each transformer block's weights off ``device`` (in host RAM, ``offload: cpu``, or in
        safetensors files under :attr:`offload_dir`, ``offload: disk``) and load one block at a time
        as it runs: diffusers' group offloading (``enable_group_offload``, block level). For sampling
        only: a training step would lose its updates (the blocks are reloaded from the copy made when
        offloading began) and its backward pass needs every block's weights. Done once, at the first
        forward; True when it applied."""
        if self.offload is None or self._offload_applied:
            return False
        self.apply_storage_dtype()
        kwargs = {"offload_to_disk_path": self.offload_dir} if self.offload == "disk" else {}
        self.model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                        offload_type="block_level", num_blocks_per_group=1, **kwargs)
        self._offload_applied = True
        return True

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (each with a self-attention ``attn1``)."""
        raise NotImplementedError

    @property
    def supports_streaming(self) -> bool:
        """Streams when every block's variant is causal (the K/V frame buffer)."""
        if self.variants is None or not all(v.causal for v in self.variants):
            return False
        try:
            for v in self.variants:
                v.memory()
        except NotImplementedError:  # e.g. a causal variant with an unbounded window
            return False
        return True

    @property
    def lora_target(self) -> nn.Module:
        """The module LoRA adapters go into (the diffusers transformer)."""
        return self.model

    def save_lora_weights(self, out: str, state_dict: dict[str, Tensor], format: str = "diffusers") -> None:
        """Write adapters (peft state dict of :attr:`lora_target`) as the family's pipeline loads them."""
        raise NotImplementedError

    def rotary_at(self, start: int | Tensor, t: int, h: int, w: int, device: torch.device) -> Any:
        """The model's rotary embedding for latent frames ``start .. start + t`` (absolute
        positions; or, with ``start`` a tensor ``(t,)``, those frames) of ``h x w`` latents, in the
        form :meth:`FrameAttnProcessor.qkv` takes."""
        raise NotImplementedError

    def run(self, x: Tensor, timesteps: Tensor, context: dict[str, Any]) -> Tensor:
        """Call the diffusers model: latents ``(B, T', C, h, w)``, timesteps ``(B,)`` or
        ``(B, T'*N)`` -> prediction ``(B, T', C, h, w)``."""
        raise NotImplementedError

    def flat_timesteps(self, timesteps: Tensor, b: int, t: int, n: int) -> Tensor:
        """``(B,)`` as is; ``(B, T')`` and ``(B, T', N)`` -> ``(B, T'*N)`` (frame-major tokens)."""
        if timesteps.dim() == 2:
            if timesteps.shape != (b, t):
                raise TcplugError(f"per-frame timesteps {tuple(timesteps.shape)} do not match ({b}, {t})")
            return timesteps.repeat_interleave(n, dim=1)
        if timesteps.dim() == 3:
            if timesteps.shape != (b, t, n):
                raise TcplugError(f"per-token timesteps {tuple(timesteps.shape)} do not match ({b}, {t}, {n})")
            return timesteps.flatten(1)
        if timesteps.dim() != 1:
            raise TcplugError(f"timesteps of shape {tuple(timesteps.shape)}: give (B,), (B, T') or (B, T', N)")
        return timesteps

    def forward(self, x: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        self.apply_storage_dtype()
        if self.offload is not None:
            if torch.is_grad_enabled() and self.training:
                raise TcplugError(f"{self.family} backbone: offload: {self.offload} is for sampling, not training "
                                  "(diffusers' group offloading reloads each block from the copy made when offloading "
                                  "began, so a training step's updates would be lost): train with storage_dtype "
                                  "and gradient_checkpointing instead, and set offload for tcplug sample / stream")
            self.apply_offload(x.device)
        b, t, c, h, w = self.check_latents(x, f"{self.family} backbone")
        p = self.patch_size
        n = (h // p) * (w // p)
        timesteps = self.flat_timesteps(timesteps, b, t, n)
        context = context or {}
        stream = context.get("stream")
        if stream is not None and not self.supports_streaming:
            raise TcplugError(f"this {self.family} backbone cannot stream: give it a causal attention variant")
        index = frame_index(context, t, x.device)
        rotary = self.rotary_at(stream.frame_start if index is None else index, t, h, w, x.device) \
            if stream is not None or index is not None else None
        rotary_fn = (lambda pos: self.rotary_at(pos, len(pos), h, w, x.device)) if stream is not None else None
        for proc in self._processors:
            proc.grid, proc.stream, proc.rotary, proc.kv_index = (t, n), stream, rotary, index
            proc.rotary_fn = rotary_fn
        self.frame_text(context.get("text_mask"), b, t, n)
        hooks = []
        residuals = context.get("residuals")
        if residuals is not None:
            if len(residuals) != self.num_blocks:
                raise TcplugError(f"got {len(residuals)} residuals for {self.num_blocks} {self.family} blocks")
            for block, res in zip(self.blocks, residuals):
                hooks.append(block.register_forward_hook(AddResidual(res, b, t, n)))
        try:
            return self.run(x, timesteps, context)
        finally:
            for hook in hooks:
                hook.remove()
            # the streaming state goes; the frame positions and text mask stay until the next forward
            # sets them: a gradient-checkpointed block recomputes its forward in backward, after this
            for proc in self._processors:
                proc.stream = proc.rotary_fn = None

    def frame_text(self, text_mask: Tensor | None, b: int, t: int, n: int) -> None:
        """A per-frame caption mask ``(B, T', L)`` (per-shot captions) reaches every block's
        cross-attention as a per-token one (:class:`FrameTextAttnProcessor`, installed on first
        need); a ``(B, L)`` mask is the model's own business (:meth:`run`)."""
        if text_mask is None or text_mask.dim() != 3:
            for proc in getattr(self, "_text_processors", []):
                proc.mask = None
            return
        if text_mask.shape[:2] != (b, t):
            raise TcplugError(f"{self.family} backbone: per-frame text mask {tuple(text_mask.shape)} for {b} clips of "
                              f"{t} latent frames")
        if not getattr(self, "_text_processors", None):
            self._text_processors = []
            for block in self.blocks:
                proc = FrameTextAttnProcessor(block.attn2.processor)
                block.attn2.set_processor(proc)
                self._text_processors.append(proc)
        mask = text_mask.bool().repeat_interleave(n, dim=1)[:, None]  # (B, 1, T'N, L)
        for proc in self._text_processors:
            proc.mask = mask


# ----- VAE ---------------------------------------------------------------------------------------
class FrozenVideoVAE(LatentDesign):
    """A frozen diffusers video VAE as a latent design (base class).

    ``encode(video (B, T, 3, H, W)) -> (B, T', C, H/f, W/f)`` normalised as the model's
    pipeline normalises (``(z - mean) * inv_std``, buffers :attr:`mean` and :attr:`inv_std`
    ``(1, C, 1, 1, 1)`` the subclass registers); ``decode`` the inverse. With ``pretrained`` and
    ``encoder: null`` only the decoder stays in memory and the encoder is loaded from the folder
    the first time pixels are encoded, so a run on precomputed latents never loads it.

    A subclass sets :attr:`vae_cls`, :attr:`what`, and after ``super().__init__`` the latent
    attributes and normalisation buffers; it may override :meth:`vae_decode`.
    """

    vae_cls_name: str = ""
    what: str = "vae latent"
    #: attributes dropped from a decoder-only VAE (loaded again with the encoder)
    encoder_attrs: tuple[str, ...] = ("encoder", "quant_conv")

    def __init__(self, pretrained: str | None = None, subfolder: str = "vae", config: dict | None = None,
                 encoder: bool | None = None, sample: bool = False, dtype: str | None = None) -> None:
        super().__init__()
        self.vae = load_model(self._vae_cls(), self.what, pretrained, subfolder, config, dtype)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.pretrained, self.subfolder, self.dtype_name, self.sample = pretrained, subfolder, dtype, sample
        self.encoder_mode = True if pretrained is None else encoder
        if self.encoder_mode is not True:  # decoder only; the encoder comes from the folder if ever needed
            for name in self.encoder_attrs:
                if getattr(self.vae, name, None) is not None:
                    setattr(self.vae, name, None)
        self._encoder_vae = None  # not a submodule: never in the state dict

    def _vae_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.vae_cls_name)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_encoder_vae"] = None
        return state

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def encoder_loaded(self) -> bool:
        """Whether an encoder is in memory (a run on precomputed latents never loads one)."""
        return getattr(self.vae, "encoder", None) is not None or self._encoder_vae is not None

    def _encoding_vae(self, device: torch.device):
        if getattr(self.vae, "encoder", None) is not None:
            return self.vae
        if self.encoder_mode is False:
            raise TcplugError(f"{self.what} was built with encoder: false but was asked to encode pixels: the batch "
                              "has no 'latents' (train on shards made by `tcplug data encode`)")
        if self._encoder_vae is None:
            vae = load_model(self._vae_cls(), self.what, self.pretrained, self.subfolder, None, self.dtype_name)
            object.__setattr__(self, "_encoder_vae", vae.requires_grad_(False).eval())  # not a submodule
        return self._encoder_vae.to(device)

    def encode(self, video: Tensor) -> Tensor:
        self.latent_frames(video.shape[1])
        vae = self._encoding_vae(video.device)
        x = video.permute(0, 2, 1, 3, 4).to(vae.dtype)
        dist = vae.encode(x).latent_dist
        z = dist.sample() if self.sample else dist.mode()
        z = (z.float() - self.mean) * self.inv_std
        return z.permute(0, 2, 1, 3, 4).contiguous()

    def vae_decode(self, z: Tensor) -> Tensor:
        """Un-normalised latents ``(B, C, T', h, w)`` -> video ``(B, 3, T, H, W)``."""
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    def unnormalise(self, latents: Tensor) -> Tensor:
        """Normalised latents ``(B, T', C, h, w)`` -> the VAE's own ``(B, C, T', h, w)``."""
        return latents.permute(0, 2, 1, 3, 4).float() / self.inv_std + self.mean

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae_decode(self.unnormalise(latents)).permute(0, 2, 1, 3, 4).float()

    #: latent frames of the previous chunk a streamed chunk is decoded with
    stream_context: int = 2

    def decode_stream(self, latents: Tensor, state: dict[str, Any]) -> Tensor:
        """Decode one streamed chunk of latent frames. The decoder sees the previous chunk's
        last ``stream_context`` latent frames again (their pixels are dropped), so the chunk
        continues the video: ``1 + c(k - 1)`` pixel frames for the first chunk of ``k`` latent
        frames, ``c k`` for every later one (``c`` the temporal compression), as the whole
        video would have. Not exact: a frame sees ``stream_context`` latent frames of the past
        (a decoder's receptive field is longer) and none of the next group's; a family whose
        decoder can carry its own cache across calls overrides this (Wan's).

        No decoder call sees more latent frames than the first chunk had (nor fewer than
        ``stream_context + 1``): a later chunk is decoded in groups of ``k - stream_context``
        new frames, each with its context, so the decoder's peak memory at any length is the
        first chunk's (a decoder's activations grow with its frames). The price is
        ``ceil(k / (k - stream_context))`` decoder calls per chunk."""
        prev = state.get("vae_context")
        c = self.temporal_compression
        if prev is None:
            state["vae_window"] = latents.shape[1]
            video = self.decode(latents)
            prev = latents
        else:
            group = max(1, state["vae_window"] - prev.shape[1])
            parts = []
            for start in range(0, latents.shape[1], group):
                z = torch.cat([prev, latents[:, start:start + group]], dim=1)
                parts.append(self.decode(z)[:, 1 + c * (prev.shape[1] - 1):])
                prev = z[:, -self.stream_context:]
            video = torch.cat(parts, dim=1)
        state["vae_context"] = prev[:, -self.stream_context:]
        return video


# ----- text --------------------------------------------------------------------------------------
class FrozenTextEncoder(WorldConditioner):
    """A frozen text encoder of a model folder as a conditioner (base class): prompts cleaned,
    tokenised and encoded exactly as the family's pipeline does (its ``encode_prompt`` is
    called), or precomputed embeddings from the batch.

    A batch that carries ``text_emb`` ``(B, L, D)`` (and ``text_mask`` ``(B, L)`` for a family
    whose model masks padding tokens) is used as is; the encoder is loaded from the folder only
    the first time a batch has prompts and no embeddings, so a run on precomputed shards never
    loads it. Context keys: ``text`` ``(B, L, D)`` and, when :attr:`uses_mask`, ``text_mask``
    ``(B, L)`` bool. The unconditional branch of classifier-free guidance (and caption dropout in
    training) uses the negative prompt's embedding: from the batch's ``negative_text_emb`` (shards
    made by ``tcplug data encode`` carry it), else from a ``negative_embeds`` file, else encoded.

    A subclass sets :attr:`what`, :attr:`encoder_cls_name` (a ``transformers`` class),
    :attr:`uses_mask` and implements :meth:`encode_with`.
    """

    needs = ("txt|text_emb",)
    what: str = "text"
    encoder_cls_name: str = ""
    uses_mask: bool = False

    def __init__(self, pretrained: str | None = None, precomputed: bool = False, negative_prompt: str = "",
                 negative_embeds: str | None = None, max_length: int = 512, dropout: float = 0.1,
                 per_shot: bool = False) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise TcplugError(f"{self.what} dropout must be in [0, 1), got {dropout}")
        if per_shot and precomputed:
            raise TcplugError(f"{self.what}: per_shot encodes each shot's caption from the prompts; precomputed "
                              "embeddings hold the video's caption only")
        self.per_shot = per_shot
        if per_shot:
            self.needs = ("txt", "state")
        if pretrained is None and not precomputed:
            raise TcplugError(f"{self.what}: give pretrained (a local model folder) or precomputed: true")
        if pretrained is not None:  # fail now, not at the first prompt
            subfolder(pretrained, "text_encoder", self.what)
            subfolder(pretrained, "tokenizer", self.what)
        self.pretrained, self.precomputed, self.negative_prompt = pretrained, precomputed, negative_prompt
        self.max_length, self.dropout = max_length, dropout
        self._encoder = None  # loaded on first need; not a submodule: never in the state dict
        self._tokenizer = None
        self._negative: tuple[Tensor, Tensor] | None = None
        if negative_embeds is not None:
            import numpy as np

            if not Path(negative_embeds).is_file():
                raise TcplugError(f"{self.what} negative_embeds={negative_embeds!r} is not a file")
            emb = torch.from_numpy(np.load(negative_embeds)).float()
            self._negative = (emb, torch.ones(emb.shape[0], dtype=torch.bool))  # a file has no mask: all tokens

    def __getstate__(self):  # tokenizers hold rust objects; the encoder reloads from the folder
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_encoder"] = None
        return state

    @property
    def text_encoder(self) -> nn.Module | None:
        """The loaded encoder, or None while none was needed."""
        return self._encoder

    def _load(self, device: torch.device) -> None:
        if self.precomputed:
            raise TcplugError(f"{self.what} is precomputed: the batch must carry text_emb (shards made by "
                              "`tcplug data encode`); it has prompts only")
        import transformers
        from transformers import AutoTokenizer

        path = Path(self.pretrained)
        if self._encoder is None:
            try:
                encoder = getattr(transformers, self.encoder_cls_name).from_pretrained(path / "text_encoder",
                                                                                      local_files_only=True)
            except Exception as exc:
                raise TcplugError(f"{self.what}: cannot load the text encoder from {path}: {_load_error(exc)}") from None
            object.__setattr__(self, "_encoder", encoder.requires_grad_(False).eval())  # not registered
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        self._encoder.to(device)

    def encode_with(self, tokenizer, encoder: nn.Module, prompts: list[str], device: torch.device
                    ) -> tuple[Tensor, Tensor | None]:
        """Prompts -> ``(B, L, D)`` embeddings and ``(B, L)`` mask (or None) through the
        family pipeline's ``encode_prompt``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Prompts -> embeddings ``(B, max_length, D)`` and mask ``(B, max_length)`` bool."""
        device = torch.device(device)
        self._load(device)
        emb, mask = self.encode_with(self._tokenizer, self._encoder, list(prompts), device)
        if mask is None:
            mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
        return emb.float(), mask.bool()

    def negative(self, b: int, like: Tensor, batch: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """The negative prompt's embedding ``(b, L, D)`` and mask ``(b, L)``."""
        if batch is not None and batch.get("negative_text_emb") is not None:
            emb = batch["negative_text_emb"][0].detach().float().cpu()
            mask = batch.get("negative_text_mask")
            mask = mask[0].detach().cpu().bool() if mask is not None else torch.ones(emb.shape[0], dtype=torch.bool)
            self._negative = (emb, mask)
        if self._negative is None:
            emb, mask = self.encode([self.negative_prompt], like.device)
            self._negative = (emb[0].cpu(), mask[0].cpu())
        emb, mask = self._negative
        return (emb.to(like.device, like.dtype).unsqueeze(0).expand(b, -1, -1),
                mask.to(like.device).unsqueeze(0).expand(b, -1))

    def _context(self, text: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"text": text, "text_mask": mask} if self.uses_mask else {"text": text}

    def forward(self, batch: dict[str, Any], latent_shape: tuple[int, ...]) -> dict[str, Any]:
        b = latent_shape[0]
        device = next((v.device for v in batch.values() if torch.is_tensor(v)), torch.device("cpu"))
        if batch.get("text_emb") is not None:
            text = batch["text_emb"].float()
            mask = batch.get("text_mask")
            mask = mask.bool() if mask is not None else torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            if text.shape[0] == 1 and b > 1:
                text, mask = text.expand(b, -1, -1), mask.expand(b, -1)
        else:
            texts = batch.get("txt")
            if texts is None:
                raise TcplugError(f"{self.what} needs a prompt: the batch has no txt and no text_emb "
                                  "(give --caption when sampling)")
            texts = [texts] if isinstance(texts, str) else list(texts)
            if len(texts) == 1 and b > 1:
                texts = texts * b
            if len(texts) != b:
                raise TcplugError(f"{self.what} got {len(texts)} prompts for {b} clips")
            text, mask = self.encode(texts, device)
        if text.shape[0] != b:
            raise TcplugError(f"{self.what} got {text.shape[0]} text embeddings for {b} clips")
        drop = torch.zeros(b, dtype=torch.bool, device=text.device)
        if self.training and self.dropout > 0:
            drop = (torch.rand(b) < self.dropout).to(text.device)
            neg, neg_mask = self.negative(b, text, batch)
            text = torch.where(drop.view(-1, 1, 1), neg, text)
            mask = torch.where(drop.view(-1, 1), neg_mask, mask)
        elif batch.get("negative_text_emb") is not None:  # keep it for guidance at sampling
            self.negative(b, text, batch)
        if self.per_shot:
            return self.shot_context(text, mask, drop.tolist(), batch, latent_shape)
        return self._context(text, mask)

    def shot_context(self, text: Tensor, mask: Tensor, drop: list[bool], batch: dict[str, Any],
                     latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Per-shot captions (HoloCine's per-shot prompts): the video's caption ``text`` ``(B, L, D)``
        and each shot's (the state's ``shots[k]["caption"]``), encoded alike and laid end to end
        ``(B, (1 + n) L, D)``, with ``text_mask`` ``(B, T', (1 + n) L)``: each latent frame sees the
        video's caption and its own shot's (:func:`tcplug.shot_text_mask`). A clip dropped for
        guidance keeps only the negative prompt. The backbone attends with the per-frame mask
        (:class:`FrameTextAttnProcessor`)."""
        b, t_lat = latent_shape[0], latent_shape[1]
        states = batch.get("state")
        if states is None:
            raise TcplugError(f"{self.what} (per_shot) needs the clips' state (its shots and their captions)")
        states = [states] if isinstance(states, dict) else list(states)
        states = states * b if len(states) == 1 and b > 1 else states
        frames = batch["video"].shape[1] if batch.get("video") is not None else batch.get("num_frames") or t_lat
        per, n = shot_captions(states, drop)
        emb, tok = self.encode([c for row in per for c in row], text.device)  # (B n, L, D)
        length = text.shape[1]
        if emb.shape[1] != length:
            raise TcplugError(f"{self.what} (per_shot): shot captions encode to {emb.shape[1]} tokens, the video's "
                              f"to {length}")
        tok = tok.view(b, n, length) & ~torch.tensor(drop, device=tok.device).view(b, 1, 1)
        full = torch.cat([text[:, None], emb.to(text).view(b, n, length, -1)], 1).flatten(1, 2)
        tokens = torch.cat([mask[:, None].to(tok.device), tok], 1)  # (B, 1+n, L)
        return {"text": full, "text_mask": shot_text_mask(states, frames, t_lat, tokens)}

    def stream_context(self, batch: dict[str, Any], latent_shape: tuple[int, ...], start: int,
                       state: dict[str, Any]) -> dict[str, Any]:
        if self.per_shot:
            raise TcplugError(f"{self.what}: per-shot captions are sampled all at once, not streamed")
        return super().stream_context(batch, latent_shape, start, state)

    def precompute(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """For ``tcplug data encode``: ``text_emb`` ``(B, L, D)`` (and ``text_mask`` ``(B, L)``)
        of the batch's prompts."""
        texts = batch.get("txt")
        if texts is None:
            raise TcplugError(f"{self.what}: the shards have no txt captions to encode")
        emb, mask = self.encode(list(texts), batch["video"].device)
        return {"text_emb": emb, "text_mask": mask.float()} if self.uses_mask else {"text_emb": emb}

    def precompute_shared(self) -> dict[str, Tensor]:
        """For ``tcplug data encode``: the negative prompt's embedding (and mask), written once."""
        emb, mask = self.encode([self.negative_prompt])
        out = {"negative_text_emb": emb[0]}
        if self.uses_mask:
            out["negative_text_mask"] = mask[0].float()
        return out

    def null_context(self, context: dict[str, Any]) -> dict[str, Any]:
        """The negative prompt's context (the unconditional branch of guidance; with per-shot
        captions, the negative prompt for every frame)."""
        emb, mask = self.negative(context["text"].shape[0], context["text"])
        out = {**context, **self._context(emb, mask)}
        if self.per_shot and not self.uses_mask:
            out.pop("text_mask", None)
        return out


__all__ = ["AddResidual", "FrameAttnProcessor", "FrameTextAttnProcessor", "FrozenTextEncoder", "FrozenVideoVAE", "JointTokenBackbone",
           "load_model", "subfolder"]

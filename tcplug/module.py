"""The one LightningModule: composes the injected components into a training step.

The module never names a concrete technique. It receives components (built by
jsonargparse from the recipe, registry names resolved) and wires them:

``video -> latent.encode -> add noise -> [router ->] backbone(+ conditioner context)
-> loss terms -> backward``; validation also samples clips, writes them as mp4 into the
run folder and as animated images to TensorBoard.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from tcplug.errors import TcplugError
from tcplug.kinds import (
    Backbone,
    Discriminator,
    LatentDesign,
    LossContext,
    LossTerm,
    MotionLocker,
    Router,
    VideoMetric,
    WorldConditioner,
)
from tcplug.lora import LoraSpec, apply_lora
from tcplug.metrics import (
    DEFAULT_METRICS,
    MetricSuite,
    TemporalVarianceScore,
    build_metrics,
    to_unit,
)
from tcplug.registry import get_registry, snake_case
from tcplug.sampling import NoiseSchedule, frame_noise, locked_positions, sample_loop, stream_sample
from tcplug.video import add_video_gif, to_uint8, write_video


class TCPlugModule(pl.LightningModule):
    """Video diffusion over injected components.

    Args:
        backbone: the denoiser (kind ``backbone``), carrying its attention variant(s); or a list
            of backbones, one per expert of a router with ``experts: backbone`` (expert 0 takes
            the highest noise), e.g. Wan 2.2's ``transformer/`` and ``transformer_2/`` instead of
            copies of one.
        latent: the latent design (kind ``latent``); default ``pixel``.
        losses: loss terms (kind ``loss``); default ``[denoise]``.
        discriminator: judges clips for an adversarial term (kind ``discriminator``).
        router: noise-level expert routing (kind ``router``); with ``num_experts > 1`` the
            backbone is cloned once per expert (``experts: backbone``) or its feed-forward
            layers are (``experts: ffn``).
        conditioner: structural conditioning (kind ``conditioner``): one, or a list whose
            contexts are merged (residuals summed).
        motion_lock: static-region locking (kind ``motion_lock``).
        metrics: what validation measures on the sampled clips (kind ``metric``), each logged
            as ``val/<name>`` and, measured the same way on the data clips the samples were
            conditioned on, as ``val/<name>_data`` (the data floor). Reference clips are the
            rest of the validation batch. Default: :data:`~tcplug.metrics.DEFAULT_METRICS`
            plus ``bg_flicker`` and ``trajectory_error`` (which report only when the data
            has a static mask / object state).
        guidance_scale: classifier-free guidance at sampling, for conditioners with a null
            context (captions); 1 = the conditional prediction alone.
        lock_timestep: the near-zero timestep of locked tokens (training and sampling).
        lock_copy_anchor: at the end of sampling, overwrite locked tokens with the anchor
            frame's latents (exactly still, but copied rather than generated; off by default).
        lock_prob: fraction of training batches that get the motion lock (the others train
            the unlocked model).
        lock_loss_weight: weight of locked tokens in the denoising loss (they are given, not
            predicted; 0 = ignore them).
        preview_steps: sampler steps of the cheap first pass a motion locker may ask for.
        compile: ``torch.compile`` every expert backbone in place (``nn.Module.compile``; the
            checkpoint keys do not change). For GPUs; the first steps pay the compilation.
        noise: ``ddpm`` (discrete VP schedule) or ``flow_matching``.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` for ddpm; ``flow`` for
            flow matching.
        sampler: ``ddim`` or ``ddpm`` for ddpm (flow matching always uses Euler).
        num_train_timesteps: discrete training timesteps.
        beta_schedule: diffusers beta schedule name for ddpm.
        shift: flow-matching timestep shift (``1`` = none), used identically in training
            and sampling.
        scheduler: sample with this diffusers scheduler instead: a local scheduler folder (a
            model folder's ``scheduler/``, e.g. Wan's UniPC with its ``flow_shift``) or a config
            dict with ``_class_name``. It must parameterise the model as training does
            (``flow_matching`` for a ``flow_prediction`` scheduler); set ``shift`` to its shift.
        lora: train LoRA adapters (peft) instead of the whole backbone: ``{rank, alpha,
            target_modules, dropout}`` (:class:`tcplug.lora.LoraSpec`). Every other backbone weight
            is frozen; weights a component loaded from a local model folder and keeps frozen are
            left out of checkpoints (they are reloaded from the folder). ``tcplug export CKPT
            --lora OUT`` writes the adapters in the family's pipeline format.
        train_experts: with several expert backbones, train only these (indices; expert 0 takes
            the highest noise); the others are frozen. Default: all.
        lr: AdamW learning rate; weight_decay, betas: AdamW settings. Any submodule with a
            float attribute ``lr_scale`` (a component's part that must learn faster or slower,
            e.g. ``physics_state``'s dynamics) trains at ``lr * lr_scale`` in a parameter
            group of its own.
        warmup_steps: linear learning-rate warm-up.
        gradient_clip: max gradient norm (None = no clipping), for every optimizer.
        disc_lr: the discriminator's learning rate (its own AdamW); disc_betas: its betas.
        sample_steps: sampler steps for validation samples.
        num_val_samples: clips sampled at each validation (0 = none).
        sample_fps: frame rate of the written mp4 samples.
    """

    def __init__(
        self,
        backbone: Backbone | list[Backbone],
        latent: LatentDesign | None = None,
        losses: list[LossTerm] | None = None,
        discriminator: Discriminator | None = None,
        router: Router | None = None,
        conditioner: WorldConditioner | list[WorldConditioner] | None = None,
        motion_lock: MotionLocker | None = None,
        metrics: list[VideoMetric] | None = None,
        noise: Literal["ddpm", "flow_matching"] = "ddpm",
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
        sampler: Literal["ddim", "ddpm", "euler"] = "ddim",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        shift: float = 1.0,
        scheduler: str | dict | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        gradient_clip: float | None = 1.0,
        disc_lr: float = 2e-4,
        disc_betas: tuple[float, float] = (0.5, 0.9),
        sample_steps: int = 20,
        num_val_samples: int = 2,
        sample_fps: int = 8,
        guidance_scale: float = 1.0,
        lock_timestep: float = 0.0,
        lock_copy_anchor: bool = False,
        lock_prob: float = 0.5,
        lock_loss_weight: float = 0.0,
        preview_steps: int = 4,
        compile: bool = False,
        lora: LoraSpec | None = None,
        train_experts: list[int] | None = None,
    ) -> None:
        super().__init__()
        registry = get_registry()
        self.latent = latent if latent is not None else registry.get("latent", "pixel")()
        self.losses = nn.ModuleList(losses if losses is not None else [registry.get("loss", "denoise")()])
        if len(self.losses) == 0:
            raise TcplugError("model.losses is empty: give at least one loss term (e.g. denoise)")
        given = list(backbone) if isinstance(backbone, (list, tuple, nn.ModuleList)) else None
        if given is not None:  # one backbone per expert (e.g. Wan 2.2's transformer and transformer_2)
            n = router.num_experts if router is not None else 1
            if router is None or getattr(router, "experts", "backbone") != "backbone" or len(given) != n:
                raise TcplugError(f"model.backbone is a list of {len(given)} backbones: that needs a router with "
                                  f"experts: backbone and num_experts: {len(given)} (got "
                                  f"{'no router' if router is None else f'{n} experts'})")
            backbone = given[0]
        if backbone.in_channels != self.latent.latent_channels:
            raise TcplugError(
                f"backbone.in_channels={backbone.in_channels} but the latent design "
                f"{type(self.latent).__name__} has latent_channels={self.latent.latent_channels}"
            )
        self.discriminator = discriminator
        adversarial = [t for t in self.losses if hasattr(t, "discriminator_loss")]
        if adversarial and discriminator is None:
            raise TcplugError("an adversarial loss term needs model.discriminator (e.g. class_path: conv3d)")
        # a discriminator that some term trains: alternate G and D steps with their own optimizers
        self.automatic_optimization = not adversarial
        conditioners = [] if conditioner is None else [conditioner] if isinstance(conditioner, nn.Module) \
            else list(conditioner)
        for c in conditioners:  # size adapters to the backbone, add cross-attention, ... before cloning it
            for expert in given or [backbone]:
                c.setup(expert)
        self.conditioners = nn.ModuleList(conditioners)
        self.router = router
        n_experts = router.num_experts if router is not None else 1
        experts_in = getattr(router, "experts", "backbone")
        if experts_in not in ("backbone", "ffn"):
            raise TcplugError(f"router experts={experts_in!r}: use 'backbone' or 'ffn'")
        if experts_in == "ffn" and n_experts > 1:
            backbone.add_ffn_experts(n_experts)
            n_experts = 1
        if given is not None:
            self.experts = nn.ModuleList(given)
        else:
            self.experts = nn.ModuleList([backbone] + [copy.deepcopy(backbone) for _ in range(n_experts - 1)])
        self.lora = lora
        if lora is not None:  # adapters only: every other backbone weight is frozen
            for expert in self.experts:
                apply_lora(expert, lora)
        self.train_experts = train_experts
        if train_experts is not None:  # the other experts are frozen (their batches still flow through them)
            bad = [i for i in train_experts if not 0 <= i < len(self.experts)]
            if bad or not train_experts:
                raise TcplugError(f"model.train_experts {train_experts}: give indices in 0..{len(self.experts) - 1}")
            for i, expert in enumerate(self.experts):
                if i not in train_experts:
                    expert.requires_grad_(False)
        self.motion_lock = motion_lock
        if not 0 <= lock_prob <= 1:
            raise TcplugError(f"model.lock_prob must be in [0, 1], got {lock_prob}")
        self.guidance_scale, self.lock_timestep, self.lock_prob = guidance_scale, lock_timestep, lock_prob
        self.lock_loss_weight, self.preview_steps = lock_loss_weight, preview_steps
        self.lock_copy_anchor = lock_copy_anchor
        for name, value, low in (("lr", lr, 0.0), ("disc_lr", disc_lr, 0.0)):
            if not value > low:
                raise TcplugError(f"model.{name} must be > 0, got {value}")
        if weight_decay < 0 or warmup_steps < 0 or sample_steps < 1 or num_val_samples < 0:
            raise TcplugError("model.weight_decay and warmup_steps must be >= 0, sample_steps >= 1 and "
                              f"num_val_samples >= 0 (got {weight_decay}, {warmup_steps}, {sample_steps}, {num_val_samples})")
        self.compile_backbone = compile
        self.schedule = NoiseSchedule(noise, prediction_type, num_train_timesteps, beta_schedule, sampler, shift,
                                      scheduler)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.gradient_clip, self.disc_lr, self.disc_betas = gradient_clip, disc_lr, tuple(disc_betas)
        self.sample_steps, self.num_val_samples, self.sample_fps = sample_steps, num_val_samples, sample_fps
        named = build_metrics(DEFAULT_METRICS + ("bg_flicker", "trajectory_error")) if metrics is None else \
            {self._component_name(m): m for m in metrics}
        self.val_metrics = MetricSuite(named)
        self.val_metrics_data = MetricSuite(copy.deepcopy(named))
        self.val_tvs_data_gt = TemporalVarianceScore()
        self._measured = False
        self._skipped: dict[int, int] = {}
        self._loss_names: list[str] = []
        for i, term in enumerate(self.losses):  # two terms of one kind log as name, name_2
            name = self._component_name(term)
            self._loss_names.append(name if name not in self._loss_names else f"{name}_{i + 1}")
        # the component objects are saved through the CLI's config; keep plain values here
        self.save_hyperparameters(ignore=["backbone", "latent", "losses", "discriminator", "router",
                                          "conditioner", "motion_lock", "metrics"])

    @property
    def backbone(self) -> Backbone:
        return self.experts[0]

    @staticmethod
    def _component_name(component: nn.Module) -> str:
        return get_registry().name_of(type(component)) or snake_case(type(component).__name__)

    # ----- the model ---------------------------------------------------------------------
    def context(self, batch: dict[str, Any] | None, latent_shape: tuple[int, ...]) -> dict[str, Any] | None:
        """Conditioning for the backbone: the conditioners' contexts merged (residuals summed)."""
        if len(self.conditioners) == 0:
            return None
        merged: dict[str, Any] = {}
        for c in self.conditioners:
            for key, value in c(batch, latent_shape).items():
                if key == "residuals" and key in merged:
                    merged[key] = [a + b for a, b in zip(merged[key], value)]
                elif key in ("maps", "input_maps") and key in merged:
                    merged[key] = torch.cat([merged[key], value], dim=2)
                elif key in merged:
                    raise TcplugError(f"two conditioners both set context[{key!r}]")
                else:
                    merged[key] = value
        return merged

    def null_context(self, context: dict[str, Any] | None) -> dict[str, Any] | None:
        """The unconditional context for guidance (None if no conditioner has one)."""
        if context is None or not any(hasattr(c, "null_context") for c in self.conditioners):
            return None
        for c in self.conditioners:
            if hasattr(c, "null_context"):
                context = c.null_context(context)
        return context

    def _token_timesteps(self, timesteps: Tensor) -> Tensor:
        """Per-latent-pixel timesteps ``(B, T, 1, h, w)`` -> per backbone token ``(B, T, N)``."""
        if timesteps.dim() != 5:
            return timesteps
        p = self.backbone.patch_size
        t = timesteps[:, :, 0].float()
        if p > 1:
            t = torch.nn.functional.avg_pool2d(t, p)
        return t.flatten(2)

    def route(self, timesteps: Tensor) -> Tensor | None:
        """Expert weights ``(B, E)`` for timesteps of any granularity (None without a router).

        Per-frame/per-token timesteps route by their maximum: the noise level of the free
        tokens (locked tokens carry a near-zero timestep). Training and sampling both call this.
        """
        if self.router is None:
            return None
        return self.router(_clip_timesteps(timesteps), self.schedule)

    def denoise(self, xt: Tensor, timesteps: Tensor, context: dict[str, Any] | None = None) -> Tensor:
        """The (routed) backbone prediction for noisy latents ``(B, T, C, h, w)``.

        ``timesteps`` are per clip ``(B,)``, per frame ``(B, T)`` or per latent pixel
        ``(B, T, 1, h, w)`` (motion locking), converted to per-token for the backbone.
        """
        weights = self.route(timesteps)
        t_in = self._token_timesteps(timesteps)
        if weights is None:
            return self.experts[0](xt, t_in, context)
        if len(self.experts) == 1:  # feed-forward experts inside the backbone
            return self.experts[0](xt, t_in, {**(context or {}), "expert_weights": weights})
        out = torch.zeros_like(xt)
        for e, expert in enumerate(self.experts):
            w = weights[:, e]
            rows = (w != 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            ctx = None if context is None else {k: _rows(v, rows) for k, v in context.items()}
            out = out.index_add(0, rows, expert(xt[rows], t_in[rows], ctx) * w[rows].view(-1, 1, 1, 1, 1))
        return out

    def guided(self, xt: Tensor, timesteps: Tensor, context: dict[str, Any] | None,
               null: dict[str, Any] | None, scale: float) -> Tensor:
        """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``scale == 1`` (or no
        unconditional context) is the conditional prediction alone, at the cost of one pass."""
        cond = self.denoise(xt, timesteps, context)
        if null is None or scale == 1:
            return cond
        uncond = self.denoise(xt, timesteps, null)
        return uncond + scale * (cond - uncond)

    def lock_mask(self, batch: dict[str, Any] | None, context: dict[str, Any] | None,
                  latent_shape: tuple[int, ...], preview=None) -> Tensor | None:
        """The motion locker's mask reduced to whole backbone tokens, at latent resolution
        ``(B, 1, 1, h, w)`` (1 = locked), or None."""
        if self.motion_lock is None:
            return None
        mask = self.motion_lock(batch or {}, context, preview)
        if mask is None:
            return None
        b, _, _, h, w = latent_shape
        mask = mask.float().to(self.device)
        if mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, -1, -1, -1)
        if mask.dim() != 4 or mask.shape[:2] != (b, 1):
            raise TcplugError(f"motion lock mask must be (B, 1, H, W) with B={b}, got {tuple(mask.shape)}")
        p = self.backbone.patch_size
        # a token is locked only if every pixel under it is: min-pool to the token grid
        tok = 1 - torch.nn.functional.adaptive_max_pool2d(1 - mask, (h // p, w // p))
        tok = (tok > 0.5).float()
        return torch.nn.functional.interpolate(tok, size=(h, w), mode="nearest").unsqueeze(1)

    def auxiliary_losses(self, batch: dict[str, Any], timesteps: Tensor) -> dict[str, tuple[float, Tensor]]:
        """Objectives of the router and conditioners themselves: ``{name: (weight, value)}``."""
        out = {}
        if hasattr(self.router, "auxiliary_loss"):
            name = getattr(self.router, "aux_name", None) or self._component_name(self.router)
            out[name] = (self.router.aux_weight, self.router.auxiliary_loss(_clip_timesteps(timesteps), self.schedule))
        for c in self.conditioners:
            if hasattr(c, "auxiliary_loss"):
                out[getattr(c, "aux_name", None) or self._component_name(c)] = (c.aux_weight, c.auxiliary_loss(batch))
        return out

    def training_losses(self, batch: dict[str, Any], return_context: bool = False):
        """Total loss and each unweighted term for one batch (and the LossContext if asked)."""
        video = batch["video"]
        if video.dim() != 5:
            raise TcplugError(f"batch['video'] must be (B, T, C, H, W), got shape {tuple(video.shape)}")
        if batch.get("latents") is not None:  # precomputed (tcplug data encode): the encoder never runs
            x0 = batch["latents"].float()
            want = self.latent.latent_frames(video.shape[1])
            if x0.dim() != 5 or x0.shape[1] != want or x0.shape[2] != self.latent.latent_channels:
                raise TcplugError(
                    f"precomputed latents of shape {tuple(x0.shape)} do not fit this recipe's latent design "
                    f"({want} latent frames of {self.latent.latent_channels} channels for {video.shape[1]} frames): "
                    "were the shards encoded with another VAE or frame count? Re-run `tcplug data encode`"
                )
        else:
            with torch.no_grad():  # diffusion never moves the latent space; its own terms train it
                x0 = self.latent.encode(video)
        noise = torch.randn_like(x0)
        t = self.schedule.sample_timesteps(x0.shape[0], x0.device)
        context = self.context(batch, tuple(x0.shape))
        weight_mask = None
        lock = None
        if self.motion_lock is not None and float(torch.rand(())) < self.lock_prob:
            lock = self.lock_mask(batch, context, tuple(x0.shape))
        if lock is not None:
            # locked tokens of frames after the anchor: the anchor's content and noise, near-zero t
            locked = locked_positions(lock, x0.shape[1])
            x0 = torch.where(locked, x0[:, :1], x0)
            noise = torch.where(locked, noise[:, :1], noise)
            t = torch.where(locked, torch.full_like(locked, self.lock_timestep, dtype=torch.float),
                            t.float().view(-1, 1, 1, 1, 1))
            weight_mask = torch.where(locked, self.lock_loss_weight, 1.0).float()
        xt = self.schedule.add_noise(x0, noise, t)
        self._last_timesteps = t
        pred = self.denoise(xt, t, context)
        ctx = LossContext(batch=batch, x0=x0, noise=noise, xt=xt, timesteps=t, pred=pred,
                          target=self.schedule.target(x0, noise, t), schedule=self.schedule,
                          latent=self.latent, discriminator=self.discriminator, step=self.global_step,
                          weight_mask=weight_mask)
        terms: dict[str, Tensor] = {}
        total = x0.new_zeros(())
        for name, term in zip(self._loss_names, self.losses):
            value = term(ctx)
            terms[name] = value
            total = total + term.weight * value
        for name, (weight, value) in self.auxiliary_losses(batch, t).items():
            terms[name] = value
            total = total + weight * value
        return (total, terms, ctx) if return_context else (total, terms)

    def forward(self, xt: Tensor, timesteps: Tensor) -> Tensor:
        """One unconditioned denoiser pass (what the model summary counts FLOPs with)."""
        return self.denoise(xt, timesteps)

    def _example_input(self) -> None:
        """A one-clip latent batch shaped like the run's data, so the model summary shows the
        denoiser's FLOPs and tensor sizes instead of zeros."""
        data = getattr(getattr(self, "_trainer", None), "datamodule", None)
        frames, size = getattr(data, "frames", None), getattr(data, "size", None)
        if not frames or not size:
            return
        f = self.latent.downsample
        try:
            shape = (1, self.latent.latent_frames(frames), self.latent.latent_channels, size // f, size // f)
        except TcplugError:
            return
        self.example_input_array = (torch.zeros(shape), torch.full((1,), self.schedule.num_train_timesteps // 2))

    def setup(self, stage: str) -> None:
        self._example_input()
        # in setup rather than configure_model: Lightning's weight averaging (EMA) warns about
        # any model that overrides configure_model (it cannot average sharded layers)
        if self.compile_backbone and not getattr(self, "_compiled", False):
            for expert in self.experts:
                expert.compile()
            self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this step's randomness (noise, timesteps, dropout) from ``(seed, step, rank)``:
        a resumed run draws exactly what the uninterrupted run drew, wherever it was killed."""
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        torch.manual_seed((base * 1_000_003 + self.global_step) * 1009 + self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            total, terms = self.training_losses(batch)
            self._check_finite(terms)
        else:
            total, terms = self._adversarial_step(batch)
        bs = batch["video"].shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self._log_expert_share(bs)
        if "skipped" in batch:  # running count of unreadable samples in the worker that made this batch
            self._skipped[int(batch.get("worker", 0))] = int(batch["skipped"])
            self.log("data/skipped", float(sum(self._skipped.values())), batch_size=bs, reduce_fx="max")
        return total

    def _log_expert_share(self, bs: int) -> None:
        """``train/expert_share_<e>``: the share of this batch's samples routed to expert ``e``
        (mean routing weight), so a boundary's real split of the data is visible."""
        n = self.router.num_experts if self.router is not None else 1
        if n < 2 or getattr(self, "_last_timesteps", None) is None:
            return
        with torch.no_grad():
            share = self.route(self._last_timesteps).float().mean(0)
        for e in range(n):
            self.log(f"train/expert_share_{e}", share[e], batch_size=bs)

    def _check_finite(self, terms: dict[str, Tensor]) -> None:
        """Stop the run, naming the term and the step, before a NaN/Inf reaches the weights.

        Raised before the optimizer step, so the weights and every checkpoint written so far
        (``last.ckpt`` included) stay as they were.
        """
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise TcplugError(
                    f"loss term {name!r} is {float(value.detach().float().flatten()[0])} at step "
                    f"{self.global_step}: stopping before the weights are touched; the last good "
                    "checkpoint is kept (resume with --ckpt_path)"
                )

    def _adversarial_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Manual optimization: a generator step, then a discriminator step (own optimizer)."""
        opt_g, opt_d = self.optimizers()
        total, terms, ctx = self.training_losses(batch, return_context=True)
        self._check_finite(terms)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        self._clip(opt_g)
        opt_g.step()
        d_losses = [t.discriminator_loss(ctx, self.discriminator) for t in self.losses if hasattr(t, "discriminator_loss")]
        d_losses = [d for d in d_losses if d is not None]
        if d_losses:
            d_loss = torch.stack(d_losses).sum()
            self._check_finite({"discriminator": d_loss})
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            with _not_counted(opt_d):
                opt_d.step()
            terms["discriminator"] = d_loss.detach()
        sched = self.lr_schedulers()
        if sched is not None:
            for s in sched if isinstance(sched, list) else [sched]:
                s.step()
        return total, terms

    def _clip(self, optimizer) -> None:
        if self.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # trainer.gradient_clip_val wins if set; otherwise model.gradient_clip
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self._clip(optimizer)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, _ = self.training_losses(batch)
        self.log("val/loss", total, prog_bar=True, sync_dist=True, batch_size=batch["video"].shape[0])
        if batch_idx == 0 and self.num_val_samples > 0 and not self.trainer.sanity_checking:
            video, sub = self._sample_like(batch)
            self._update_metrics(video, sub, batch)
            # trainer.log_dir is a collective under DDP: read it on every rank
            log_dir = None if self.trainer.fast_dev_run else self.trainer.log_dir
            self._write_samples(video, log_dir)

    def _sample_like(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        b, t, _, h, w = batch["video"].shape
        n = min(self.num_val_samples, b)
        from tcplug.data.shards import slice_batch

        sub = slice_batch(batch, slice(0, n))
        seed = self.global_rank * 1000  # each rank samples different clips
        return self.generate(n, t, h, w, batch=sub, seed=seed), sub

    def _update_metrics(self, video: Tensor, sub: dict[str, Any], batch: dict[str, Any]) -> None:
        """Feed the validation metrics: the sampled clips (``val/<name>``) and, measured the same
        way (DIS flow), the data clips they were conditioned on (``val/<name>_data``, the data
        floor), each against the same reference: the rest of the validation batch (all of it
        when the batch holds only the sampled clips). ``val/tvs_data_gt`` is the data's TVS
        with ground-truth flow where the data has it."""
        gen, data = to_unit(video), to_unit(sub["video"])
        n = gen.shape[0]
        ref = to_unit(batch["video"][n:] if batch["video"].shape[0] > n else batch["video"])
        ref_flows = self.val_metrics.flows(ref)
        for suite, clips in ((self.val_metrics, gen), (self.val_metrics_data, data)):
            suite.update_reference(ref, flows=ref_flows)
            suite.update(clips, batch=sub)
        if sub.get("flow") is not None and sub.get("flow_bwd") is not None:
            self.val_tvs_data_gt.update(data, (sub["flow"], sub["flow_bwd"]))
        self._measured = True

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics (reduced across DDP processes by torchmetrics)."""
        if not self._measured:
            return
        values = {f"val/{k}": v for k, v in self.val_metrics.compute().items()}
        values.update({f"val/{k}_data": v for k, v in self.val_metrics_data.compute().items()})
        gt = float(self.val_tvs_data_gt.compute())
        if gt == gt:
            values["val/tvs_data_gt"] = gt
        steps = getattr(self, "sampler_expert_steps", [])
        if len(steps) > 1 and sum(steps):  # share of the last validation sample's sampler steps per expert
            values.update({f"val/expert_steps_{e}": n / sum(steps) for e, n in enumerate(steps)})
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "val/tvs", sync_dist=True)  # equal on every rank already
        self.val_metrics.reset()
        self.val_metrics_data.reset()
        self.val_tvs_data_gt.reset()
        self._measured = False

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, _ = self.training_losses(batch)
        self.log("test/loss", total, sync_dist=True, batch_size=batch["video"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Sample one clip per batch element, shaped like the batch's video ``(B, T, 3, H, W)``."""
        b, t, _, h, w = batch["video"].shape
        return self.generate(b, t, h, w, batch=batch, seed=batch_idx)

    # ----- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num: int, frames: int, height: int, width: int, steps: int | None = None,
                 seed: int = 0, batch: dict[str, Any] | None = None, progress: bool = False,
                 guidance_scale: float | None = None, lock: bool = True, latents: Tensor | None = None) -> Tensor:
        """Sample ``num`` clips; returns video ``(num, frames, 3, height, width)`` in [-1, 1].

        ``batch`` carries what the conditioners and the motion locker read (a data clip's
        depth/skeleton/state/static mask, a caption ``txt``, an initial ``state``).
        ``guidance_scale`` defaults to ``model.guidance_scale``; ``lock=False`` samples
        without the motion lock (the locker's cheap first pass does). ``latents`` ``(num, T', C,
        h, w)`` replaces the seeded initial noise (to compare with another sampler on the same input).
        """
        f = self.latent.downsample
        shape = (num, self.latent.latent_frames(frames), self.latent.latent_channels, height // f, width // f)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise TcplugError(f"initial latents of shape {tuple(latents.shape)}; this model needs {shape}")
            noise = latents.to(self.device)
        else:
            noise = torch.stack([frame_noise(seed, c, range(shape[1]), shape[2:]) for c in range(num)]).to(self.device)
        cond_batch = {**(batch or {}), "frame_size": (height, width), "num_clips": num, "num_frames": frames}
        context = self.context(cond_batch, shape)
        null = self.null_context(context)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        mask = None
        if lock and self.motion_lock is not None:
            def preview() -> Tensor:
                return self.generate(num, frames, height, width, steps=self.preview_steps, seed=seed, batch=batch,
                                     guidance_scale=guidance_scale, lock=False)

            mask = self.lock_mask(cond_batch, context, shape, preview)
        self.sampler_expert_steps = [0] * (self.router.num_experts if self.router is not None else 1)

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            if self.router is not None:  # which expert takes this sampler step (first clip)
                self.sampler_expert_steps[int(self.route(t)[0].argmax())] += 1
            return self.guided(x, t, context, null, scale)

        z = sample_loop(model_fn, noise, self.schedule,
                        steps or self.sample_steps, generator=gen, progress=progress,
                        lock=mask, lock_timestep=self.lock_timestep, copy_anchor=self.lock_copy_anchor,
                        configure=self._timestep_schedule(shape))
        return self.latent.decode(z).clamp(-1, 1)

    def _timestep_schedule(self, shape: tuple[int, ...]):
        """The backbone's :meth:`~tcplug.Backbone.timestep_schedule` for latents of ``shape``
        ``(B, T', C, h, w)``, as the sampler's ``configure`` callback (None: the scheduler's default)."""
        hook = getattr(self.backbone, "timestep_schedule", None)
        if hook is None:
            return None
        return lambda sched, steps: hook(sched, steps, tuple(shape))

    @property
    def can_stream(self) -> bool:
        """Whether :meth:`stream` can sample this model: a streaming backbone, and no router,
        conditioner or motion lock (those models are sampled all at once by :meth:`generate`)."""
        plain = self.router is None and len(self.conditioners) == 0 and self.motion_lock is None
        return plain and getattr(self.backbone, "supports_streaming", False)

    @torch.no_grad()
    def stream(self, frames: int, height: int, width: int, chunk: int, steps: int | None = None, seed: int = 0,
               num: int = 1, progress: bool = False):
        """Sample a long video chunk by chunk with the K/V frame buffer (and whatever the
        latent design carries across chunks, e.g. the two-tier global code).

        Yields decoded video chunks ``(num, <= chunk, 3, height, width)`` in [-1, 1]; memory
        is bounded by the attention variants' windows, not by ``frames``. The same seed gives
        the same frames as :meth:`generate` for causal variants.
        """
        if self.router is not None or len(self.conditioners) or self.motion_lock is not None:
            raise TcplugError("streaming is not supported with a router, a conditioner or a motion lock in this "
                              "version; generate() samples such a model all at once")
        if not self.can_stream:
            raise TcplugError(f"backbone {type(self.backbone).__name__} does not support streaming")
        f, c = self.latent.downsample, self.latent.temporal_compression
        frame_shape = (self.latent.latent_channels, height // f, width // f)
        latent_frames = self.latent.latent_frames(frames)
        latent_chunk = chunk if c == 1 else max(1, (chunk - 1) // c + 1)  # chunk counts pixel frames

        def model_fn(x, t, stream):
            return self.backbone(x, t, {"stream": stream})

        carried: dict[str, Any] = {}  # what the latent design carries across chunks (a global code)
        configure = self._timestep_schedule((num, latent_frames, *frame_shape))
        for z in stream_sample(model_fn, frame_shape, latent_frames, latent_chunk, self.schedule, steps or self.sample_steps,
                               seed=seed, num_clips=num, device=self.device, progress=progress, configure=configure):
            yield self.latent.decode_stream(z, carried).clamp(-1, 1)

    @rank_zero_only
    def _write_samples(self, video: Tensor, log_dir: str | None) -> None:
        """Write clips side by side ``(T, 3, H, n*W)`` as mp4 and to TensorBoard (rank 0)."""
        if log_dir is None:
            return  # smoke runs write nothing
        frames = to_uint8(torch.cat(list(video), dim=-1))
        step = self.global_step if self.trainer.training or self.trainer.state.fn == "fit" else \
            getattr(self, "_loaded_step", self.global_step)  # validate of a checkpoint: its step
        fn = getattr(self.trainer.state.fn, "value", self.trainer.state.fn)
        name = f"step_{step:07d}.mp4" if fn == "fit" else f"{fn}_step_{step:07d}.mp4"
        write_video(frames, Path(log_dir) / "samples" / name, fps=self.sample_fps)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "_get_file_writer") and experiment._get_file_writer() is not None:
            add_video_gif(experiment, "samples/video", frames, self.global_step, self.sample_fps)

    # ----- checkpoints -----------------------------------------------------------------
    tcplug_config: str | None = None  # the resolved recipe (YAML), set by the CLI

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The recipe travels inside the checkpoint, so ``tcplug sample --ckpt`` needs nothing else.
        Frozen weights loaded from a local model folder are left out: the folder has them."""
        if self.tcplug_config:
            checkpoint["tcplug_config"] = self.tcplug_config
        skip = self.folder_weights()
        if skip:
            state = checkpoint.get("state_dict", {})
            for key in skip:
                state.pop(key, None)
            checkpoint["tcplug_folder_weights"] = sorted(skip)

    def folder_weights(self) -> set[str]:
        """State-dict keys of frozen parameters that a component loaded from a local model folder
        (a component that did sets ``pretrained`` to that folder), and the stored buffers of such
        a component when nothing in it trains (a VAE's latent statistics)."""
        keys: set[str] = set()
        own = set(self.state_dict())
        for prefix, module in self.named_modules():
            if not getattr(module, "pretrained", None) or not isinstance(module.pretrained, str):
                continue
            frozen = True
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    keys.add(f"{prefix}.{name}" if prefix else name)
                else:
                    frozen = False
            if frozen:
                keys.update(k for name, _ in module.named_buffers()
                            if (k := f"{prefix}.{name}" if prefix else name) in own)
        return keys

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tcplug_config = checkpoint.get("tcplug_config", self.tcplug_config)
        self._loaded_step = int(checkpoint.get("global_step", 0))
        left_out = checkpoint.get("tcplug_folder_weights")
        if left_out:  # fill them from the weights the components just loaded from their folders
            own = self.state_dict()
            missing = [k for k in left_out if k not in own]
            if missing:
                raise TcplugError(f"checkpoint leaves out {len(missing)} folder weights this model does not have "
                                  f"(e.g. {missing[0]}): was it made with another recipe?")
            state = checkpoint.setdefault("state_dict", {})
            for key in left_out:
                state[key] = own[key]

    # ----- optimization ------------------------------------------------------------------
    def configure_optimizers(self):
        disc = set(id(p) for p in self.discriminator.parameters()) if self.discriminator is not None else set()
        # a submodule with a float ``lr_scale`` attribute trains at lr * lr_scale (its own group)
        scaled: dict[float, list] = {}
        seen = set(disc)
        for mod in self.modules():
            factor = getattr(mod, "lr_scale", None)
            if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor != 1:
                if factor <= 0:
                    raise TcplugError(f"{type(mod).__name__}.lr_scale must be > 0, got {factor}")
                for p in mod.parameters():
                    if p.requires_grad and id(p) not in seen:
                        scaled.setdefault(float(factor), []).append(p)
                        seen.add(id(p))
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        groups = [{"params": params}] + [{"params": ps, "lr": self.lr * f} for f, ps in scaled.items()]
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _Warmup(self.warmup_steps)) if self.warmup_steps > 0 else None
        if self.automatic_optimization:
            if sched is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=self.disc_lr, betas=self.disc_betas)
        return ([opt, opt_d], [sched]) if sched is not None else [opt, opt_d]


@contextlib.contextmanager
def _not_counted(optimizer) -> Iterator[None]:
    """Step a LightningOptimizer without adding to ``trainer.global_step``.

    Under manual optimization Lightning counts every optimizer's step in ``global_step``
    (Lightning-AI/pytorch-lightning#17958), so a GAN's discriminator step would halve the
    generator steps ``max_steps`` buys and shift every step-based setting (``start_step``,
    checkpoint intervals). ``global_step`` here counts generator steps, one per batch, as in
    every other recipe. The loop installs its counting callbacks on each optimizer at the start
    of every batch; they are swapped for no-ops around this one step. Precision (grad scaling)
    and strategy handling of ``optimizer.step()`` are unchanged.
    """
    from lightning.pytorch.core.optimizer import do_nothing_closure

    saved = {name: getattr(optimizer, name) for name in ("_on_before_step", "_on_after_step")
             if hasattr(optimizer, name)}
    for name in saved:
        setattr(optimizer, name, do_nothing_closure)
    try:
        yield
    finally:
        for name, hook in saved.items():
            setattr(optimizer, name, hook)


def _clip_timesteps(timesteps: Tensor) -> Tensor:
    """One timestep per clip ``(B,)``: per-frame/per-token timesteps reduce to their maximum,
    the noise level of the free tokens (locked tokens carry a near-zero timestep)."""
    return timesteps if timesteps.dim() == 1 else timesteps.flatten(1).amax(1)


def _rows(value: Any, rows: Tensor) -> Any:
    """Select batch rows of a context entry (tensor, list of tensors, or anything else as is)."""
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, list) and value and torch.is_tensor(value[0]):
        return [v[rows] for v in value]
    return value


class _Warmup:
    """Linear warm-up factor (a class, not a lambda: picklable)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)

"""The one LightningModule: a :class:`~tcplug.diffusion.model.VideoDiffusion`, the loss terms and
a discriminator, trained; validation samples measured and written.

The module never names a concrete technique. It receives components (built by jsonargparse from
the recipe, registry names resolved), wires them into the model (:mod:`tcplug.diffusion`), and
owns what training adds: the objective, the adversarial step, optimizers
(:mod:`tcplug.optim`), validation (:mod:`tcplug.validation`) and checkpoint hooks
(:mod:`tcplug.checkpoint`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from tcplug import checkpoint as ckpt_io
from tcplug import compat
from tcplug.diffusion import LockSettings, NoiseSchedule, VideoDiffusion, generate, stream
from tcplug.errors import TcplugError
from tcplug.kinds import (
    Backbone,
    Discriminator,
    LatentDesign,
    LossTerm,
    MotionLocker,
    Router,
    WorldConditioner,
)
from tcplug.lora import LoraSpec
from tcplug.loss_context import LossContext
from tcplug.metrics.base import VideoMetric
from tcplug.optim import adamw, apply_settings, param_groups
from tcplug.registry import get_registry, snake_case
from tcplug.validation import ValidationMetrics, sample_like, write_run_samples


def check_losses(terms: dict[str, Tensor], step: int, max_loss: float | None) -> None:
    """Stop the run, naming the term and the step, before a NaN/Inf or a diverged loss (above
    ``max_loss``) reaches the weights: raised before the optimizer step, so the weights and every
    checkpoint written so far (``last.ckpt`` included) stay as they were."""
    if not terms:
        return
    # one device-to-host copy for every term (a NaN propagates through max)
    peaks = torch.stack([v.detach().float().abs().max() for v in terms.values()]).tolist()
    for (name, value), peak in zip(terms.items(), peaks):
        bad = not math.isfinite(peak)
        if bad or (max_loss is not None and peak > max_loss):
            what = f"is {float(value.flatten()[0])}" if bad else \
                f"diverged: {float(value.flatten()[0]):.3g} > model.max_loss={max_loss:g}"
            raise TcplugError(f"loss term {name!r} {what} at step {step}: stopping before the weights are touched; the "
                              "last good checkpoint is kept (resume with --ckpt_path, perhaps at a lower --model.lr)")


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
        router: noise-level expert routing (kind ``router``); with ``num_experts > 1`` the backbone
            is cloned per expert (``experts: backbone``) or its feed-forward layers are (``ffn``).
        conditioner: structural conditioning (kind ``conditioner``): one, or a list whose contexts
            are merged (residuals summed).
        motion_lock: static-region locking (kind ``motion_lock``).
        metrics: what validation measures on the sampled clips (kind ``metric``), logged as
            ``val/<name>`` and, measured the same way on the data clips the samples were conditioned
            on, as ``val/<name>_data`` (the data floor); see :mod:`tcplug.validation`. Default:
            :data:`~tcplug.validation.VALIDATION_METRICS`.
        guidance_scale: classifier-free guidance at sampling, for conditioners with a null
            context (captions); 1 = the conditional prediction alone.
        lock_timestep: the locked tokens' near-zero timestep (:class:`~tcplug.diffusion.lock.LockSettings`).
        lock_copy_anchor: overwrite locked tokens with the anchor's latents at the end of sampling.
        lock_prob: the share of training batches that get the motion lock.
        lock_loss_weight: the locked tokens' weight in the denoising loss (0 = ignore them).
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
        scheduler: sample with this diffusers scheduler instead: a local scheduler folder (a model
            folder's ``scheduler/``, e.g. Wan's UniPC) or a config dict with ``_class_name``; it must
            parameterise the model as training does (``flow_matching`` for ``flow_prediction``).
        lora: train LoRA adapters (peft) instead of the whole backbone: ``{rank, alpha,
            target_modules, dropout}`` (:class:`tcplug.lora.LoraSpec`); every other backbone weight
            is frozen, and ``tcplug export CKPT --lora OUT`` writes the adapters in the family's format.
        train_experts: with several expert backbones, train only these (indices; expert 0 takes
            the highest noise); the others are frozen. Default: all.
        frame_timesteps: training noise levels per clip or per frame (diffusion forcing).
        context_noise: the context frames' training noise, and the clean context's commit timestep.
        stream_mode: what streamed chunks attend to: ``same_step`` or ``clean`` (finished frames).
        rollout_prob: the share of batches that start from the model's own rollout (no gradient).
        rollout_frames: the rollout's latent frames (0: half the clip).
        rollout_steps: the rollout's sampler steps. These six: see :class:`tcplug.diffusion.VideoDiffusion`.
        lr: AdamW learning rate; weight_decay, betas: AdamW settings. Parameters a component
            declares in :meth:`~tcplug.Component.param_groups` (a part that must learn faster or
            slower, e.g. ``physics_state``'s dynamics) train at ``lr * lr_scale`` in a parameter
            group of their own.
        warmup_steps: linear learning-rate warm-up.
        gradient_clip: max gradient norm (None = no clipping), for every optimizer.
        max_loss: a loss term or total above this stops the run as diverged, before the weights
            are touched (None: only NaN/Inf stop it).
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
        max_loss: float | None = 1.0e4,
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
        frame_timesteps: Literal["clip", "independent", "history"] = "clip",
        context_noise: float = 0.0,
        stream_mode: Literal["same_step", "clean"] = "same_step",
        rollout_prob: float = 0.0, rollout_frames: int = 0, rollout_steps: int = 4,
    ) -> None:
        super().__init__()
        losses = list(losses) if losses is not None else [get_registry().get("loss", "denoise")()]
        if not losses:
            raise TcplugError("model.losses is empty: give at least one loss term (e.g. denoise)")
        adversarial = any(t.trains_discriminator for t in losses)
        if adversarial and discriminator is None:
            raise TcplugError("an adversarial loss term needs model.discriminator (e.g. class_path: conv3d)")
        for name, value in (("lr", lr), ("disc_lr", disc_lr)):
            if not value > 0:
                raise TcplugError(f"model.{name} must be > 0, got {value}")
        if weight_decay < 0 or warmup_steps < 0 or sample_steps < 1 or num_val_samples < 0:
            raise TcplugError("model.weight_decay and warmup_steps must be >= 0, sample_steps >= 1 and "
                              f"num_val_samples >= 0 (got {weight_decay}, {warmup_steps}, {sample_steps}, {num_val_samples})")
        conditioners = [] if conditioner is None else [conditioner] if isinstance(conditioner, nn.Module) \
            else list(conditioner)
        self.diffusion = VideoDiffusion(
            backbone, latent, router, conditioners, motion_lock,
            NoiseSchedule(noise, prediction_type, num_train_timesteps, beta_schedule, sampler, shift, scheduler),
            LockSettings(lock_timestep, lock_copy_anchor, lock_prob, lock_loss_weight, preview_steps),
            guidance_scale, lora, train_experts, frame_timesteps, context_noise, stream_mode, rollout_prob,
            rollout_frames, rollout_steps)
        self.losses = nn.ModuleList(losses)
        self.discriminator = discriminator
        # a discriminator that some term trains: alternate G and D steps with their own optimizers
        self.automatic_optimization = not adversarial
        self.compile_backbone = compile
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.gradient_clip, self.disc_lr, self.disc_betas = gradient_clip, disc_lr, tuple(disc_betas)
        self.max_loss = max_loss
        self.sample_steps, self.num_val_samples, self.sample_fps = sample_steps, num_val_samples, sample_fps
        self.validation = ValidationMetrics(None if metrics is None else {self.name_of(m): m for m in metrics})
        self._skipped: dict[int, int] = {}
        self._loss_names: list[str] = []
        for i, term in enumerate(self.losses):  # two terms of one kind log as name, name_2
            name = self.name_of(term)
            self._loss_names.append(name if name not in self._loss_names else f"{name}_{i + 1}")
        # the component objects are saved through the CLI's config; keep plain values here
        self.save_hyperparameters(ignore=["backbone", "latent", "losses", "discriminator", "router", "conditioner", "motion_lock", "metrics"])

    @property
    def backbone(self) -> Backbone:
        return self.diffusion.backbone

    @property
    def latent(self) -> LatentDesign:
        return self.diffusion.latent

    @staticmethod
    def name_of(component: nn.Module) -> str:
        """A component's registry name (its class name in snake case if it is not registered)."""
        return get_registry().name_of(type(component)) or snake_case(type(component).__name__)

    # ----- building -------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, cfg: dict) -> TCPlugModule:
        """The module a resolved recipe's ``model`` section describes (what ``--print_config``
        writes and every checkpoint carries), built as ``tcplug fit`` builds it."""
        from tcplug.recipe import instantiate

        return instantiate(cfg, {"model": cls}).model

    @classmethod
    def from_checkpoint(cls, path: str) -> TCPlugModule:
        """The module of a checkpoint of ``tcplug fit``, rebuilt from the recipe stored inside it,
        its weights loaded, in eval mode (``module.recipe`` is that recipe)."""
        ckpt = ckpt_io.load_checkpoint(path)
        text = ckpt.get("tcplug_config")
        if not text:
            raise TcplugError(f"{path}: no recipe inside (not written by `tcplug fit`)")
        try:
            module = cls.from_recipe(ckpt_io.parse_recipe(text, path))
        except TcplugError as exc:
            raise TcplugError(f"{path}: the model its recipe describes cannot be built: {exc}") from None
        module.on_load_checkpoint(ckpt)  # old layouts migrated; weights a model folder holds filled in
        ckpt_io.load_weights(module, ckpt["state_dict"], path)
        module.tcplug_config = text
        return module.eval()

    tcplug_config: str | None = None  # the resolved recipe (YAML), set by the CLI

    @property
    def recipe(self) -> dict:
        """The resolved recipe this module was built from (``{}`` if unknown)."""
        return ckpt_io.parse_recipe(self.tcplug_config) if self.tcplug_config else {}

    # ----- training -------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any], return_context: bool = False):
        """Total loss and each unweighted term for one batch (and the LossContext if asked)."""
        noised = self.diffusion.add_noise(batch)
        self._last_timesteps = noised.timesteps
        pred = self.diffusion.denoise(noised.xt, noised.timesteps, noised.context)
        schedule = self.diffusion.schedule
        ctx = LossContext(batch=batch, x0=noised.x0, noise=noised.noise, xt=noised.xt, timesteps=noised.timesteps,
                          pred=pred, target=schedule.target(noised.x0, noised.noise, noised.timesteps),
                          schedule=schedule, latent=self.latent, discriminator=self.discriminator,
                          step=self.global_step, weight_mask=noised.weight_mask)
        terms: dict[str, Tensor] = {}
        total = noised.x0.new_zeros(())
        for name, term in zip(self._loss_names, self.losses):
            terms[name] = value = term(ctx)
            total = total + term.weight * value
        for name, (weight, value) in self.diffusion.auxiliary_losses(batch, noised.timesteps, self.name_of).items():
            terms[name] = value
            total = total + weight * value
        return (total, terms, ctx) if return_context else (total, terms)

    def forward(self, xt: Tensor, timesteps: Tensor) -> Tensor:
        """One unconditioned denoiser pass (what the model summary counts FLOPs with)."""
        return self.diffusion.denoise(xt, timesteps)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)  # the model summary shows FLOPs and sizes for a clip
        self.example_input_array = self.diffusion.example_input(getattr(data, "frames", None), getattr(data, "size", None))
        # in setup rather than configure_model: Lightning's weight averaging (EMA) warns about
        # any model that overrides configure_model (it cannot average sharded layers)
        if self.compile_backbone and not getattr(self, "_compiled", False):
            for expert in self.diffusion.experts:
                expert.compile()
            self._compiled = True

    def on_train_start(self) -> None:
        apply_settings(self)  # a resumed run's own learning rates and optimizer settings, not the checkpoint's

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this step's randomness (noise, timesteps, dropout) from ``(seed, step, rank)``:
        a resumed run draws exactly what the uninterrupted run drew, wherever it was killed."""
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        torch.manual_seed((base * 1_000_003 + self.global_step) * 1009 + self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            total, terms = self.training_losses(batch)
            check_losses({**terms, "total": total}, self.global_step, self.max_loss)
        else:
            total, terms = self._adversarial_step(batch)
        bs = batch["video"].shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        if self.diffusion.num_experts > 1:  # the share of this batch routed to each expert
            with torch.no_grad():
                share = self.diffusion.route(self._last_timesteps).float().mean(0)
            for e in range(self.diffusion.num_experts):
                self.log(f"train/expert_share_{e}", share[e], batch_size=bs)
        if "skipped" in batch:  # running count of unreadable samples in the worker that made this batch
            self._skipped[int(batch.get("worker", 0))] = int(batch["skipped"])
            self.log("data/skipped", float(sum(self._skipped.values())), batch_size=bs, reduce_fx="max")
        return total

    def _adversarial_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Manual optimization: a generator step, then a discriminator step (own optimizer),
        each with only its own optimizer's parameters trainable (``toggle_optimizer``). The
        discriminator step is not counted in ``global_step``, which counts generator steps."""
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        total, terms, ctx = self.training_losses(batch, return_context=True)
        check_losses({**terms, "total": total}, self.global_step, self.max_loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        self._clip(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        d_losses = [d for t in self.losses if (d := t.discriminator_loss(ctx, self.discriminator)) is not None]
        if d_losses:
            self.toggle_optimizer(opt_d)
            d_loss = torch.stack(d_losses).sum()
            check_losses({"discriminator": d_loss}, self.global_step, self.max_loss)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            with compat.uncounted_step(opt_d):
                opt_d.step()
            self.untoggle_optimizer(opt_d)
            terms["discriminator"] = d_loss.detach()
        sched = self.lr_schedulers()
        for s in sched if isinstance(sched, list) else [sched] if sched is not None else []:
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

    def configure_optimizers(self):
        disc = {id(p) for p in self.discriminator.parameters()} if self.discriminator is not None else set()
        opt, sched = adamw(param_groups(self, self.lr, disc), self.lr, self.betas, self.weight_decay,
                           self.warmup_steps)
        if self.automatic_optimization:
            return opt if sched is None else {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt_d, _ = adamw(self.discriminator.parameters(), self.disc_lr, self.disc_betas)
        return ([opt, opt_d], [sched]) if sched is not None else [opt, opt_d]

    # ----- validation, test, predict ----------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, _ = self.training_losses(batch)
        self.log("val/loss", total, prog_bar=True, sync_dist=True, batch_size=batch["video"].shape[0])
        if batch_idx == 0 and self.num_val_samples > 0 and not self.trainer.sanity_checking:
            video, sub = sample_like(self, batch)
            self.validation.update(video, sub, batch)
            # trainer.log_dir is a collective under DDP: read it on every rank
            write_run_samples(self, video, None if self.trainer.fast_dev_run else self.trainer.log_dir)

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics (reduced across DDP processes by torchmetrics)."""
        if not self.validation.measured:
            return
        values = self.validation.compute()
        steps = self.diffusion.sampler_expert_steps
        if len(steps) > 1 and sum(steps):  # share of the last validation sample's sampler steps per expert
            values.update({f"val/expert_steps_{e}": n / sum(steps) for e, n in enumerate(steps)})
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "val/tvs", sync_dist=True)  # equal on every rank already
        for name, count in (("val/clips", self.validation.clips), ("val/reference_clips", self.validation.reference_clips)):
            self.log(name, float(count), sync_dist=True, reduce_fx="sum")  # every figure says how many clips
        self.validation.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, _ = self.training_losses(batch)
        self.log("test/loss", total, sync_dist=True, batch_size=batch["video"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Sample one clip per batch element, shaped like the batch's video ``(B, T, 3, H, W)``."""
        b, t, _, h, w = batch["video"].shape
        return self.generate(b, t, h, w, batch=batch, seed=batch_idx)

    # ----- sampling ---------------------------------------------------------------------------
    def generate(self, num: int, frames: int, height: int, width: int, steps: int | None = None, **kwargs) -> Tensor:
        """``num`` clips ``(num, frames, 3, height, width)`` in [-1, 1] from :func:`tcplug.diffusion.generate`
        (``steps`` default ``sample_steps``; ``seed``, ``batch``, ``guidance_scale``, ``lock``... as there)."""
        return generate(self.diffusion, num, frames, height, width, steps or self.sample_steps, **kwargs)

    def stream(self, frames: int, height: int, width: int, chunk: int, steps: int | None = None,
               **kwargs) -> Iterator[Tensor]:
        """A long video chunk by chunk, ``(num, <= chunk, 3, height, width)`` each: :func:`tcplug.diffusion.stream`."""
        return stream(self.diffusion, frames, height, width, chunk, steps or self.sample_steps, **kwargs)

    @property
    def can_stream(self) -> bool:
        """Whether :meth:`stream` can sample this model (see ``VideoDiffusion.can_stream``)."""
        return self.diffusion.can_stream

    # ----- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The recipe travels inside the checkpoint, so ``tcplug sample --ckpt`` needs nothing else.
        Frozen weights loaded from a local model folder are left out: the folder has them."""
        if self.tcplug_config:
            checkpoint["tcplug_config"] = self.tcplug_config
        ckpt_io.stamp_layout(checkpoint)
        ckpt_io.leave_out_folder_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_io.migrate(checkpoint)
        self.tcplug_config = checkpoint.get("tcplug_config", self.tcplug_config)
        self._loaded_step = int(checkpoint.get("global_step", 0))
        ckpt_io.fill_folder_weights(self, checkpoint)

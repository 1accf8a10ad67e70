"""The module, the dit backbone, the noise schedules and the slots' seams."""

import pickle

import pytest
import torch

import tcplug
from tcplug import Router, WorldConditioner, hookimpl
from tcplug.diffusion.sampling import NoiseSchedule, sample_loop
from tcplug.module import TCPlugModule


def dit(**kw):
    args = dict(in_channels=3, patch_size=2, dim=32, depth=2, heads=2)
    args.update(kw)
    return tcplug.get_component("backbone", "dit")(**args)


@pytest.mark.parametrize("tshape", ["clip", "frame", "token"])
def test_dit_shapes_and_timestep_granularity(tshape):
    torch.manual_seed(0)
    net = dit()
    x = torch.randn(2, 3, 3, 8, 8)
    t = {"clip": torch.tensor([10, 500]), "frame": torch.randint(0, 1000, (2, 3)),
         "token": torch.randint(0, 1000, (2, 3, 16))}[tshape]
    out = net(x, t)
    assert out.shape == x.shape


def test_dit_per_token_timesteps_matter():
    torch.manual_seed(0)
    net = dit()
    for p in net.parameters():  # leave adaLN-Zero's zero init so timesteps reach the output
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 2, 3, 8, 8)
    t = torch.full((1, 2, 16), 100)
    t2 = t.clone()
    t2[0, 1, 3] = 900
    assert not torch.allclose(net(x, t), net(x, t2))
    assert torch.allclose(net(x, t), net(x, torch.tensor([100])), atol=1e-5)


def test_dit_attention_per_block_list_and_errors():
    pf = tcplug.get_component("attention", "per_frame")
    net = dit(attention=[pf(), pf()])
    assert len(net.blocks) == 2 and net.blocks[0].attn is not net.blocks[1].attn
    with pytest.raises(tcplug.TcplugError, match="2 attention variants for depth 3"):
        dit(depth=3, attention=[pf(), pf()])
    with pytest.raises(tcplug.TcplugError, match="multiple of the dit patch size"):
        dit(patch_size=3)(torch.randn(1, 2, 3, 8, 8), torch.tensor([1]))


def test_per_frame_has_no_temporal_mixing():
    torch.manual_seed(0)
    net = dit()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 3, 3, 8, 8)
    y = x.clone()
    y[:, 2] += 1.0
    a, b = net(x, torch.tensor([5])), net(y, torch.tensor([5]))
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])


@pytest.mark.parametrize("noise,pred", [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("ddpm", "sample"),
                                        ("flow_matching", "flow")])
def test_schedule_target_and_pred_x0_agree(noise, pred):
    s = NoiseSchedule(noise, pred)
    x0 = torch.randn(2, 3, 3, 4, 4)
    eps = torch.randn_like(x0)
    t = s.sample_timesteps(2, x0.device).clamp(max=s.num_train_timesteps - 1)
    xt = s.add_noise(x0, eps, t)
    assert torch.allclose(s.pred_x0(xt, s.target(x0, eps, t), t), x0, atol=1e-3)
    # per-frame timesteps broadcast too
    tf = t[:, None].expand(2, 3)
    assert torch.allclose(s.add_noise(x0, eps, tf), xt)


def test_flow_matching_shift_matches_diffusers():
    s = NoiseSchedule("flow_matching", "flow", shift=3.0)
    sched = s.make_sampler(4)
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25])
    ours = s.shift_sigma(sig)
    ref = torch.tensor(sched.sigmas[:4]).float() if not torch.is_tensor(sched.sigmas) else sched.sigmas[:4].float()
    assert ours[0] == pytest.approx(1.0)
    assert torch.all(ours[1:] >= sig[1:])  # shift > 1 moves toward high noise
    assert ref.shape == ours.shape


@pytest.mark.parametrize("noise,pred,sampler", [("ddpm", "epsilon", "ddim"), ("ddpm", "v_prediction", "ddpm"),
                                                ("flow_matching", "flow", "euler")])
def test_sample_loop_recovers_x0_with_oracle(noise, pred, sampler):
    """With a model that knows x0, every sampler lands on x0."""
    s = NoiseSchedule(noise, pred, sampler=sampler)
    x0 = torch.rand(1, 2, 3, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(0)
    noise_t = torch.randn(x0.shape, generator=g)

    def oracle(xt, t):
        a, b = s._coefs(t, xt)
        eps = (xt - a * x0) / b.clamp_min(1e-6)
        return s.target(x0, eps, t)

    out = sample_loop(oracle, noise_t, s, steps=10, generator=g)
    assert torch.allclose(out, x0, atol=0.05)


def test_bad_schedule_combinations():
    with pytest.raises(tcplug.TcplugError):
        NoiseSchedule("ddpm", "flow")
    with pytest.raises(tcplug.TcplugError):
        NoiseSchedule("ddpm", "epsilon", sampler="euler")


def test_module_step_gradients_and_pickle():
    torch.manual_seed(0)
    m = TCPlugModule(backbone=dit())
    batch = {"video": torch.rand(2, 3, 3, 8, 8) * 2 - 1}
    total, terms = m.training_losses(batch)
    assert set(terms) == {"denoise"} and total.requires_grad
    total.backward()
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    m2 = pickle.loads(pickle.dumps(m))
    assert isinstance(m2, TCPlugModule)
    video = m.generate(1, 2, 8, 8, steps=2)
    assert video.shape == (1, 2, 3, 8, 8) and video.abs().max() <= 1


def test_module_rejects_mismatched_channels_and_unwired_slots():
    with pytest.raises(tcplug.TcplugError, match="in_channels=4"):
        TCPlugModule(backbone=dit(in_channels=4))
    with pytest.raises(tcplug.TcplugError, match="model.losses is empty"):
        TCPlugModule(backbone=dit(), losses=[])


class TwoExperts(Router):
    """Hard router for the seam test: t >= 500 -> expert 0, else expert 1."""

    num_experts = 2

    def forward(self, timesteps, schedule=None):
        high = (timesteps >= 500).float()
        return torch.stack([high, 1 - high], dim=1)


class ResidualConditioner(WorldConditioner):
    """Adds a constant residual after every block (seam test)."""

    def __init__(self, value: float = 1.0, depth: int = 2):
        super().__init__()
        self.value, self.depth = value, depth

    def forward(self, batch, latent_shape):
        return {"residuals": [torch.full((1,), self.value)] * self.depth}


class SeamPlugin:
    @hookimpl
    def tcplug_register_components(self, register):
        register(TwoExperts, name="two_experts_test")
        register(ResidualConditioner, name="residual_test")


def test_router_seam_routes_each_sample_to_its_expert():
    torch.manual_seed(0)
    m = TCPlugModule(backbone=dit(), router=TwoExperts())
    assert len(m.diffusion.experts) == 2
    for e in m.diffusion.experts:
        for p in e.parameters():
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 2, 3, 8, 8)
    t = torch.tensor([900, 100])
    out = m.diffusion.denoise(x, t)
    assert torch.allclose(out[0], m.diffusion.experts[0](x[:1], t[:1])[0], atol=1e-5)
    assert torch.allclose(out[1], m.diffusion.experts[1](x[1:], t[1:])[0], atol=1e-5)


def test_conditioner_seam_reaches_backbone():
    torch.manual_seed(0)
    base = TCPlugModule(backbone=dit())
    cond = TCPlugModule(backbone=dit(), conditioner=ResidualConditioner(1.0))
    cond.load_state_dict(base.state_dict(), strict=False)
    for p in list(base.parameters()) + list(cond.parameters()):
        torch.nn.init.constant_(p, 0.01)
    x, t = torch.randn(1, 2, 3, 8, 8), torch.tensor([3])
    batch = {"video": x}
    a = base.diffusion.denoise(x, t, base.diffusion.context(batch, x.shape))
    b = cond.diffusion.denoise(x, t, cond.diffusion.context(batch, x.shape))
    assert not torch.allclose(a, b)


def test_seam_components_by_registry_name():
    name = tcplug.register_plugin(SeamPlugin(), name="seam-test")
    try:
        assert tcplug.get_component("router", "two_experts_test") is TwoExperts
        assert tcplug.get_component("conditioner", "residual_test") is ResidualConditioner
    finally:
        tcplug.unregister_plugin(name)


def test_dit_conv_head_knows_the_noise_level():
    """With a conv stem/head (conv_channels), the head is modulated by each token's timestep
    embedding: with the transformer's own output silenced, the timestep still changes the
    prediction through the head alone; and the modulation starts at zero (no change at init)."""
    torch.manual_seed(0)
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=4, dim=32, depth=1, heads=2,
                                                  conv_channels=8).eval()
    x = torch.randn(1, 2, 3, 16, 16)
    torch.nn.init.normal_(net.head[2].weight, std=0.1)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
        assert torch.equal(net(x, torch.tensor([10])), net(x, torch.tensor([900])))  # zero-initialised
        torch.nn.init.normal_(net.head_film.weight, std=0.1)
        lo, hi = net(x, torch.tensor([10])), net(x, torch.tensor([900]))
        per_token = net(x, torch.tensor([[[10] * 16, [900] * 16]]))
    assert (lo - hi).abs().max() > 1e-4
    assert torch.allclose(per_token[:, 0], lo[:, 0], atol=1e-6) and torch.allclose(per_token[:, 1], hi[:, 1], atol=1e-6)

"""Losses of Eq. 5 (model-spec section 6, choices C19/C20): values against hand formulas and an independent VGG."""

import math

import pytest
import torch
import torch.nn.functional as F

from laren import losses
from laren.losses import VGG16Features, d_loss, g_adversarial_loss, load_vgg16, perceptual_loss, pixel_loss, random_vgg16

# torchvision VGG16 "D": conv output widths, "M" = max-pool. Indices of the convs in `features`.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _torchvision_vgg16_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A full torchvision-format VGG16 state dict (all 13 convs + classifier) with random values."""
    g = torch.Generator().manual_seed(seed)
    sd, idx, c_in = {}, 0, 3
    for v in _CFG:
        if v == "M":
            idx += 1
            continue
        sd[f"features.{idx}.weight"] = torch.randn(v, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        sd[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.1
        c_in, idx = v, idx + 2
    sd["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # shape irrelevant: must be ignored
    sd["classifier.0.bias"] = torch.randn(8, generator=g)
    return sd


def _reference_conv4_3(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Independent functional VGG16 up to conv4_3 (pre-ReLU) from the state dict."""
    convs = [k[: -len(".weight")] for k in sd if k.startswith("features.") and k.endswith(".weight")]
    convs = sorted(convs, key=lambda k: int(k.split(".")[1]))[:10]  # conv1_1 .. conv4_3
    pools_after = {1, 3, 6}  # pool after conv1_2, conv2_2, conv3_3 (0-based conv counter)
    h = x
    for i, name in enumerate(convs):
        h = F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], padding=1)
        if i == 9:
            return h
        h = F.relu(h)
        if i in pools_after:
            h = F.max_pool2d(h, 2)
    raise AssertionError


def test_vgg16_loads_torchvision_layout_and_matches_reference(tmp_path):
    sd = _torchvision_vgg16_state()
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    vgg = load_vgg16(path)
    assert len(vgg.features) == 22 and isinstance(vgg.features[21], torch.nn.Conv2d)
    assert torch.equal(vgg.features[21].weight, sd["features.21.weight"])
    assert all(not p.requires_grad for p in vgg.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = vgg(x)
    assert out.shape == (2, 512, 4, 4)
    ref = _reference_conv4_3(sd, x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out < 0).any(), "conv4_3 must be taken before its ReLU"


def test_missing_vgg16_file_names_file_and_source(tmp_path):
    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as e:
        load_vgg16(missing)
    msg = str(e.value)
    assert str(missing) in msg and losses.VGG16_URL in msg and "loss.vgg16_path" in msg
    with pytest.raises(ValueError, match="loss.vgg16_path is not set"):
        load_vgg16(None)


def test_wrong_state_dict_is_rejected(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_vgg16(path)


def test_perceptual_loss_uses_imagenet_norm_on_minus1_1_images():
    vgg = random_vgg16(seed=3)
    g = torch.Generator().manual_seed(4)
    sr = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    hr = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = ((vgg((sr - mean) / std) - vgg((hr - mean) / std)) ** 2).mean()
    got = perceptual_loss(vgg, sr, hr)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # The [0, 1] reading (the C20 alternative) gives a different value: the quirk is really applied.
    alt = ((vgg(((sr + 1) / 2 - mean) / std) - vgg(((hr + 1) / 2 - mean) / std)) ** 2).mean()
    assert not torch.allclose(got, alt, rtol=1e-2)
    assert perceptual_loss(vgg, hr, hr).item() == 0.0


def test_perceptual_hr_branch_has_no_graph_and_the_same_gradient():
    """The HR branch under no_grad: the same loss and d/d(sr) as one graph over [sr; hr.detach()], with about half of
    the saved activations, and no gradient ever reaches hr."""
    vgg = random_vgg16(seed=7)
    g = torch.Generator().manual_seed(8)
    sr0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    hr = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)

    def one_graph(sr):  # the previous formulation
        x = torch.cat([sr, hr.detach()], dim=0)
        f_sr, f_hr = vgg((x - vgg.mean) / vgg.std).chunk(2, dim=0)
        return torch.nn.functional.mse_loss(f_sr, f_hr.detach())

    weights = {p.data_ptr() for p in vgg.parameters()}

    def saved_bytes_and_grad(fn):  # bytes of the activations autograd saves (VGG's weights are saved by both)
        sr, nbytes = sr0.clone().requires_grad_(True), []

        def pack(t):
            nbytes.append(0 if t.data_ptr() in weights else t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(sr)
        loss.backward()
        return loss.detach(), sr.grad, sum(nbytes)

    l_new, g_new, b_new = saved_bytes_and_grad(lambda sr: perceptual_loss(vgg, sr, hr))
    l_old, g_old, b_old = saved_bytes_and_grad(one_graph)
    torch.testing.assert_close(l_new, l_old, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-8)
    assert hr.grad is None and b_new < 0.6 * b_old


def test_losses_fall_under_gradient_descent_and_vgg_stays_frozen():
    vgg = random_vgg16(seed=5)
    g = torch.Generator().manual_seed(6)
    hr = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    sr = torch.zeros(1, 3, 32, 32, requires_grad=True)
    opt = torch.optim.Adam([sr], lr=0.05)
    first = None
    for _ in range(30):
        loss = pixel_loss(sr, hr) + 0.01 * perceptual_loss(vgg, sr, hr)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert all(p.grad is None for p in vgg.parameters())


def test_pixel_loss_value():
    a = torch.tensor([[[[1.0, -1.0]]]])
    b = torch.tensor([[[[0.0, 1.0]]]])
    assert pixel_loss(a, b).item() == pytest.approx((1 + 4) / 2)


def test_adversarial_terms_match_closed_forms():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    sig = torch.sigmoid(logits)
    ns = g_adversarial_loss(logits)
    assert ns.item() == pytest.approx(float((-torch.log(sig)).mean()), rel=1e-6)
    sat = g_adversarial_loss(logits, kind="saturating")
    assert sat.item() == pytest.approx(float(torch.log(1 - sig).mean()), rel=1e-6)
    assert g_adversarial_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="loss.adversarial"):
        g_adversarial_loss(logits, kind="hinge")


def test_d_loss_value_and_direction():
    real, fake = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    expected = float(-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
    assert d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert d_loss(torch.full((2,), 5.0), torch.full((2,), -5.0)) < d_loss(torch.zeros(2), torch.zeros(2))
    # D is trained to separate: the gradient pushes real logits up and fake logits down.
    r, f = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    d_loss(r, f).backward()
    assert (r.grad < 0).all() and (f.grad > 0).all()


def test_vgg_module_is_always_eval():
    vgg = VGG16Features()
    vgg.train()
    assert not vgg.training

"""The contrastive-forgetting safety loss (losses.py) against hand computations on tiny tensors."""
import pytest
import torch

from mini_safediff.methods.contrastive import (ContrastiveCentres, SafetyLossConfig, contrast_latent, ng_noise,
                                               safety_loss)
from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig

PREDICTIONS = ("epsilon", "v_prediction")


def schedule(prediction_type="epsilon"):
    return NoiseSchedule(SchedulerConfig(prediction_type=prediction_type))  # SD's betas


def centres_at(mean, count=(1.0, 1.0)):
    """Centres with the given means (2, C, H, W) instead of the random start."""
    mean = torch.as_tensor(mean, dtype=torch.float32)
    centres = ContrastiveCentres(mean.shape[1:], torch.Generator().manual_seed(0))
    centres.load_state_dict({"mean": mean, "count": torch.as_tensor(count, dtype=torch.float32)})
    return centres


def batch(harmful=(False, True, True, False), seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(harmful)
    x0, noise, pred = (torch.randn(b, 4, 2, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 999, 500, 250, 10, 700][:b])  # both ends of the schedule
    return x0, noise, pred, t, torch.tensor(harmful)


def perfect(sched, x0, noise, t):
    """x_t from the unshifted noise and the exact model output there (x0_hat = x0)."""
    return sched.add_noise(x0, noise, t), sched.target(x0, noise, t)


def test_lt_and_ng_transforms_by_hand():
    x0_hat = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -4.0]]]])  # (2, 1, 1, 2): a clean, a harmful sample
    harmful = torch.tensor([False, True])
    assert torch.equal(contrast_latent(x0_hat, harmful, "lt"), torch.tensor([[[[-101.0, -102.0]]], [[[103.0, 96.0]]]]))
    assert torch.equal(contrast_latent(x0_hat, harmful, "ng"), x0_hat)
    noise = torch.tensor([[[[0.5, -0.5]]], [[[0.5, -0.5]]]])
    assert torch.equal(ng_noise(noise, harmful), torch.tensor([[[[1.5, 0.5]]], [[[-0.5, -1.5]]]]))


def test_centres_start_uniform_with_count_one():
    centres = ContrastiveCentres((1, 1, 2), torch.Generator().manual_seed(3))
    assert torch.equal(centres.mean, torch.rand((2, 1, 1, 2), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(centres.count, torch.tensor([1.0, 1.0]))


def test_centre_updates_and_distances_by_hand():
    centres = centres_at([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    z = torch.tensor([[[[3.0, 6.0]]], [[[5.0, 1.0]]], [[[0.0, 3.0]]]])
    harmful = torch.tensor([False, True, False])
    centres.update(z, harmful)
    # clean: ([0, 0] + [3, 6] + [0, 3]) / 3 = [1, 3]; harmful: ([1, 1] + [5, 1]) / 2 = [3, 1]
    assert torch.allclose(centres.mean, torch.tensor([[[[1.0, 3.0]]], [[[3.0, 1.0]]]]))
    assert torch.equal(centres.count, torch.tensor([3.0, 2.0]))
    d_own, d_other = centres.distances(z, harmful)
    assert torch.allclose(d_own, torch.tensor([13 ** 0.5, 2.0, 1.0]))  # ||[2, 3]||, ||[2, 0]||, ||[-1, 0]||
    assert torch.allclose(d_other, torch.tensor([5.0, 20 ** 0.5, 13 ** 0.5]))  # ||[0, 5]||, ||[2, 0]-[-2, 2]||...
    assert centres.centre_distance().item() == pytest.approx(8 ** 0.5)
    centres.update(torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([True]))  # ([3, 1] * 2 + [3, 4]) / 3
    assert torch.allclose(centres.mean[1], torch.tensor([[[3.0, 2.0]]]))
    assert torch.equal(centres.count, torch.tensor([3.0, 3.0]))


def test_batch_update_equals_one_sample_at_a_time():
    z, harmful = torch.randn(5, 4, 2, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 0, 1, 1, 0])
    together, one_by_one = ContrastiveCentres(z.shape[1:], torch.Generator().manual_seed(0)), \
        ContrastiveCentres(z.shape[1:], torch.Generator().manual_seed(0))
    together.update(z, harmful)
    for i in range(len(z)):
        one_by_one.update(z[i:i + 1], harmful[i:i + 1])
    assert torch.allclose(together.mean, one_by_one.mean, atol=1e-6)
    assert torch.equal(together.count, one_by_one.count)


def test_centre_update_stays_float32_under_autocast():
    z, harmful = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 0, 1])
    plain, autocast = (ContrastiveCentres(z.shape[1:], torch.Generator().manual_seed(0)) for _ in range(2))
    plain.update(z, harmful)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.update(z, harmful)
    assert autocast.mean.dtype == torch.float32 and torch.equal(autocast.mean, plain.mean)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("method", ["lt", "ng"])
@pytest.mark.parametrize("contrast", ["official", "hinge"])
def test_safety_loss_equals_hand_computation(prediction_type, method, contrast):
    sched = schedule(prediction_type)
    x0, noise, pred, t, harmful = batch()
    cfg = SafetyLossConfig(method=method, lam=0.3, lam_contrast=0.7, margin=25.0, contrast=contrast,
                           harmful_weight=-0.5)
    start = ContrastiveCentres(x0.shape[1:], torch.Generator().manual_seed(0)).mean
    x_t = sched.add_noise(x0, ng_noise(noise, harmful) if method == "ng" else noise, t)
    loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, sched, centres_at(start), cfg)

    # the same in plain torch, from the formulas of docs/method.md
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0]).view(-1, 1, 1, 1)  # clean -1, harmful +1
    eps_in = noise - sign if method == "ng" else noise
    assert torch.allclose(x_t, a * x0 + s * eps_in)
    target, x0_hat = (noise, (x_t - s * pred) / a) if prediction_type == "epsilon" else \
        (a * noise - s * x0, a * x_t - s * pred)
    z = sign * (x0_hat + 100) if method == "lt" else x0_hat
    mu_clean = (start[0] + z[0] + z[3]) / 3
    mu_harm = (start[1] + z[1] + z[2]) / 3
    own = torch.stack([mu_clean, mu_harm, mu_harm, mu_clean])
    other = torch.stack([mu_harm, mu_clean, mu_clean, mu_harm])
    d_own = ((z - own) ** 2).sum((1, 2, 3)).sqrt()
    d_other = ((z - other) ** 2).sum((1, 2, 3)).sqrt()
    if contrast == "official":
        con = d_own - 0.7 * torch.relu(d_other - 25.0)
    else:
        con = d_own + 0.7 * torch.relu(25.0 - d_other)
    mse = ((pred - target) ** 2).mean((1, 2, 3))
    expected = (torch.tensor([1.0, -0.5, -0.5, 1.0]) * mse + 0.3 * con).mean()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, value in [("mse", mse.mean()), ("contrastive", con.mean()), ("d_own", d_own.mean()),
                        ("d_other", d_other.mean()), ("centre_distance", (mu_clean - mu_harm).norm())]:
        assert stats[name] == pytest.approx(value.item(), rel=1e-5), name


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_x0_recovered_from_a_perfect_prediction(prediction_type):
    sched = schedule(prediction_type)
    x0, noise, _, t, harmful = batch()
    x_t, pred = perfect(sched, x0, noise, t)
    x0_hat = sched.predict_x0(x_t, pred, t)
    assert ((x0_hat - x0).norm() / x0.norm()).item() < 1e-5
    # and inside the loss: NG's z is x0_hat, so d_own is the distance of x0 itself to its (fixed) centre
    mean = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(5))
    loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, sched, centres_at(mean),
                              SafetyLossConfig(method="ng"), update_centres=False)
    assert stats["mse"] == 0.0
    assert stats["d_own"] == pytest.approx((x0 - mean[harmful.long()]).flatten(1).norm(dim=1).mean().item(),
                                           rel=1e-5)


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_mixed_batch_loss_is_the_mean_of_single_sample_losses(method):
    sched = schedule("v_prediction")
    x0, noise, pred, t, harmful = batch((True, False, False, True, True))
    cfg = SafetyLossConfig(method=method, lam=0.01, margin=3.0, contrast="hinge", harmful_weight=-0.5)
    x_t = sched.add_noise(x0, ng_noise(noise, harmful) if method == "ng" else noise, t)
    centres = ContrastiveCentres(x0.shape[1:], torch.Generator().manual_seed(0))
    loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, sched, centres, cfg)
    singles = [safety_loss(pred[i:i + 1], x_t[i:i + 1], t[i:i + 1], x0[i:i + 1], noise[i:i + 1], harmful[i:i + 1],
                           sched, centres_at(centres.mean, centres.count), cfg, update_centres=False)
               for i in range(len(x0))]  # the same centres: the batch's update already happened
    assert loss.item() == pytest.approx(sum(single.item() for single, _ in singles) / len(singles), rel=1e-6)
    for name in ("mse", "contrastive", "d_own", "d_other"):
        assert stats[name] == pytest.approx(sum(s[name] for _, s in singles) / len(singles), rel=1e-6)


def grad_of_loss(cfg, x0, noise, t, harmful, sched):
    """Loss value and gradients of a tiny 1x1-conv "UNet" and of its prediction."""
    model = torch.nn.Conv2d(4, 4, 1)
    g = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(model.weight, generator=g)
    torch.nn.init.normal_(model.bias, generator=g)
    x_t = sched.add_noise(x0, ng_noise(noise, harmful) if cfg.method == "ng" else noise, t)
    pred = model(x_t)
    pred.retain_grad()
    loss, _ = safety_loss(pred, x_t, t, x0, noise, harmful, sched,
                          ContrastiveCentres(x0.shape[1:], torch.Generator().manual_seed(0)), cfg)
    loss.backward()
    return loss.item(), pred.grad, model.weight.grad


@pytest.mark.parametrize("method", ["lt", "ng"])
@pytest.mark.parametrize("contrast", ["official", "hinge"])
def test_contrastive_term_carries_gradient_unless_detached(method, contrast):
    sched = schedule()
    x0, noise, _, t, harmful = batch((True, True, True))  # harmful only, MSE weight 0: only the term is left
    margin = 1e4  # keeps the hinge active
    with_grad = grad_of_loss(SafetyLossConfig(method=method, contrast=contrast, margin=margin), x0, noise, t,
                             harmful, sched)
    detached = grad_of_loss(SafetyLossConfig(method=method, contrast=contrast, margin=margin, contrast_grad=False),
                            x0, noise, t, harmful, sched)
    assert with_grad[0] == detached[0]  # the official code's loss value, bit for bit
    assert with_grad[1].abs().sum() > 0 and with_grad[2].abs().sum() > 0
    assert torch.count_nonzero(detached[1]) == 0 and torch.count_nonzero(detached[2]) == 0


def test_official_and_hinge_forms_by_hand():
    sched = schedule()
    x0 = torch.tensor([[[[3.0, 4.0]]]])  # one clean sample; NG with a perfect prediction gives z = x0
    noise, t, harmful = torch.zeros_like(x0), torch.tensor([0]), torch.tensor([False])
    x_t, pred = perfect(sched, x0, noise, t)
    centres = centres_at([[[[0.0, 0.0]]], [[[3.0, 0.0]]]])  # d_own = ||[3, 4]|| = 5, d_other = ||[0, 4]|| = 4
    for contrast, margin, expected in [("official", 1.0, 5 - 2 * (4 - 1)), ("official", 6.0, 5),
                                       ("hinge", 6.0, 5 + 2 * (6 - 4)), ("hinge", 1.0, 5)]:
        cfg = SafetyLossConfig(method="ng", lam=0.1, lam_contrast=2.0, margin=margin, contrast=contrast)
        loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, sched, centres, cfg, update_centres=False)
        assert stats["contrastive"] == pytest.approx(expected, rel=1e-5), (contrast, margin)
        assert loss.item() == pytest.approx(0.1 * expected, rel=1e-5)


def test_harmful_weight_scales_the_harmful_mse_gradient():
    sched = schedule()
    x0, noise, pred, t, harmful = batch((True, False, True))

    def pred_grad(harmful_weight):
        p = pred.clone().requires_grad_()
        cfg = SafetyLossConfig(lam=0.0, harmful_weight=harmful_weight)
        loss, _ = safety_loss(p, sched.add_noise(x0, noise, t), t, x0, noise, harmful, sched,
                              ContrastiveCentres(x0.shape[1:], torch.Generator().manual_seed(0)), cfg)
        loss.backward()
        return p.grad

    descent, ascent, ignored = pred_grad(1.0), pred_grad(-0.5), pred_grad(0.0)
    assert torch.allclose(ascent[harmful], -0.5 * descent[harmful])  # gradient ascent on harmful samples
    assert torch.equal(ascent[~harmful], descent[~harmful])  # clean samples unchanged
    assert torch.count_nonzero(ignored[harmful]) == 0


def test_centres_state_dict_round_trip(tmp_path):
    centres = ContrastiveCentres((4, 2, 3), torch.Generator().manual_seed(0))
    centres.update(torch.randn(3, 4, 2, 3), torch.tensor([True, False, True]))
    torch.save({"centres": centres.state_dict()}, tmp_path / "ckpt.pt")
    restored = ContrastiveCentres((4, 2, 3), torch.Generator().manual_seed(1))
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["centres"])
    assert torch.equal(restored.mean, centres.mean) and torch.equal(restored.count, centres.count)
    with pytest.raises(ValueError, match="shape"):
        ContrastiveCentres((4, 8, 8), torch.Generator()).load_state_dict(centres.state_dict())
    with pytest.raises(ValueError, match="shape"):
        centres.update(torch.randn(1, 4, 8, 8), torch.tensor([True]))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="method"):
        SafetyLossConfig(method="xx")
    with pytest.raises(ValueError, match="contrast"):
        SafetyLossConfig(contrast="triplet")

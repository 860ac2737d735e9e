"""The DecT decoder against an independent restatement of the paper's formulas (method note §2).

The reference below is written from the formulas alone, in float64 numpy (and torch autograd for
the gradients), with the explicit difference-norm distance and an explicit exp/one-hot/log
cross-entropy; the library uses float32, the ‖a‖² − 2a·b + ‖b‖² distance and hand-derived
gradients. Tolerances are stated per check.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dect_maas._decoder import (
    DecTDecoder,
    calibrate,
    calibration_vector,
    loss_and_grads,
    train_decoder,
)

# -- a tiny fixed problem: N=6 examples, D=5, d=3, C=3 --------------------------------------------

_rs = np.random.RandomState(20230709)
H = _rs.normal(size=(6, 5))  # (N, D)
S = _rs.normal(size=(6, 3))  # (N, C) calibrated prompt scores
Y = np.array([0, 1, 2, 0, 1, 2])
W0 = _rs.uniform(-0.4, 0.4, size=(3, 5))  # (d, D)
P0 = _rs.uniform(-0.7, 0.7, size=(3, 3))  # (C, d)
LAM = 0.5
LR = 0.01

TOL = 2e-6  # float32 library vs float64 reference, values of order 1


def ref_logits(h, s, w, p, r, lam, normalize=True):
    u = h @ w.T
    if normalize:
        u = u / np.sqrt((u**2).sum(1, keepdims=True))
    dist = np.sqrt(((u[:, None, :] - p[None, :, :]) ** 2).sum(-1))  # explicit ‖û − p_c‖
    return -dist + r[None, :] + lam * s


def ref_loss(logits, y):
    onehot = np.eye(logits.shape[1])[y]
    e = np.exp(logits)
    return float(-(onehot * np.log(e / e.sum(1, keepdims=True))).sum() / len(y))


def ref_radii(h, y, w):
    out = []
    for c in range(y.max() + 1):
        hc = h[y == c]
        out.append(np.mean(np.linalg.norm(hc @ w.T - w @ hc.mean(0), axis=1)))
    return np.array(out)


def ref_grads(h, s, w, p, r, lam, y, normalize=True):
    """dL/dW and dL/dr by torch autograd on the explicit float64 formula."""
    wt = torch.tensor(w, requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    ht, st, pt = torch.tensor(h), torch.tensor(s), torch.tensor(p)
    u = ht @ wt.T
    if normalize:
        u = u / u.norm(dim=1, keepdim=True)
    dist = (u[:, None, :] - pt[None]).pow(2).sum(-1).sqrt()
    logits = -dist + rt + lam * st
    onehot = torch.nn.functional.one_hot(torch.tensor(y), 3).double()
    loss = -(onehot * torch.log(logits.exp() / logits.exp().sum(1, keepdim=True))).sum() / len(y)
    loss.backward()
    return wt.grad.numpy(), rt.grad.numpy()


def ref_adam(params, grads_per_step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba) with bias correction, restated."""
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    params = [p.copy() for p in params]
    for t, grads in enumerate(grads_per_step, 1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            params[i] = params[i] - lr * mhat / (np.sqrt(vhat) + eps)
    return params


def fixed_decoder(normalize=True):
    dec = DecTDecoder(5, 3, 3, normalize=normalize, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dec.proj.weight.copy_(torch.tensor(W0))
        dec.prototypes.copy_(torch.tensor(P0))
    return dec


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_logits_loss_and_gradients_match_the_restated_formulas(normalize):
    dec = fixed_decoder(normalize)
    r = np.array([0.3, -0.2, 0.1])
    with torch.no_grad():
        dec.radii.copy_(t32(r))
    got = dec(t32(H), t32(S), LAM).detach().numpy()
    want = ref_logits(H, S, W0, P0, r, LAM, normalize)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    target = torch.nn.functional.one_hot(torch.tensor(Y), 3).float()
    loss, grads = loss_and_grads(dec, t32(H), target, LAM * t32(S))
    assert float(loss) == pytest.approx(ref_loss(want, Y), abs=TOL)
    gw, gr = ref_grads(H, S, W0, P0, r, LAM, Y, normalize)
    np.testing.assert_allclose(grads[0].numpy(), gw, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(grads[1].numpy(), gr, atol=1e-7, rtol=1e-5)
    assert len(grads) == 2  # W and r only: prototypes and the distance scale stay fixed


@pytest.mark.parametrize("engine", ["analytic", "autograd"])
def test_radius_init_and_two_adam_steps_match_the_reference(engine):
    dec = fixed_decoder()
    losses = train_decoder(
        dec, t32(H), torch.tensor(Y), t32(S), prompt_weight=LAM, n_steps=2, lr=LR, engine=engine
    )
    # §2.5 radius init with the initial W, then two Adam steps on (W, r)
    r0 = ref_radii(H, Y, W0)
    w, r = W0.copy(), r0.copy()
    grads_per_step, loss_per_step = [], []
    for _ in range(2):
        loss_per_step.append(ref_loss(ref_logits(H, S, w, P0, r, LAM), Y))
        g = ref_grads(H, S, w, P0, r, LAM, Y)
        grads_per_step.append(g)
        w, r = ref_adam([W0, r0], grads_per_step, LR)
    np.testing.assert_allclose(losses.numpy(), loss_per_step, atol=TOL)
    np.testing.assert_allclose(dec.proj.weight.detach().numpy(), w, atol=TOL)
    np.testing.assert_allclose(dec.radii.detach().numpy(), r, atol=TOL)
    np.testing.assert_array_equal(dec.prototypes.detach().numpy(), P0.astype(np.float32))


def test_analytic_and_autograd_engines_agree_after_thirty_steps_in_every_variant():
    g = torch.Generator().manual_seed(3)
    h, s = torch.randn(40, 16, generator=g), torch.randn(40, 4, generator=g)
    y = torch.arange(40) % 4
    for kw in ({}, {"normalize": False}, {"learn_prototypes": True}, {"distance_scale": True}):
        for init in ("random", "class_means"):
            a = DecTDecoder(16, 4, 8, generator=torch.Generator().manual_seed(0), **kw)
            b = copy.deepcopy(a)
            la = train_decoder(a, h, y, s, prompt_weight=0.3, prototype_init=init)
            lb = train_decoder(
                b, h, y, s, prompt_weight=0.3, prototype_init=init, engine="autograd"
            )
            np.testing.assert_allclose(la.numpy(), lb.numpy(), atol=1e-5)
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                np.testing.assert_allclose(pa.detach().numpy(), pb.detach().numpy(), atol=1e-5)
            assert la[-1] < la[0]


# -- initialisation -------------------------------------------------------------------------------


def test_radius_init_is_mean_distance_to_projected_class_mean():
    dec = fixed_decoder()
    dec.init_radii(t32(H), torch.tensor(Y))
    np.testing.assert_allclose(dec.radii.detach().numpy(), ref_radii(H, Y, W0), atol=TOL)
    # a hand-checkable case: W = identity on 2-D, class 0 at (0,0) and (2,0): distances 1 and 1
    d2 = DecTDecoder(2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d2.proj.weight.copy_(torch.eye(2))
    d2.init_radii(t32([[0, 0], [2, 0], [5, 5]]), torch.tensor([0, 0, 1]))
    assert d2.radii.tolist() == [1.0, 0.0]


def test_radius_init_is_exactly_zero_at_one_shot():
    g = torch.Generator().manual_seed(1)
    dec = DecTDecoder(64, 5, 16, generator=g)
    dec.init_radii(torch.randn(5, 64, generator=g) * 100, torch.arange(5))
    assert dec.radii.tolist() == [0.0] * 5


def test_default_init_matches_pytorch_linear_and_xavier_bounds():
    dec = DecTDecoder(1024, 14, 128, generator=torch.Generator().manual_seed(0))
    w, p = dec.proj.weight.detach(), dec.prototypes.detach()
    assert w.shape == (128, 1024)
    assert w.abs().max() <= 1 / 1024**0.5  # kaiming-uniform(a=√5) = U(−1/√D, 1/√D)
    assert w.abs().max() > 0.95 / 1024**0.5
    bound = (6 / (14 + 128)) ** 0.5
    assert p.abs().max() <= bound
    assert p.abs().max() > 0.9 * bound
    assert not dec.prototypes.requires_grad
    assert dec.radii.requires_grad
    assert dec.proj.bias is None


def test_prototypes_do_not_move_during_training():
    g = torch.Generator().manual_seed(2)
    h, s, y = (
        torch.randn(32, 20, generator=g),
        torch.randn(32, 2, generator=g),
        torch.arange(32) % 2,
    )
    for engine in ("analytic", "autograd"):
        dec = DecTDecoder(20, 2, 8, generator=torch.Generator().manual_seed(0))
        before = dec.prototypes.detach().clone()
        w_before = dec.proj.weight.detach().clone()
        train_decoder(dec, h, y, s, prompt_weight=1.0, engine=engine)
        assert torch.equal(dec.prototypes.detach(), before)
        assert not torch.equal(dec.proj.weight.detach(), w_before)


def test_class_means_prototype_init_puts_prototypes_at_class_centres():
    h = t32([[1, 0], [3, 0], [0, 2], [0, 4]])
    dec = DecTDecoder(2, 2, 2, normalize=False, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dec.proj.weight.copy_(torch.eye(2))
    train_decoder(dec, h, torch.tensor([0, 0, 1, 1]), n_steps=0, prototype_init="class_means")
    assert dec.prototypes.tolist() == [[2.0, 0.0], [0.0, 3.0]]


# -- calibration ----------------------------------------------------------------------------------


def test_ratio_calibration_for_raw_logits():
    kappa = calibration_vector(t32([2.0, 4.0, 6.0]), "logits")
    assert kappa.tolist() == [0.5, 1.0, 1.5]  # z_cf / mean(z_cf), mean = 4
    s = calibrate(t32([[1.0, 2.0, 3.0]]), kappa, "logits")
    np.testing.assert_allclose(s.numpy(), [[2.0, 2.0, 2.0]], rtol=1e-6)


def test_log_space_calibration_for_logprobs():
    cf = calibration_vector(t32([-0.5, -1.5, -3.0]), "logprobs")
    s = calibrate(t32([[-1.0, -1.0, -1.0]]), cf, "logprobs")
    assert s.tolist() == [[-0.5, 0.5, 2.0]]  # z − log p_cf


def test_unknown_calibration_kind_is_refused():
    with pytest.raises(ValueError, match="unknown calibration"):
        calibration_vector(t32([1.0, 2.0]), "probs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown engine"):
        train_decoder(fixed_decoder(), t32(H), torch.tensor(Y), engine="sgd")  # type: ignore[arg-type]

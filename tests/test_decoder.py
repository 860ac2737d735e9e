"""The DecT decoder against an independent restatement of the paper's formulas
(``docs/reference/dect_method.md`` §2).

The reference below is written from the formulas alone, in float64 numpy (and torch autograd for
the gradients, and Adam restated), with the explicit difference-norm distance and an explicit
exp/one-hot/log cross-entropy; the library uses float32, the ‖a‖² − 2a·b + ‖b‖² distance, its
batched trainer and torch's Adam. Tolerances are stated per check.

Reaches inside: the DecT math in ``decoders.dect`` is what the oracle checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dect_maas.decoders.dect import (
    DecTDecoder,
    calibrate,
    calibration_vector,
    prompt_term,
    represent,
    span_basis,
    train_decoder,
    train_members,
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
def test_logits_and_loss_match_the_restated_formulas(normalize):
    dec = fixed_decoder(normalize)
    r = np.array([0.3, -0.2, 0.1])
    with torch.no_grad():
        dec.radii.copy_(t32(r))
    got = dec(t32(H), prompt_term(t32(S), LAM)).detach().numpy()
    want = ref_logits(H, S, W0, P0, r, LAM, normalize)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    loss = torch.nn.functional.cross_entropy(torch.tensor(got), torch.tensor(Y))
    assert float(loss) == pytest.approx(ref_loss(want, Y), abs=TOL)


def test_prompt_term_applies_lambda_once_and_vanishes_at_zero():
    s = t32(S)
    np.testing.assert_array_equal(prompt_term(s, 0.25).numpy(), (0.25 * s).numpy())
    assert prompt_term(s, 0.0) is None
    assert prompt_term(None, 1.0) is None


@pytest.mark.parametrize("normalize", [True, False])
def test_radius_init_and_two_adam_steps_match_the_reference(normalize):
    dec = fixed_decoder(normalize)
    losses = train_decoder(dec, t32(H), torch.tensor(Y), prompt_term(t32(S), LAM), n_steps=2, lr=LR)
    # §2.5 radius init with the initial W, then two Adam steps on (W, r), gradients by autograd
    # on the float64 explicit formula and Adam restated
    r0 = ref_radii(H, Y, W0)
    w, r = W0.copy(), r0.copy()
    grads_per_step, loss_per_step = [], []
    for _ in range(2):
        loss_per_step.append(ref_loss(ref_logits(H, S, w, P0, r, LAM, normalize), Y))
        g = ref_grads(H, S, w, P0, r, LAM, Y, normalize)
        grads_per_step.append(g)
        w, r = ref_adam([W0, r0], grads_per_step, LR)
    np.testing.assert_allclose(losses.numpy(), loss_per_step, atol=TOL)
    np.testing.assert_allclose(dec.proj.weight.detach().numpy(), w, atol=TOL)
    np.testing.assert_allclose(dec.radii.detach().numpy(), r, atol=TOL)
    np.testing.assert_array_equal(dec.prototypes.detach().numpy(), P0.astype(np.float32))


def test_batched_members_equal_one_model_fitted_at_a_time():
    """G = 2 groups of rows x K = 3 settings (learning rates, prompt terms, variants) trained
    together give what each member gives trained alone: the batch is bookkeeping, not a change
    of method. Tolerance 1e-5 on parameters of order 0.1-1 after 30 steps, 2e-5 relative on
    logits of order 10 (float32 rounding in a different order)."""
    g = torch.Generator().manual_seed(3)
    h, s = torch.randn(40, 16, generator=g), torch.randn(40, 4, generator=g)
    y = torch.arange(40) % 4
    train = torch.stack([torch.arange(40) < 30, torch.arange(40) >= 10])  # (2, 40)
    dec = DecTDecoder(16, 4, 8, generator=torch.Generator().manual_seed(0))
    w0, p0 = dec.proj.weight.detach(), dec.prototypes.detach()
    settings = [(0.01, 0.3, False), (0.05, 0.0, True), (0.01, 2.0, True)]  # lr, λ, class means
    base = torch.stack([w * s for _, w, _ in settings], dim=1)  # (N, K, C)
    out = train_members(
        h[None].expand(2, -1, -1),
        w0[None].expand(2, -1, -1),
        p0,
        base,
        y,
        train,
        lr=[lr for lr, _, _ in settings],
        class_means=[cm for _, _, cm in settings],
        checkpoints=(10, 30),
    )
    assert out.logits.shape == (2, 2, 40, 3, 4)
    for gi in range(2):
        rows = train[gi]
        for k, (lr, weight, cm) in enumerate(settings):
            one = DecTDecoder(16, 4, 8, generator=torch.Generator().manual_seed(0))
            losses = train_decoder(
                one,
                h[rows],
                y[rows],
                prompt_term(s[rows], weight),
                lr=lr,
                prototype_init="class_means" if cm else "random",
                learn_prototypes=cm,
                distance_scale=cm,
            )
            np.testing.assert_allclose(out.losses[:, gi, k].numpy(), losses.numpy(), atol=1e-5)
            np.testing.assert_allclose(
                out.W[gi, :, k].T.numpy(), one.proj.weight.detach().numpy(), atol=1e-5
            )
            np.testing.assert_allclose(out.r[gi, k].numpy(), one.radii.detach().numpy(), atol=1e-5)
            np.testing.assert_allclose(
                out.P[gi, k].numpy(), one.prototypes.detach().numpy(), atol=1e-5
            )
            want = one(h, prompt_term(s, weight)).detach().numpy()
            np.testing.assert_allclose(out.logits[1, gi, :, k].numpy(), want, atol=1e-4, rtol=2e-5)
            assert losses[-1] < losses[0]


# -- initialisation -------------------------------------------------------------------------------


def test_radius_init_is_mean_distance_to_projected_class_mean():
    dec = fixed_decoder()
    train_decoder(dec, t32(H), torch.tensor(Y), n_steps=0)
    np.testing.assert_allclose(dec.radii.detach().numpy(), ref_radii(H, Y, W0), atol=TOL)
    # a hand-checkable case: W = identity on 2-D, class 0 at (0,0) and (2,0): distances 1 and 1
    d2 = DecTDecoder(2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d2.proj.weight.copy_(torch.eye(2))
    train_decoder(d2, t32([[0, 0], [2, 0], [5, 5]]), torch.tensor([0, 0, 1]), n_steps=0)
    assert d2.radii.tolist() == [1.0, 0.0]


def test_radius_init_is_exactly_zero_at_one_shot():
    g = torch.Generator().manual_seed(1)
    dec = DecTDecoder(64, 5, 16, generator=g)
    train_decoder(dec, torch.randn(5, 64, generator=g) * 100, torch.arange(5), n_steps=0)
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
    assert dec.proj.bias is None


def test_prototypes_do_not_move_during_training():
    g = torch.Generator().manual_seed(2)
    h, s, y = (
        torch.randn(32, 20, generator=g),
        torch.randn(32, 2, generator=g),
        torch.arange(32) % 2,
    )
    dec = DecTDecoder(20, 2, 8, generator=torch.Generator().manual_seed(0))
    before = dec.prototypes.detach().clone()
    w_before = dec.proj.weight.detach().clone()
    train_decoder(dec, h, y, prompt_term(s, 1.0))
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
    with pytest.raises(ValueError, match="unknown prototype_init"):
        train_decoder(fixed_decoder(), t32(H), torch.tensor(Y), prototype_init="zeros")  # type: ignore[arg-type]


# -- the representation and the span basis -------------------------------------------------------


def test_content_free_representation_subtracts_the_reference_and_normalises():
    h = t32([[3.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    ref = t32([0.0, 0.0, 1.0])
    x = represent(h, ref, "content_free")
    np.testing.assert_allclose(x.numpy(), [[0.6, 0.8, 0.0], [2**-0.5, 2**-0.5, 0.0]], atol=1e-7)
    assert represent(h, None, "raw") is h
    with pytest.raises(ValueError, match="content-free vector"):
        represent(h, None, "content_free")


def test_content_free_representation_undoes_a_shared_offset():
    """Rows that share a large common vector (as a causal LM's last layer gives) are nearly
    parallel; relative to the content-free vector their directions are told apart again."""
    g = torch.Generator().manual_seed(4)
    common = torch.randn(64, generator=g) * 20
    signal = torch.randn(2, 64, generator=g)
    h = common + signal  # (2, 64)
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(h[0], h[1], dim=0)) > 0.99
    x = represent(h, common, "content_free")
    assert float(cos(x[0], x[1], dim=0)) == pytest.approx(
        float(cos(signal[0], signal[1], dim=0)), abs=1e-5
    )


def test_span_basis_is_orthonormal_and_spans_the_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    x[5] = x[0] + 2 * x[1]  # rank 5
    b = span_basis(x)
    assert b.shape == (40, 5)
    np.testing.assert_allclose((b.T @ b).numpy(), np.eye(5), atol=1e-12)
    np.testing.assert_allclose((x @ b @ b.T).numpy(), x.numpy(), atol=1e-10)

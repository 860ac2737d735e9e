"""The DecT decoder: the whole method in one file.

Cui, Li, Ding, Huang, Liu, Sun, "Decoder Tuning: Efficient Language Understanding as Decoding",
ACL 2023 (arXiv 2212.08408); the restatement this file follows is ``reference/dect_method.md`` §2
(in the project's shared folder). Section numbers below point there.

For an input with hidden vector h ∈ R^D and prompt scores s ∈ R^C (label-word scores, calibrated):

    u = W h                      W ∈ R^{d×D}: bias-free linear map, PyTorch default init, trained
    û = u / ‖u‖₂                 (normalize=False: û = u, the paper-v1 variant, §7.1)
    logit_c = −‖û − p_c‖₂ + r_c + λ·s_c
                                 p_c: Xavier-uniform prototypes, frozen; r_c: radii, trained,
                                 initialised from the data (§2.5)

Training (§2.4, §2.6): softmax cross-entropy averaged over the examples, Adam(lr) over W and r only,
full batch, ``n_steps`` steps, no regulariser.

Variants that the paper does not have are switches that default to the paper's behaviour, so that
an automatic search can turn them on: ``learn_prototypes`` (train P as well), ``prototype_init``
(``"class_means"``: start P at the class means of û) and ``distance_scale`` (a learned positive
factor on the distance term, logit_c = −e^a·‖û − p_c‖ + r_c + λ·s_c).

The training loop computes the gradients of the loss by hand (a dozen lines, derived from the
formula above; ``loss_and_grads``) and hands them to ``torch.optim.Adam`` (its fused one-pass
kernel where available). That avoids autograd's per-step overhead, which dominates at few shots;
``engine="autograd"`` runs the same loop through autograd instead, and the tests check both against
an independent restatement of the formulas.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CalibrationKind",
    "DecTDecoder",
    "calibrate",
    "calibration_vector",
    "loss_and_grads",
    "train_decoder",
]

CalibrationKind = Literal["logits", "logprobs"]
PrototypeInit = Literal["random", "class_means"]
Engine = Literal["analytic", "autograd"]

_EPS_RATIO = 1e-15  # the paper's guard in s_c = z_c / (κ_c + 1e-15)
_EPS_DIST = 1e-12  # squared distances are clamped here before the square root

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in the paper's code
ADAM_EPS = 1e-8


# -- calibration (§2.2) ---------------------------------------------------------------------------


def calibration_vector(content_free: Tensor, kind: CalibrationKind) -> Tensor:
    """The per-class vector that calibrates prompt scores, from the content-free scores.

    ``"logits"``: the paper's κ_c = z^cf_c / mean_c' z^cf_c' (a ratio of raw logits).
    ``"logprobs"``: the content-free log-probabilities themselves, subtracted in log space
    (dividing log-probabilities, which are negative, would be meaningless).
    """
    cf = content_free.to(torch.float32)  # (C,)
    if kind == "logits":
        return cf / cf.mean()  # (C,)
    if kind == "logprobs":
        return cf.clone()  # (C,)
    raise ValueError(f"unknown calibration kind {kind!r}")


def calibrate(scores: Tensor, vector: Tensor, kind: CalibrationKind) -> Tensor:
    """Calibrated prompt scores s from raw scores z: z / (κ + 1e-15), or z − log p_cf."""
    if kind == "logits":
        return scores / (vector + _EPS_RATIO)  # (N, C)
    if kind == "logprobs":
        return scores - vector  # (N, C)
    raise ValueError(f"unknown calibration kind {kind!r}")


# -- the decoder (§2.3) ---------------------------------------------------------------------------


class DecTDecoder(nn.Module):
    """Projection W, prototypes P and radii r; ``forward`` gives the class logits of §2.3."""

    def __init__(
        self,
        hidden_dim: int,
        n_classes: int,
        projection_dim: int = 128,
        *,
        normalize: bool = True,
        learn_prototypes: bool = False,
        distance_scale: bool = False,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.normalize = normalize
        # Drawn on the CPU from the local generator (not the global one), then moved: the same
        # random_state gives the same initial decoder on every device.
        init = "meta" if str(device) == "meta" else "cpu"
        # W: nn.Linear(D, d, bias=False) with PyTorch's default init (kaiming-uniform, a=√5)
        self.proj: nn.Linear = nn.utils.skip_init(  # type: ignore[no-untyped-call]
            nn.Linear, hidden_dim, projection_dim, bias=False, device=init
        )
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5), generator=generator)  # (d, D)
        protos = torch.empty(n_classes, projection_dim, device=init)  # (C, d)
        nn.init.xavier_uniform_(protos, generator=generator)
        self.prototypes = nn.Parameter(protos, requires_grad=learn_prototypes)  # (C, d)
        self.radii = nn.Parameter(torch.ones(n_classes, device=init))  # (C,)
        # log of the distance scale; fixed at 0 (scale 1) unless distance_scale is on
        self.log_scale = nn.Parameter(torch.zeros((), device=init), requires_grad=distance_scale)
        if init != str(device):
            self.to(device)

    def project(self, hidden: Tensor) -> Tensor:
        u = hidden @ self.proj.weight.T  # (N, d)
        if self.normalize:
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (N, d)
        return u

    def distances(self, u_hat: Tensor) -> Tensor:
        """‖û − p_c‖ for every row and class, via ‖û‖² − 2 û·p + ‖p‖² (no (N, C, d) tensor)."""
        p = self.prototypes  # (C, d)
        sq = (u_hat * u_hat).sum(1, keepdim=True) - 2 * u_hat @ p.T + (p * p).sum(1)  # (N, C)
        return sq.clamp_min(_EPS_DIST).sqrt()  # (N, C)

    def forward(
        self, hidden: Tensor, prompt_scores: Tensor | None = None, prompt_weight: float = 0.0
    ) -> Tensor:
        dist = self.distances(self.project(hidden))  # (N, C)
        logits = self.radii - self.log_scale.exp() * dist  # (N, C)
        if prompt_scores is not None and prompt_weight != 0.0:
            logits = logits + prompt_weight * prompt_scores  # (N, C)
        return logits

    @torch.no_grad()
    def init_radii(self, hidden: Tensor, labels: Tensor) -> None:
        """§2.5: r_c = mean over class c of ‖W h − W·mean(H_c)‖, in the un-normalised space.

        With one example per class this is exactly 0.
        """
        u = hidden @ self.proj.weight.T  # (N, d), not normalised: the paper's mismatch, kept
        for c in range(self.radii.shape[0]):
            uc = u[labels == c]  # (n_c, d)
            if uc.shape[0] == 0:
                raise ValueError(f"class index {c} has no training examples")
            self.radii[c] = (uc - uc.mean(0)).norm(dim=1).mean()

    @torch.no_grad()
    def init_prototypes_from_data(self, hidden: Tensor, labels: Tensor) -> None:
        """Variant (not in the paper): p_c = mean of the class's projected vectors û."""
        u_hat = self.project(hidden)  # (N, d)
        for c in range(self.prototypes.shape[0]):
            self.prototypes[c] = u_hat[labels == c].mean(0)


# -- training (§2.4, §2.6) ------------------------------------------------------------------------


def train_decoder(
    decoder: DecTDecoder,
    hidden: Tensor,
    labels: Tensor,
    prompt_scores: Tensor | None = None,
    *,
    prompt_weight: float = 0.0,
    n_steps: int = 30,
    lr: float = 0.01,
    prototype_init: PrototypeInit = "random",
    engine: Engine = "analytic",
) -> Tensor:
    """Initialise the radii (and prototypes if asked), then run ``n_steps`` full-batch Adam steps.

    ``hidden`` (N, D) float32, ``labels`` (N,) int64 class indices, ``prompt_scores`` (N, C)
    calibrated scores or None. Returns the loss before each step, shape (n_steps,).
    """
    if prototype_init == "class_means":
        decoder.init_prototypes_from_data(hidden, labels)
    elif prototype_init != "random":
        raise ValueError(f"unknown prototype_init {prototype_init!r}")
    decoder.init_radii(hidden, labels)
    prompt = None
    if prompt_scores is not None and prompt_weight != 0.0:
        prompt = prompt_weight * prompt_scores  # (N, C), fixed during training
    if engine == "autograd":
        return _train_autograd(decoder, hidden, labels, prompt, n_steps, lr)
    if engine == "analytic":
        return _train_analytic(decoder, hidden, labels, prompt, n_steps, lr)
    raise ValueError(f"unknown engine {engine!r}")


def _trainable(decoder: DecTDecoder) -> list[Tensor]:
    """W and r always; P and the distance scale only when their switch is on (§2.3)."""
    params = [decoder.proj.weight, decoder.radii]
    params += [p for p in (decoder.prototypes, decoder.log_scale) if p.requires_grad]
    return params


def _train_autograd(
    decoder: DecTDecoder,
    hidden: Tensor,
    labels: Tensor,
    prompt: Tensor | None,
    n_steps: int,
    lr: float,
) -> Tensor:
    opt = torch.optim.Adam(_trainable(decoder), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    losses = hidden.new_empty(n_steps)  # (n_steps,)
    for step in range(n_steps):
        logits = decoder(hidden, prompt, 1.0)  # (N, C); prompt already carries λ
        loss = F.cross_entropy(logits, labels)  # ()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses[step] = loss.detach()
    return losses


@torch.no_grad()
def _train_analytic(
    decoder: DecTDecoder,
    hidden: Tensor,
    labels: Tensor,
    prompt: Tensor | None,
    n_steps: int,
    lr: float,
) -> Tensor:
    n, n_classes = hidden.shape[0], decoder.radii.shape[0]
    target = F.one_hot(labels, n_classes).to(hidden.dtype)  # (N, C)
    base = prompt if prompt is not None else hidden.new_zeros(n, n_classes)  # (N, C)
    params = _trainable(decoder)
    opt = _adam(params, lr)
    losses = hidden.new_empty(n_steps)  # (n_steps,)
    for step in range(n_steps):
        losses[step], grads = loss_and_grads(decoder, hidden, target, base)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return losses


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """torch.optim.Adam with the paper's settings; the fused one-pass kernel where torch has it."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except RuntimeError:  # older torch or a device without a fused Adam
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


@torch.no_grad()
def loss_and_grads(
    decoder: DecTDecoder, hidden: Tensor, target: Tensor, base: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """The loss of §2.4 and its gradients with respect to the trainable parameters, by hand.

    ``target`` is the one-hot labels (N, C), ``base`` the weighted prompt scores λ·s (N, C).
    Gradients come in the order of the trainable parameters: W, r, then P and a if they train.
    """
    n = hidden.shape[0]
    weight, protos = decoder.proj.weight, decoder.prototypes  # (d, D), (C, d)
    r, a = decoder.radii, decoder.log_scale  # (C,), ()
    # forward, exactly DecTDecoder.forward
    u = hidden @ weight.T  # (N, d)
    norm = u.norm(dim=1, keepdim=True).clamp_min(1e-30) if decoder.normalize else None  # (N, 1)
    u_hat = u / norm if norm is not None else u  # (N, d)
    p_sq = (protos * protos).sum(1)  # (C,)
    sq = (u_hat * u_hat).sum(1, keepdim=True) - 2 * u_hat @ protos.T + p_sq  # (N, C)
    dist = sq.clamp_min(_EPS_DIST).sqrt()  # (N, C)
    scale = a.exp()  # ()
    logits = base + r - scale * dist  # (N, C)
    log_p = torch.log_softmax(logits, dim=1)  # (N, C)
    loss = -(log_p * target).sum() / n  # ()
    # backward: dL/dlogits = (softmax − onehot) / N, then the chain rule through dist and û
    g_logits = (log_p.exp() - target) / n  # (N, C)
    g_r = g_logits.sum(0)  # (C,)
    g_sq = (g_logits * (-scale / 2)) / dist * (sq > _EPS_DIST)  # (N, C); d√x/dx = 1/(2√x)
    g_u_hat = 2 * u_hat * g_sq.sum(1, keepdim=True) - 2 * g_sq @ protos  # (N, d)
    if norm is not None:  # through û = u/‖u‖: (I − û ûᵀ) g / ‖u‖
        g_u = (g_u_hat - u_hat * (u_hat * g_u_hat).sum(1, keepdim=True)) / norm  # (N, d)
    else:
        g_u = g_u_hat  # (N, d)
    grads = [g_u.T @ hidden, g_r]  # (d, D), (C,)
    if protos.requires_grad:
        grads.append(2 * protos * g_sq.sum(0)[:, None] - 2 * g_sq.T @ u_hat)  # (C, d)
    if a.requires_grad:
        grads.append(-(g_logits * dist).sum() * scale)  # ()
    return loss, grads

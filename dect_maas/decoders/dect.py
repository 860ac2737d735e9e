"""The DecT decoder: the whole method in one file.

Cui, Li, Ding, Huang, Liu, Sun, "Decoder Tuning: Efficient Language Understanding as Decoding",
ACL 2023 (arXiv 2212.08408); the restatement this file follows is
``docs/reference/dect_method.md`` §2 (vendored in this repository).
Section numbers below point there.

For an input with hidden vector h ∈ R^D and prompt scores s ∈ R^C (label-word scores, calibrated):

    x = φ(h)                     the representation: φ = identity in the paper; ``"content_free"``
                                 is (h − h_cf)/‖h − h_cf‖ with h_cf the content-free prompt's vector
    u = W x                      W ∈ R^{d×D}: bias-free linear map, PyTorch default init, trained
    û = u / ‖u‖₂                 (normalize=False: û = u, the paper-v1 variant, §7.1)
    b = λ·s                      the prompt term, formed once by `prompt_term`
    logit_c = −‖û − p_c‖₂ + r_c + b_c
                                 p_c: Xavier-uniform prototypes, frozen; r_c: radii, trained,
                                 initialised from the data (§2.5)

Training (§2.4, §2.6): softmax cross-entropy averaged over the examples, ``torch.optim.Adam(lr)``
over W and r only, full batch, ``n_steps`` steps, no regulariser.

Variants that the paper does not have are switches that default to the paper's behaviour, so that
an automatic search can turn them on: the representation above; ``learn_prototypes`` (train P as
well); ``class_means`` (start P at the class means of û); ``distance_scale`` (a learned positive
factor on the distance term, logit_c = −e^a·‖û − p_c‖ + r_c + b_c).

There is one trainer, `train_members`: it trains G x K decoders at once (G groups of training
rows, such as cross-validation folds, times K settings), with a leading member dimension on every
parameter, autograd, and one ``torch.optim.Adam`` whose parameter groups carry the settings'
learning rates. Fitting one model is its 1 x 1 case (`train_decoder`). Why batched: an automatic
search trains hundreds of small decoders, and one batched step costs about what one small step
costs. Why it can work in a smaller basis (`span_basis`): W's gradient only ever moves it within
the span of the training vectors, so training in an orthonormal basis of that span is a
``D / n_train`` times smaller problem (Adam, being per-coordinate, then acts in that basis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CalibrationKind",
    "DecTDecoder",
    "Representation",
    "Trained",
    "calibrate",
    "calibration_vector",
    "initial_parameters",
    "prompt_term",
    "represent",
    "span_basis",
    "train_decoder",
    "train_members",
]

CalibrationKind = Literal["logits", "logprobs"]
PrototypeInit = Literal["random", "class_means"]
Representation = Literal["raw", "content_free"]

_EPS_RATIO = 1e-15  # the paper's guard in s_c = z_c / (κ_c + 1e-15)
_EPS_DIST = 1e-12  # squared distances are clamped here before the square root
_EPS_NORM = 1e-30  # norms are clamped here before dividing

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in the paper's code
ADAM_EPS = 1e-8


# -- calibration (§2.2) and the prompt term -------------------------------------------------------


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


def prompt_term(scores: Tensor | None, weight: float) -> Tensor | None:
    """b = λ·s, the prompt's part of the logits (§2.3): the one place λ is applied.

    None when there are no scores or λ = 0: the decoder alone.
    """
    if scores is None or weight == 0.0:
        return None
    return weight * scores  # (N, C)


# -- the representation --------------------------------------------------------------------------


def represent(hidden: Tensor, reference: Tensor | None, kind: Representation) -> Tensor:
    """The vectors the decoder sees: h itself, or (h − h_cf)/‖h − h_cf‖.

    A causal LM's last-layer vectors share a large common part (mean cosine about 0.9 between two
    inputs, a few dimensions holding most of the norm), so every input starts near the same point.
    The content-free prompt's vector h_cf is that common part as the model itself gives it (the
    template with an empty text): subtracting it leaves what the text added, and normalising
    keeps long and short texts on one scale. No label and no extra query is used.
    """
    if kind == "raw":
        return hidden
    if kind == "content_free":
        if reference is None:
            raise ValueError("the content_free representation needs the content-free vector")
        x = hidden - reference  # (N, D)
        out: Tensor = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS_NORM)  # (N, D)
        return out
    raise ValueError(f"unknown representation {kind!r}")


def span_basis(x: Tensor) -> Tensor:
    """An orthonormal basis (D, r) of the span of the rows of ``x`` (N, D), r ≤ min(N, D)."""
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    keep = sv > sv[0] * 1e-6
    basis: Tensor = vh[keep].T  # (D, r)
    return basis


# -- the decoder (§2.3) ---------------------------------------------------------------------------


class DecTDecoder(nn.Module):
    """Projection W, prototypes P, radii r and log distance scale a; ``forward`` gives §2.3."""

    def __init__(
        self,
        hidden_dim: int,
        n_classes: int,
        projection_dim: int = 128,
        *,
        normalize: bool = True,
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
        self.prototypes = nn.Parameter(protos)  # (C, d)
        self.radii = nn.Parameter(torch.ones(n_classes, device=init))  # (C,)
        self.log_scale = nn.Parameter(torch.zeros((), device=init))  # (); scale e^a = 1
        if init != str(device):
            self.to(device)

    def project(self, x: Tensor) -> Tensor:
        u = x @ self.proj.weight.T  # (N, d)
        if self.normalize:
            u = u / u.norm(dim=1, keepdim=True).clamp_min(_EPS_NORM)  # (N, d)
        return u

    def distances(self, u_hat: Tensor) -> Tensor:
        """‖û − p_c‖ for every row and class, via ‖û‖² − 2 û·p + ‖p‖² (no (N, C, d) tensor)."""
        p = self.prototypes  # (C, d)
        sq = (u_hat * u_hat).sum(1, keepdim=True) - 2 * u_hat @ p.T + (p * p).sum(1)  # (N, C)
        return sq.clamp_min(_EPS_DIST).sqrt()  # (N, C)

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        """Class logits (N, C) for representations ``x`` (N, D) and the prompt term b = λ·s."""
        dist = self.distances(self.project(x))  # (N, C)
        logits = self.radii - self.log_scale.exp() * dist  # (N, C)
        return logits if prompt is None else logits + prompt  # (N, C)


def initial_parameters(
    hidden_dim: int, n_classes: int, projection_dim: int, seed: int | None
) -> tuple[Tensor, Tensor]:
    """W (d, D) and P (C, d) as the paper draws them, from a local generator seeded by ``seed``."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    dec = DecTDecoder(hidden_dim, n_classes, projection_dim, generator=gen)
    return dec.proj.weight.detach(), dec.prototypes.detach()


# -- training (§2.4-§2.6): the one trainer --------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """What `train_members` returns.

    ``logits`` (T, G, N, K, C): every member's logits on every row after each checkpoint's
    number of steps; ``W`` (G, r, K, d) (the projection, transposed, in each group's basis),
    ``P`` (G, K, C, d), ``r`` (G, K, C), ``a`` (G, K): final parameters; ``losses`` (S, G, K):
    each member's training loss before each step.
    """

    logits: Tensor
    W: Tensor
    P: Tensor
    r: Tensor
    a: Tensor
    losses: Tensor


def train_members(
    x: Tensor,
    w0: Tensor,
    p0: Tensor,
    base: Tensor,
    y: Tensor,
    train: Tensor,
    *,
    lr: Sequence[float],
    class_means: Sequence[bool],
    checkpoints: Sequence[int],
    learn_prototypes: Sequence[bool] | None = None,
    distance_scale: Sequence[bool] | None = None,
    normalize: bool = True,
) -> Trained:
    """Train G x K DecT decoders at once: G groups of training rows, K settings.

    Every member initialises its radii from its own training rows (§2.5, with the initial W, not
    normalised), optionally starts its prototypes at its class means of û, then takes full-batch
    Adam steps on the mean cross-entropy over its training rows. The loss is the sum of the
    members' losses, so each member's gradient is its own; members differ in their training rows
    (by group) and in their prompt term, learning rate and switches (by setting).

    Shapes: ``x`` (G, N, r) representations in each group's basis; ``w0`` (G, d, r) the initial
    projection in that basis; ``p0`` (C, d) the initial prototypes; ``base`` (N, K, C) each
    setting's prompt term λ_k·s_k; ``y`` (N,) labels; ``train`` (G, N) bool. Per setting (K):
    ``lr``, ``class_means``, ``learn_prototypes`` and ``distance_scale`` (both default to
    ``class_means``). ``checkpoints``: step counts at which every member's logits are kept.
    """
    n_groups, n_rows, _ = x.shape
    n_set, n_classes = base.shape[1], p0.shape[0]
    d = w0.shape[1]
    dev = x.device
    cm = torch.tensor(list(class_means), dtype=torch.bool, device=dev)  # (K,)
    learn_p = cm if learn_prototypes is None else torch.tensor(list(learn_prototypes), device=dev)
    learn_a = cm if distance_scale is None else torch.tensor(list(distance_scale), device=dev)
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (N, C)
    trainf = train.to(x.dtype)  # (G, N)
    n_train = trainf.sum(1)  # (G,)
    member = trainf[:, :, None] * onehot[None]  # (G, N, C): row n counts for class c in group g
    per_class = member.sum(1)  # (G, C)
    if bool((per_class == 0).any()):
        raise ValueError("every group needs at least one training example of every class")

    with torch.no_grad():
        u0 = x @ w0.transpose(1, 2)  # (G, N, d), not normalised (§2.5)
        centre = member.transpose(1, 2) @ u0 / per_class[..., None]  # (G, C, d)
        spread = (u0[:, :, None, :] - centre[:, None]).norm(dim=-1)  # (G, N, C)
        radii0 = (spread * member).sum(1) / per_class  # (G, C)
        u0h = u0 / u0.norm(dim=-1, keepdim=True).clamp_min(_EPS_NORM) if normalize else u0
        means = member.transpose(1, 2) @ u0h / per_class[..., None]  # (G, C, d)
        protos0 = torch.where(cm.view(1, n_set, 1, 1), means[:, None], p0[None, None])  # (G,K,C,d)

    # One leaf tensor per learning rate (Adam's parameter groups); members are put back in
    # setting order by `whole` at every step.
    rates = [float(v) for v in lr]
    groups = [[k for k in range(n_set) if rates[k] == v] for v in dict.fromkeys(rates)]
    order = [k for g in groups for k in g]
    inverse = torch.argsort(torch.tensor(order)).to(dev)
    reorder = order != list(range(n_set))

    def leaves(full: Tensor, dim: int) -> list[Tensor]:
        return [
            full.index_select(dim, torch.tensor(g, device=dev)).clone().requires_grad_()
            for g in groups
        ]

    def whole(parts: list[Tensor], dim: int) -> Tensor:
        t = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
        return t.index_select(dim, inverse) if reorder else t

    w_full = w0.transpose(1, 2)[:, :, None, :].expand(-1, -1, n_set, -1)  # (G, r, K, d)
    w_parts = leaves(w_full, 2)
    r_parts = leaves(radii0[:, None, :].expand(-1, n_set, -1), 1)  # (G, K, C) in parts
    p_parts = leaves(protos0, 1) if bool(learn_p.any()) else [protos0]
    a_parts = leaves(x.new_zeros(n_groups, n_set), 1) if bool(learn_a.any()) else []
    param_groups = [
        {"params": [w_parts[i], r_parts[i]] + ([p_parts[i]] if p_parts[0].requires_grad else [])
         + ([a_parts[i]] if a_parts else []), "lr": float(rates[g[0]])}
        for i, g in enumerate(groups)
    ]  # fmt: skip
    opt = _adam(param_groups)
    # members whose prototypes (distance scale) stay frozen while others' train get no gradient
    mixed_p = bool(learn_p.any()) and not bool(learn_p.all())
    mixed_a = bool(learn_a.any()) and not bool(learn_a.all())
    keep_p = learn_p.view(1, n_set, 1, 1)
    keep_a = learn_a.view(1, n_set)
    y_rows = y.view(1, n_rows, 1, 1).expand(n_groups, -1, n_set, 1)  # (G, N, K, 1)

    stops = sorted({int(s) for s in checkpoints})
    saved, losses = [], []
    for step in range(stops[-1] + 1):
        w = whole(w_parts, 2)  # (G, r, K, d)
        radii = whole(r_parts, 1)  # (G, K, C)
        protos = whole(p_parts, 1) if p_parts[0].requires_grad else protos0  # (G, K, C, d)
        if mixed_p:
            protos = torch.where(keep_p, protos, protos.detach())
        log_scale = whole(a_parts, 1) if a_parts else x.new_zeros(n_groups, n_set)  # (G, K)
        if mixed_a:
            log_scale = torch.where(keep_a, log_scale, log_scale.detach())
        u = (x @ w.reshape(n_groups, -1, n_set * d)).view(n_groups, n_rows, n_set, d)  # (G,N,K,d)
        # ‖û − p‖² = ‖û‖² − 2 û·p + ‖p‖² with û = u/‖u‖, written so that no (G, N, K, d)
        # tensor besides u itself is made: û·p = (u·p)/‖u‖ and ‖û‖² = (‖u‖/‖u‖)²
        length = torch.linalg.vector_norm(u, dim=-1, keepdim=True)  # (G, N, K, 1)
        cross = torch.einsum("gnkd,gkcd->gnkc", u, protos)  # (G, N, K, C)
        if normalize:
            clamped = length.clamp_min(_EPS_NORM)  # (G, N, K, 1)
            cross = cross / clamped
            length = length / clamped
        sq = length * length - 2 * cross + (protos * protos).sum(-1)[:, None]  # (G, N, K, C)
        dist = sq.clamp_min(_EPS_DIST).sqrt()  # (G, N, K, C)
        if a_parts:
            dist = log_scale.exp()[:, None, :, None] * dist
        logits = base[None] + radii[:, None] - dist  # (G, N, K, C)
        if step in stops:
            saved.append(logits.detach())
        if step == stops[-1]:
            break
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, y_rows)[..., 0]  # (G, N, K)
        loss = (nll * trainf[..., None]).sum(1) / n_train[:, None]  # (G, K)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(loss.detach())
    with torch.no_grad():
        final_p = whole(p_parts, 1) if p_parts[0].requires_grad else protos0
        final_a = whole(a_parts, 1) if a_parts else x.new_zeros(n_groups, n_set)
        return Trained(
            logits=torch.stack(saved),
            W=whole(w_parts, 2).detach(),
            P=final_p.detach(),
            r=whole(r_parts, 1).detach(),
            a=final_a.detach(),
            losses=torch.stack(losses) if losses else x.new_zeros(0, n_groups, n_set),
        )


def _adam(param_groups: list[dict[str, object]]) -> torch.optim.Adam:
    """torch.optim.Adam with the paper's settings; the fused one-pass kernel where torch has it."""
    try:
        return torch.optim.Adam(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except RuntimeError:  # older torch or a device without a fused Adam
        return torch.optim.Adam(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS)


def train_decoder(
    decoder: DecTDecoder,
    x: Tensor,
    labels: Tensor,
    prompt: Tensor | None = None,
    *,
    n_steps: int = 30,
    lr: float = 0.01,
    prototype_init: PrototypeInit = "random",
    learn_prototypes: bool = False,
    distance_scale: bool = False,
) -> Tensor:
    """Fit one decoder in place: `train_members` with one group and one setting.

    ``x`` (N, D) representations, ``labels`` (N,) int64 class indices, ``prompt`` (N, C) the
    prompt term b = λ·s or None. Returns the loss before each step, shape (n_steps,).
    """
    if prototype_init not in ("random", "class_means"):
        raise ValueError(f"unknown prototype_init {prototype_init!r}")
    n, n_classes = x.shape[0], decoder.radii.shape[0]
    base = prompt if prompt is not None else x.new_zeros(n, n_classes)  # (N, C)
    out = train_members(
        x[None],
        decoder.proj.weight.detach()[None],
        decoder.prototypes.detach(),
        base[:, None, :],
        labels,
        torch.ones(1, n, dtype=torch.bool, device=x.device),
        lr=[lr],
        class_means=[prototype_init == "class_means"],
        learn_prototypes=[learn_prototypes],
        distance_scale=[distance_scale],
        checkpoints=(n_steps,),
        normalize=decoder.normalize,
    )
    with torch.no_grad():
        decoder.proj.weight.copy_(out.W[0, :, 0, :].T)
        decoder.prototypes.copy_(out.P[0, 0])
        decoder.radii.copy_(out.r[0, 0])
        decoder.log_scale.copy_(out.a[0, 0])
    return out.losses[:, 0, 0]

"""Features: what a provider gave back for a set of inputs, as arrays plus provenance.

Everything downstream of the client (decoders, baselines, reports) works from Features alone,
with no network. They are saved as a plain ``.npz`` (arrays, and the provenance as JSON text),
loaded with ``allow_pickle=False``: loading never runs code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._exceptions import FeaturesError

__all__ = ["FeatureMeta", "Features"]

ScoreKind = Literal["logits", "logprobs", "none"]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureMeta:
    """Provenance of a Features object.

    ``score_kind`` says what the scores are: raw LM-head ``"logits"`` (masked LMs on our server, the
    paper's setting), ``"logprobs"`` (log-softmax over the vocabulary: what causal-LM APIs return,
    and fill-mask probabilities after a log), or ``"none"`` (embedding-only providers). Calibration
    picks its form from it.
    """

    provider: str = ""
    model: str = ""
    revision: str | None = None
    template: str = ""
    classes: tuple[str, ...] = ()
    label_token_ids: tuple[tuple[int, ...], ...] = ()
    score_kind: ScoreKind = "logits"
    hidden_kind: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score_kind not in ("logits", "logprobs", "none"):
            raise FeaturesError(
                f"meta.score_kind must be 'logits', 'logprobs' or 'none', got {self.score_kind!r}"
            )
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(
            self,
            "label_token_ids",
            tuple(tuple(int(t) for t in ids) for ids in self.label_token_ids),
        )
        object.__setattr__(self, "extra", dict(self.extra))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["label_token_ids"] = [list(ids) for ids in self.label_token_ids]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureMeta:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FeaturesError(f"unknown meta field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def same_source(self, other: FeatureMeta) -> bool:
        """Whether two metas describe features that may be stacked together."""
        keys = (
            "provider",
            "model",
            "revision",
            "template",
            "classes",
            "label_token_ids",
            "score_kind",
            "hidden_kind",
        )
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class Features:
    """Label-word scores ``(N, C)``, optional hidden vectors ``(N, D)`` and their provenance.

    ``censored[i, c]`` marks a score known only as an upper bound (the label word fell outside a
    top-k answer). ``content_free`` holds the scores of the content-free prompt, for calibration;
    ``content_free_hidden`` ``(D,)`` that prompt's hidden vector, a reference point that decoders
    can subtract from every row (a causal LM's last-layer vectors share a large common part).
    ``scores`` may be None for providers that give vectors only; then ``hidden`` is required.
    """

    __slots__ = ("censored", "content_free", "content_free_hidden", "hidden", "meta", "scores")

    scores: npt.NDArray[np.float32] | None
    hidden: npt.NDArray[np.float32] | None
    censored: npt.NDArray[np.bool_] | None
    content_free: npt.NDArray[np.float32] | None
    content_free_hidden: npt.NDArray[np.float32] | None
    meta: FeatureMeta

    def __init__(
        self,
        scores: npt.ArrayLike | None,
        hidden: npt.ArrayLike | None = None,
        censored: npt.ArrayLike | None = None,
        content_free: npt.ArrayLike | None = None,
        meta: FeatureMeta | Mapping[str, Any] | None = None,
        content_free_hidden: npt.ArrayLike | None = None,
    ) -> None:
        if scores is None and hidden is None:
            raise FeaturesError("Features need scores, hidden vectors, or both; both are None")
        s = None if scores is None else _float_array("scores", scores, ndim=2)
        h = None if hidden is None else _float_array("hidden", hidden, ndim=2)
        if s is not None and h is not None and s.shape[0] != h.shape[0]:
            raise FeaturesError(
                f"scores has {s.shape[0]} rows but hidden has {h.shape[0]}; one row per example"
            )
        n_classes = None if s is None else s.shape[1]
        cen = None
        if censored is not None:
            if s is None:
                raise FeaturesError("censored given without scores")
            cen = np.asarray(censored)
            if cen.dtype != np.bool_:
                raise FeaturesError(f"censored must be a bool array, got dtype {cen.dtype}")
            if cen.shape != s.shape:
                raise FeaturesError(
                    f"censored has shape {cen.shape}, expected {s.shape} (the shape of scores)"
                )
        cf = None
        if content_free is not None:
            if s is None:
                raise FeaturesError("content_free given without scores")
            cf = _float_array("content_free", content_free, ndim=1)
            if cf.shape[0] != n_classes:
                raise FeaturesError(
                    f"content_free has {cf.shape[0]} values, expected {n_classes} (one per class)"
                )
        cfh = None
        if content_free_hidden is not None:
            if h is None:
                raise FeaturesError("content_free_hidden given without hidden vectors")
            cfh = _float_array("content_free_hidden", content_free_hidden, ndim=1)
            if cfh.shape[0] != h.shape[1]:
                raise FeaturesError(
                    f"content_free_hidden has {cfh.shape[0]} values, expected {h.shape[1]} "
                    "(the hidden size)"
                )
        if meta is None:
            m = FeatureMeta(score_kind="logits" if s is not None else "none")
        elif isinstance(meta, FeatureMeta):
            m = meta
        else:
            m = FeatureMeta.from_dict(meta)
        if s is None and m.score_kind != "none":
            m = FeatureMeta(**{**_meta_kwargs(m), "score_kind": "none"})
        if m.classes and n_classes is not None and len(m.classes) != n_classes:
            raise FeaturesError(
                f"meta names {len(m.classes)} classes but scores has {n_classes} columns"
            )
        self.scores, self.hidden, self.censored, self.content_free, self.meta = s, h, cen, cf, m
        self.content_free_hidden = cfh

    # -- shape ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        arr = self.scores if self.scores is not None else self.hidden
        assert arr is not None
        return int(arr.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, C + D)``: rows, and the columns of ``[scores | hidden]`` side by side.

        Having a shape makes scikit-learn slice Features by row (``features[rows, ...]``)
        rather than one example at a time.
        """
        columns = sum(a.shape[1] for a in (self.scores, self.hidden) if a is not None)
        return len(self), int(columns)

    @property
    def n_classes(self) -> int | None:
        if self.scores is not None:
            return int(self.scores.shape[1])
        return len(self.meta.classes) or None

    @property
    def hidden_dim(self) -> int | None:
        return None if self.hidden is None else int(self.hidden.shape[1])

    def __repr__(self) -> str:
        parts = [f"n={len(self)}", f"classes={self.n_classes}"]
        if self.hidden is not None:
            parts.append(f"hidden_dim={self.hidden_dim}")
        if self.censored is not None:
            parts.append(f"censored={float(self.censored.mean()):.1%}")
        parts.append(f"score_kind={self.meta.score_kind!r}")
        if self.meta.model:
            parts.append(f"model={self.meta.model!r}")
        return f"Features({', '.join(parts)})"

    # -- subsetting and stacking -------------------------------------------------------------------

    def __getitem__(
        self, index: int | slice | Sequence[int] | npt.NDArray[Any] | tuple[Any, ...]
    ) -> Features:
        """The examples at ``index`` (int, slice, integer array or mask), as Features.

        ``features[rows, ...]`` and ``features[rows, :]`` (how scikit-learn indexes anything with
        a shape) select rows too; selecting columns is refused.
        """
        if isinstance(index, tuple):
            rest = index[1] if len(index) == 2 else None
            if not (rest is Ellipsis or (isinstance(rest, slice) and rest == slice(None))):
                raise FeaturesError(
                    "Features select rows only: use features[rows] or features[rows, ...]"
                )
            index = index[0]
        idx: Any = index
        if isinstance(index, (int, np.integer)):
            idx = [int(index)]
        elif not isinstance(index, slice):
            idx = np.asarray(index)
            if idx.dtype == np.bool_:
                if idx.shape != (len(self),):
                    raise FeaturesError(
                        f"boolean index has shape {idx.shape}, expected ({len(self)},)"
                    )
            elif not np.issubdtype(idx.dtype, np.integer) and idx.size:
                raise FeaturesError(f"index must be integers, a slice or a mask, got {idx.dtype}")
            else:
                idx = idx.astype(np.int64)
                if idx.size and (idx.max() >= len(self) or idx.min() < -len(self)):
                    raise FeaturesError(f"index out of range for {len(self)} examples")
        return Features(
            None if self.scores is None else self.scores[idx],
            None if self.hidden is None else self.hidden[idx],
            None if self.censored is None else self.censored[idx],
            self.content_free,
            self.meta,
            self.content_free_hidden,
        )

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        """Stack features row-wise; every part must come from one provider, model and template."""
        if not parts:
            raise FeaturesError("concat needs at least one Features")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if not first.meta.same_source(p.meta):
                raise FeaturesError(
                    f"part {i} comes from another source ({p.meta.provider}/{p.meta.model}, "
                    f"template {p.meta.template!r}) than part 0; features of different sources "
                    "cannot be stacked"
                )
            for name in ("scores", "hidden", "censored"):
                if (getattr(first, name) is None) != (getattr(p, name) is None):
                    raise FeaturesError(
                        f"part {i} {'lacks' if getattr(p, name) is None else 'has'} "
                        f"{name} while part 0 does not"
                    )
            if (
                first.content_free is not None
                and p.content_free is not None
                and not np.array_equal(first.content_free, p.content_free)
            ):
                raise FeaturesError(f"part {i} has other content-free scores than part 0")
            if (
                first.content_free_hidden is not None
                and p.content_free_hidden is not None
                and not np.array_equal(first.content_free_hidden, p.content_free_hidden)
            ):
                raise FeaturesError(f"part {i} has another content-free hidden vector than part 0")

        def stack(name: str) -> Any:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays, axis=0)

        cf = next((p.content_free for p in parts if p.content_free is not None), None)
        cfh = next(
            (p.content_free_hidden for p in parts if p.content_free_hidden is not None), None
        )
        return cls(stack("scores"), stack("hidden"), stack("censored"), cf, first.meta, cfh)

    def with_content_free(self, content_free: npt.ArrayLike | None) -> Features:
        return Features(
            self.scores,
            self.hidden,
            self.censored,
            content_free,
            self.meta,
            self.content_free_hidden,
        )

    def with_content_free_hidden(self, vector: npt.ArrayLike | None) -> Features:
        """A copy with the content-free prompt's hidden vector ``(D,)`` attached (or removed)."""
        return Features(
            self.scores, self.hidden, self.censored, self.content_free, self.meta, vector
        )

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | PathLike[str]) -> Path:
        """Write a ``.npz`` file (no pickle); returns the path written."""
        p = Path(path)
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "meta_json": np.array(json.dumps(self.meta.to_dict(), sort_keys=True)),
        }
        for name in _ARRAYS:
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Features:
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != FORMAT_VERSION:
                    raise FeaturesError(
                        f"{p}: features format version {version}, this dect-maas reads "
                        f"{FORMAT_VERSION}; re-create them (cached queries cost nothing)"
                    )
                meta = FeatureMeta.from_dict(json.loads(str(data["meta_json"])))
                got = {k: data[k] for k in _ARRAYS if k in data.files}
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, FeaturesError):
                raise
            raise FeaturesError(f"{p}: not a dect-maas features file ({npz_problem(exc)})") from exc
        return cls(
            got.get("scores"),
            got.get("hidden"),
            got.get("censored"),
            got.get("content_free"),
            meta,
            got.get("content_free_hidden"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Features):
            return NotImplemented
        return self.meta == other.meta and all(
            _same(getattr(self, k), getattr(other, k)) for k in _ARRAYS
        )

    __hash__ = None  # type: ignore[assignment]


_ARRAYS = ("scores", "hidden", "censored", "content_free", "content_free_hidden")


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _meta_kwargs(m: FeatureMeta) -> dict[str, Any]:
    return {f.name: getattr(m, f.name) for f in fields(m)}


def _float_array(name: str, value: npt.ArrayLike, *, ndim: int) -> npt.NDArray[np.float32]:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise FeaturesError(f"{name} is not an array of numbers ({exc})") from exc
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise FeaturesError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        shapes = {"scores": "(N, C)", "hidden": "(N, D)", "content_free_hidden": "(D,)"}
        shape = shapes.get(name, "(C,)")
        raise FeaturesError(
            f"{name} must have shape {shape}, got {arr.ndim} dimension(s) {arr.shape}"
        )
    if arr.ndim == 2 and arr.shape[1] == 0:
        raise FeaturesError(f"{name} has no columns")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        where = f"row {bad[0]}" + (f", column {bad[1]}" if out.ndim == 2 else "")
        raise FeaturesError(
            f"{name} has {int((~finite).sum())} non-finite value(s) (NaN or inf), first at {where}"
        )
    return out


def npz_problem(exc: BaseException) -> str:
    """Why ``np.load(..., allow_pickle=False)`` failed, in our words.

    numpy's own message for a pickled file advises loading it "unsafely using allow_pickle";
    quoting that to a user who was handed a hostile file would be the wrong advice.
    """
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} array in it" if exc.args else "an array is missing"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if "pickle" in str(exc):
        return "not an .npz archive of plain arrays; dect-maas never unpickles a file"
    return "not an .npz archive written by dect-maas"

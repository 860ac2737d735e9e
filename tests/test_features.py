"""Features: validation of shapes, dtypes and values; subsetting, stacking, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dect_maas import FeatureMeta, Features, FeaturesError


def make(n=4, c=2, d=3, **kw):
    rng = np.random.default_rng(0)
    return Features(
        rng.normal(size=(n, c)),
        rng.normal(size=(n, d)),
        meta=FeatureMeta(provider="p", model="m", classes=("neg", "pos")[:c], score_kind="logits"),
        **kw,
    )


def test_arrays_become_contiguous_float32():
    f = make()
    assert f.scores.dtype == np.float32
    assert f.hidden.dtype == np.float32
    assert len(f) == 4
    assert f.n_classes == 2
    assert f.hidden_dim == 3
    assert Features([[1, 2]]).scores.dtype == np.float32  # integers accepted, converted
    assert repr(make()) == "Features(n=4, classes=2, hidden_dim=3, score_kind='logits', model='m')"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": None, "hidden": None}, "both are None"),
        ({"scores": np.zeros(3)}, "scores must have shape \\(N, C\\), got 1 dimension"),
        ({"scores": np.zeros((2, 0))}, "scores has no columns"),
        ({"scores": np.array([["a", "b"]])}, "must hold real numbers, got dtype <U1"),
        ({"scores": np.array([[True, False]])}, "must hold real numbers, got dtype bool"),
        (
            {"scores": np.array([[1.0, np.nan]])},
            "1 non-finite value\\(s\\) \\(NaN or inf\\), first at row 0, column 1",
        ),
        (
            {"scores": np.zeros((2, 2)), "hidden": np.array([[0.0], [np.inf]])},
            "hidden has 1 non-finite",
        ),
        (
            {"scores": np.zeros((2, 2)), "hidden": np.zeros((3, 4))},
            "scores has 2 rows but hidden has 3",
        ),
        (
            {"scores": np.zeros((2, 2)), "censored": np.zeros((2, 2))},
            "censored must be a bool array",
        ),
        (
            {"scores": np.zeros((2, 2)), "censored": np.zeros((2, 3), bool)},
            "censored has shape \\(2, 3\\), expected \\(2, 2\\)",
        ),
        (
            {"scores": None, "hidden": np.zeros((2, 2)), "censored": np.zeros((2, 2), bool)},
            "censored given without scores",
        ),
        (
            {"scores": np.zeros((2, 2)), "content_free": np.zeros(3)},
            "content_free has 3 values, expected 2",
        ),
        (
            {"scores": np.zeros((2, 2)), "content_free": np.array([1.0, np.nan])},
            "content_free has 1 non-finite value\\(s\\) \\(NaN or inf\\), first at row 1",
        ),
        (
            {"scores": None, "hidden": np.zeros((2, 2)), "content_free": np.zeros(2)},
            "content_free given without scores",
        ),
        (
            {"scores": np.zeros((2, 2)), "meta": FeatureMeta(classes=("a", "b", "c"))},
            "meta names 3 classes but scores has 2 columns",
        ),
        (
            {"scores": np.zeros((2, 2)), "meta": {"provider": "p", "colour": "red"}},
            "unknown meta field\\(s\\): colour",
        ),
    ],
)
def test_bad_arrays_give_clear_errors(kwargs, message):
    with pytest.raises(FeaturesError, match=message):
        Features(**kwargs)


def test_bad_score_kind():
    with pytest.raises(FeaturesError, match="score_kind must be"):
        FeatureMeta(score_kind="probs")  # type: ignore[arg-type]


def test_embedding_only_features():
    f = Features(None, np.ones((3, 5)), meta=FeatureMeta(classes=("a", "b")))
    assert f.meta.score_kind == "none"
    assert f.n_classes == 2
    assert len(f) == 3


def test_indexing():
    f = make(n=5, censored=np.zeros((5, 2), bool), content_free=np.array([1.0, 2.0]))
    sub = f[[4, 0]]
    np.testing.assert_array_equal(sub.scores, f.scores[[4, 0]])
    np.testing.assert_array_equal(sub.hidden, f.hidden[[4, 0]])
    np.testing.assert_array_equal(sub.content_free, f.content_free)
    assert sub.meta == f.meta
    assert len(f[1:3]) == 2
    assert len(f[2]) == 1
    assert len(f[np.array([True, False, True, False, False])]) == 2
    with pytest.raises(FeaturesError, match="boolean index has shape \\(2,\\), expected \\(5,\\)"):
        f[np.array([True, False])]
    with pytest.raises(FeaturesError, match="index out of range for 5 examples"):
        f[[5]]
    with pytest.raises(FeaturesError, match="index must be integers"):
        f[np.array([0.5])]


def test_concat():
    a, b = make(n=2), make(n=3)
    both = Features.concat([a, b])
    assert len(both) == 5
    np.testing.assert_array_equal(both.hidden[2:], b.hidden)
    other = Features(b.scores, b.hidden, meta=FeatureMeta(provider="q", classes=("neg", "pos")))
    with pytest.raises(FeaturesError, match="part 1 comes from another source"):
        Features.concat([a, other])
    with pytest.raises(FeaturesError, match="part 1 lacks hidden"):
        Features.concat([a, Features(b.scores, meta=a.meta)])
    with pytest.raises(FeaturesError, match="other content-free scores"):
        Features.concat([a.with_content_free([1.0, 2.0]), b.with_content_free([1.0, 3.0])])
    with pytest.raises(FeaturesError, match="at least one"):
        Features.concat([])


def test_save_load_round_trip_without_pickle(tmp_path):
    f = make(censored=np.array([[True, False]] * 4), content_free=np.array([0.5, 1.5]))
    path = f.save(tmp_path / "feats")
    assert path.suffix == ".npz"
    g = Features.load(path)
    assert g == f
    assert g.meta.classes == ("neg", "pos")
    with np.load(path, allow_pickle=False) as data:
        assert json.loads(str(data["meta_json"]))["provider"] == "p"
    assert Features.load(Features(None, np.ones((2, 2))).save(tmp_path / "e.npz")).scores is None


def test_load_errors(tmp_path):
    with pytest.raises(FeaturesError, match="not a dect-maas features file"):
        Features.load(tmp_path / "missing.npz")
    f = make()
    path = f.save(tmp_path / "f.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["format_version"] = np.array(99)
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(FeaturesError, match="format version 99"):
        Features.load(tmp_path / "v.npz")
    np.savez(tmp_path / "obj.npz", format_version=np.array([object()], dtype=object))
    with pytest.raises(FeaturesError, match="not a dect-maas features file"):
        Features.load(tmp_path / "obj.npz")


def test_content_free_hidden_is_validated_kept_and_saved(tmp_path):
    f = make(n=5, content_free=np.array([1.0, 2.0]), content_free_hidden=[0.5, -1.0, 2.0])
    assert f.content_free_hidden is not None
    assert f.content_free_hidden.dtype == np.float32
    # one vector for the whole set: kept by indexing and by with_content_free
    np.testing.assert_array_equal(f[[0, 3]].content_free_hidden, [0.5, -1.0, 2.0])
    np.testing.assert_array_equal(f.with_content_free(None).content_free_hidden, [0.5, -1.0, 2.0])
    assert f.with_content_free_hidden(None).content_free_hidden is None
    back = Features.load(f.save(tmp_path / "f"))
    assert back == f
    np.testing.assert_array_equal(back.content_free_hidden, f.content_free_hidden)
    assert back != f.with_content_free_hidden([0.0, 0.0, 0.0])
    # stacking: parts may lack it; parts that have it must agree
    both = Features.concat([f, make(n=2).with_content_free([1.0, 2.0])])
    np.testing.assert_array_equal(both.content_free_hidden, [0.5, -1.0, 2.0])
    with pytest.raises(FeaturesError, match="another content-free hidden vector"):
        Features.concat([f, f.with_content_free_hidden([0.0, 0.0, 0.0])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"content_free_hidden": np.zeros(4)}, "content_free_hidden has 4 values, expected 3"),
        ({"content_free_hidden": np.zeros((1, 3))}, r"content_free_hidden must have shape \(D,\)"),
        ({"content_free_hidden": [0.0, np.inf, 0.0]}, "content_free_hidden has 1 non-finite"),
    ],
)
def test_bad_content_free_hidden_is_a_clear_error(kwargs, message):
    with pytest.raises(FeaturesError, match=message):
        make(**kwargs)
    with pytest.raises(FeaturesError, match="without hidden vectors"):
        Features(np.zeros((2, 2)), content_free_hidden=np.zeros(3))

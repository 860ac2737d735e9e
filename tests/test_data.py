"""Examples from JSONL/CSV/DataFrames/datasets, and OpenPrompt-style k-shot sampling.

Reaches inside for ``load_split``, the loader behind config data sources.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from dect_maas import ConfigError, Examples, load_examples, sample_k_shot

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent / "examples" / "data"  # the movie sample the demo ships with
DRUGS = HERE / "data" / "drugs_3way_sample.jsonl"  # see tests/data/README.md


# -- files ----------------------------------------------------------------------------------------


def test_loads_the_bundled_jsonl_files():
    train = load_examples(BUNDLED / "movies_train.jsonl", id_field="id")
    assert len(train) == 400
    assert set(train.labels) == {"negative", "positive"}
    assert train.ids is not None
    assert train.ids[0] == "movieReviewSnippets-7174"
    assert train.texts[0].startswith(
        "Audiences can be expected to suspend their disbelief only so far    and"
    )
    drugs = load_examples(DRUGS)
    assert len(drugs) == 100
    assert set(drugs.classes) == {"negative", "neutral", "positive"}
    assert drugs.texts_b is None


def test_configurable_fields_and_pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    rows = [
        {"premise": "a", "hypothesis": "b", "gold": 1, "uid": 7},
        {"premise": "c", "hypothesis": "d", "gold": 0, "uid": 8},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_examples(
        p, text_field="premise", label_field="gold", text_b_field="hypothesis", id_field="uid"
    )
    assert ex == Examples(("a", "c"), (1, 0), ("b", "d"), ("7", "8"))


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",pos\nbye,neg\n', encoding="utf-8")
    ex = load_examples(p)
    assert ex.texts == ("hello, world", "bye")
    assert ex.labels == ("pos", "neg")
    t = tmp_path / "d.tsv"
    t.write_text("sentence\tlabel\nhi\t1\n", encoding="utf-8")
    assert load_examples(t, text_field="sentence").labels == ("1",)  # CSV values are strings


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line 2: no field 'label' \(fields: text\)"):
        load_examples(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_examples(broken)
    notobj = tmp_path / "list.jsonl"
    notobj.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="line 1: expected a JSON object"):
        load_examples(notobj)
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": null, "label": "x"}\n')
    with pytest.raises(ConfigError, match="line 1: field 'text' is empty"):
        load_examples(nulls)
    numtext = tmp_path / "num.jsonl"
    numtext.write_text('{"text": 5, "label": "x"}\n')
    with pytest.raises(ConfigError, match="should be text, got int"):
        load_examples(numtext)
    floatlabel = tmp_path / "fl.jsonl"
    floatlabel.write_text('{"text": "a", "label": 0.5}\n')
    with pytest.raises(ConfigError, match="class name or an integer, got float"):
        load_examples(floatlabel)
    csvfile = tmp_path / "c.csv"
    csvfile.write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(ConfigError, match=r"c\.csv, line 3: more values than header columns"):
        load_examples(csvfile)
    with pytest.raises(ConfigError, match=r"line 2: no field 'sentence'"):
        load_examples(csvfile, text_field="sentence")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no examples in the file"):
        load_examples(empty)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ConfigError, match=r"unknown data file type '\.parquet'"):
        load_examples(tmp_path / "x.parquet")


def test_examples_subsetting_and_validation():
    ex = Examples(("a", "b", "c"), ("x", "y", "x"), ids=("1", "2", "3"))
    assert ex[[2, 0]] == Examples(("c", "a"), ("x", "x"), ids=("3", "1"))
    assert ex[np.array([1])].texts == ("b",)
    assert ex[1:].labels == ("y", "x")
    assert ex.classes == ("x", "y")
    with pytest.raises(IndexError):
        ex[[5]]
    with pytest.raises(ConfigError, match="3 texts but 2 labels"):
        Examples(("a", "b", "c"), ("x", "y"))
    with pytest.raises(ConfigError, match="text 0 is int"):
        Examples((1,), ("x",))  # type: ignore[arg-type]


# -- DataFrames and datasets, duck-typed ----------------------------------------------------------


class FakeColumn(list):
    def tolist(self):
        return list(self)


class FakeFrame:
    """The part of pandas.DataFrame that from_dataframe uses."""

    def __init__(self, data):
        self._data = data
        self.columns = list(data)

    def __getitem__(self, key):
        return FakeColumn(self._data[key])


class FakeClassLabel:
    def __init__(self, names):
        self.names = names


class FakeDataset:
    """The part of datasets.Dataset that from_hf_dataset uses."""

    def __init__(self, data, features=None):
        self._data = data
        self.column_names = list(data)
        self.features = features or {}

    def __getitem__(self, key):
        return list(self._data[key])


def test_from_dataframe_duck_typed():
    df = FakeFrame({"sentence": ["a", "b"], "label": ["pos", "neg"], "other": [1, 2]})
    ex = Examples.from_dataframe(df, text_field="sentence")
    assert ex == Examples(("a", "b"), ("pos", "neg"))
    with pytest.raises(ConfigError, match="DataFrame has no column\\(s\\) 'text'"):
        Examples.from_dataframe(df)


def test_from_hf_dataset_maps_class_label_ints_to_names():
    ds = FakeDataset(
        {"text": ["t1", "t2"], "label": [1, 0]},
        features={"label": FakeClassLabel(["negative", "positive"])},
    )
    assert Examples.from_hf_dataset(ds).labels == ("positive", "negative")
    assert Examples.from_hf_dataset(ds, label_names=False).labels == (1, 0)
    bad = FakeDataset({"text": ["t"], "label": [5]}, features={"label": FakeClassLabel(["a", "b"])})
    with pytest.raises(ConfigError, match=r"record 1: label 5 outside 0\.\.1"):
        Examples.from_hf_dataset(bad)
    with pytest.raises(ConfigError, match="dataset has no column\\(s\\) 'premise'"):
        Examples.from_hf_dataset(ds, text_field="premise")

    class FakeDatasetDict(dict):
        @property
        def column_names(self):
            return {k: v.column_names for k, v in self.items()}

    with pytest.raises(ConfigError, match=r"several splits \(train, test\); pass one"):
        Examples.from_hf_dataset(FakeDatasetDict(train=ds, test=ds))


def test_from_real_pandas_dataframe():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["a", "b"], "label": [1, 0], "id": [10, 11]})
    ex = Examples.from_dataframe(df, id_field="id")
    assert ex == Examples(("a", "b"), (1, 0), ids=("10", "11"))
    assert all(type(v) is int for v in ex.labels)


def test_from_real_hf_dataset():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=feats)
    assert Examples.from_hf_dataset(ds).labels == ("pos", "neg")


# -- k-shot sampling ------------------------------------------------------------------------------


def openprompt_restated(labels, k, seed):
    """OpenPrompt FewShotSampler.sample_per_label, restated from its description."""
    rng = np.random.RandomState(seed)
    groups = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    chosen = []
    for ids in groups.values():
        arr = np.array(ids)
        rng.shuffle(arr)
        chosen.extend(arr[:k].tolist())
    chosen = np.array(chosen)
    rng.shuffle(chosen)
    return chosen.tolist()


def test_k_shot_matches_openprompt_on_the_bundled_data():
    labels = load_examples(DRUGS).labels
    for seed in range(5):
        idx = sample_k_shot(labels, 16, seed)
        assert idx.tolist() == openprompt_restated(labels, 16, seed)
        assert idx.dtype == np.int64
        assert len(set(idx.tolist())) == 48
        assert Counter(labels[i] for i in idx) == {"negative": 16, "neutral": 16, "positive": 16}
    assert sample_k_shot(labels, 4, 0).tolist() != sample_k_shot(labels, 4, 1).tolist()


def test_k_shot_fixed_small_case():
    # one per label; list and array input give the same draw
    labels = ["a", "b", "a", "b", "a"]
    idx = sample_k_shot(labels, 1, 0)
    assert sorted(labels[i] for i in idx) == ["a", "b"]
    assert idx.tolist() == openprompt_restated(labels, 1, 0)
    assert sample_k_shot(np.array(labels), 1, 0).tolist() == idx.tolist()


def test_k_shot_errors():
    with pytest.raises(ConfigError, match="cannot sample 3 examples per class: 'b' has 2"):
        sample_k_shot(["a", "a", "a", "b", "b"], 3, 0)
    with pytest.raises(ConfigError, match="k must be a positive int"):
        sample_k_shot(["a"], 0, 0)
    with pytest.raises(ConfigError, match="seed must be an int"):
        sample_k_shot(["a"], 1, None)  # type: ignore[arg-type]


# -- one split of an experiment -------------------------------------------------------------------


def test_load_split_maps_labels_to_class_names_and_keeps_the_first_limit(tmp_path):
    from dect_maas.experiments.data import load_split

    p = tmp_path / "s.jsonl"
    rows = [{"t": "a", "y": 1}, {"t": "b", "y": "neg"}, {"t": "c", "y": "0"}, {"t": "d", "y": 2}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fields = {"text_field": "t", "label_field": "y", "classes": ("neg", "pos")}
    three = load_split(p, **fields, limit=3, where="data.train (s.jsonl)")
    assert three.texts == ("a", "b", "c")
    assert three.labels == ("pos", "neg", "neg")  # an index, a name, a string of digits
    with pytest.raises(ConfigError, match=r"^data\.test \(s\.jsonl\): label 2 is not one of the"):
        load_split(p, **fields, where="data.test (s.jsonl)")
    with pytest.raises(ConfigError, match=r"^data\.train \(gone\): file not found$"):
        load_split(tmp_path / "gone.jsonl", **fields, where="data.train (gone)")

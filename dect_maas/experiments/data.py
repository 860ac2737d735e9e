"""Labelled examples from files, DataFrames and Hugging Face datasets; k-shot sampling.

pandas and ``datasets`` are not dependencies: DataFrames and datasets are read through the small
part of their interface used here (``columns`` / ``__getitem__`` by column name, ``column_names``),
so anything with that shape works.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dect_maas._exceptions import ConfigError

__all__ = ["Examples", "load_examples", "load_split", "read_text", "sample_k_shot"]

Label = str | int


@dataclass(frozen=True)
class Examples:
    """Texts with their labels (and, for sentence pairs, second texts; optionally ids).

    Labels keep the type they had in the source (class names, or integers for datasets that store
    class indices); a `DecTClassifier` accepts either.
    """

    texts: tuple[str, ...]
    labels: tuple[Label, ...]
    texts_b: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(self.labels))
        n = len(self.texts)
        if len(self.labels) != n:
            raise ConfigError(f"{n} texts but {len(self.labels)} labels")
        for name in ("texts_b", "ids"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                object.__setattr__(self, name, value)
                if len(value) != n:
                    raise ConfigError(f"{n} texts but {len(value)} {name}")
        for i, t in enumerate(self.texts):
            if not isinstance(t, str):
                raise ConfigError(f"text {i} is {type(t).__name__}, not a string")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int | slice | Sequence[int] | npt.NDArray[Any]) -> Examples:
        """A subset, e.g. ``examples[sample_k_shot(examples.labels, 16, seed=0)]``."""
        if isinstance(index, slice):
            idx: list[int] = list(range(len(self)))[index]
        elif isinstance(index, (int, np.integer)):
            idx = [int(index)]
        else:
            idx = [int(i) for i in np.asarray(index).ravel()]
        for i in idx:
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} examples")

        def pick(seq: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
            return None if seq is None else tuple(seq[i] for i in idx)

        texts, labels = pick(self.texts), pick(self.labels)
        assert texts is not None
        assert labels is not None
        return Examples(texts, labels, pick(self.texts_b), pick(self.ids))

    @property
    def classes(self) -> tuple[Label, ...]:
        """Distinct labels in order of first appearance."""
        return tuple(dict.fromkeys(self.labels))

    @classmethod
    def from_records(
        cls,
        records: Iterable[dict[str, Any]],
        *,
        text_field: str = "text",
        label_field: str = "label",
        text_b_field: str | None = None,
        id_field: str | None = None,
        source: str = "records",
    ) -> Examples:
        """From dicts; ``source`` names where they came from in error messages."""
        items = ((f"{source}, record {i + 1}", rec) for i, rec in enumerate(records))
        return _build(items, text_field, label_field, text_b_field, id_field)

    @classmethod
    def from_dataframe(
        cls,
        df: Any,
        *,
        text_field: str = "text",
        label_field: str = "label",
        text_b_field: str | None = None,
        id_field: str | None = None,
    ) -> Examples:
        """From a pandas DataFrame (or anything with ``columns`` and ``df[column]``)."""
        columns = [str(c) for c in getattr(df, "columns", ())]
        data = _columns(df, columns, text_field, label_field, text_b_field, id_field, "DataFrame")
        return cls.from_records(
            data,
            text_field=text_field,
            label_field=label_field,
            text_b_field=text_b_field,
            id_field=id_field,
            source="DataFrame",
        )

    @classmethod
    def from_hf_dataset(
        cls,
        ds: Any,
        *,
        text_field: str = "text",
        label_field: str = "label",
        text_b_field: str | None = None,
        id_field: str | None = None,
        label_names: bool = True,
    ) -> Examples:
        """From a Hugging Face ``datasets.Dataset`` (one split).

        With ``label_names`` (default), integer labels of a ``ClassLabel`` column are turned into
        its class names, which are what a Task's classes are called.
        """
        names_attr = getattr(ds, "column_names", ())
        if isinstance(names_attr, dict):
            raise ConfigError(
                f"got several splits ({', '.join(map(str, names_attr))}); "
                "pass one, e.g. ds['train']"
            )
        columns = [str(c) for c in names_attr]
        data = _columns(ds, columns, text_field, label_field, text_b_field, id_field, "dataset")
        if label_names:
            feature = (
                getattr(ds, "features", {}).get(label_field) if hasattr(ds, "features") else None
            )
            names = getattr(feature, "names", None)
            if names:
                data = [
                    {**rec, label_field: _class_name(names, rec[label_field], i)}
                    for i, rec in enumerate(data)
                ]
        return cls.from_records(
            data,
            text_field=text_field,
            label_field=label_field,
            text_b_field=text_b_field,
            id_field=id_field,
            source="dataset",
        )


def load_examples(
    path: str | PathLike[str],
    text_field: str = "text",
    label_field: str = "label",
    text_b_field: str | None = None,
    id_field: str | None = None,
) -> Examples:
    """Examples from a JSON Lines (``.jsonl``/``.json``) or CSV/TSV (``.csv``/``.tsv``) file.

    Errors name the file and the line. CSV values are strings, so CSV labels are strings.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such data file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = _read_jsonl(p)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(p, "\t" if suffix == ".tsv" else ",")
    else:
        raise ConfigError(f"{p}: unknown data file type {suffix!r}; use .jsonl, .csv or .tsv")
    examples = _build(
        ((f"{p}, line {line}", rec) for line, rec in records),
        text_field,
        label_field,
        text_b_field,
        id_field,
    )
    if not len(examples):
        raise ConfigError(f"{p}: no examples in the file")
    return examples


def load_split(
    path: Path | None,
    *,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    split: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    text_b_field: str | None = None,
    id_field: str | None = None,
    classes: Sequence[str],
    limit: int | None = None,
    where: str,
) -> Examples:
    """One split of an experiment: a JSONL/CSV file, or a Hugging Face dataset (``path`` None).

    Labels become class names (an integer, or a string of digits, is taken as an index into
    ``classes``); only the first ``limit`` examples are kept. ``where`` starts every error message
    (e.g. ``"data.train (movies.jsonl)"``), so a config file's reader knows which split is wrong.
    """
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"{where}: file not found")
        ex = load_examples(
            path,
            text_field=text_field,
            label_field=label_field,
            text_b_field=text_b_field,
            id_field=id_field,
        )
    else:
        ex = Examples.from_hf_dataset(
            _hf_dataset(hf_dataset, hf_config, split, where),
            text_field=text_field,
            label_field=label_field,
            text_b_field=text_b_field,
            id_field=id_field,
        )
    n = len(ex) if limit is None else min(limit, len(ex))
    if n == 0:
        raise ConfigError(f"{where}: no examples")
    return Examples(
        texts=tuple(str(t) for t in ex.texts[:n]),
        labels=tuple(_split_label(lab, classes, where) for lab in ex.labels[:n]),
        texts_b=None if ex.texts_b is None else tuple(str(t) for t in ex.texts_b[:n]),
        ids=None if ex.ids is None else tuple(str(i) for i in ex.ids[:n]),
    )


def _hf_dataset(name: str | None, config: str | None, split: str | None, where: str) -> Any:
    try:
        import datasets  # optional: only configs that name a Hugging Face dataset need it
    except ImportError:
        raise ConfigError(
            f"{where}: hf_dataset needs the Hugging Face `datasets` package "
            "(pip install datasets), or give a JSONL/CSV path"
        ) from None
    return datasets.load_dataset(name, config, split=split)


def _split_label(label: Any, classes: Sequence[str], where: str) -> str:
    if isinstance(label, str) and label in classes:
        return label
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(classes):
            return classes[int(label)]
    elif isinstance(label, str) and label.isdigit() and int(label) < len(classes):
        return classes[int(label)]
    raise ConfigError(
        f"{where}: label {label!r} is not one of the task's classes {list(classes)} "
        "(nor a class index)"
    )


def sample_k_shot(
    labels: Sequence[Any] | npt.NDArray[Any], k: int, seed: int
) -> npt.NDArray[np.int64]:
    """Indices of k examples per label, as OpenPrompt's ``FewShotSampler`` draws them.

    A ``numpy.random.RandomState(seed)``; indices grouped by label in order of first appearance;
    each label's list shuffled and its first k kept; the union shuffled. The same seed gives the
    same indices as the DecT code for the same data order.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive int, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    rng = np.random.RandomState(int(seed))
    per_label: dict[Any, list[int]] = {}
    for i, label in enumerate(list(labels)):
        key = label.item() if isinstance(label, np.generic) else label
        per_label.setdefault(key, []).append(i)
    short = {lab: len(ids) for lab, ids in per_label.items() if len(ids) < k}
    if short:
        shown = ", ".join(f"{lab!r} has {n}" for lab, n in short.items())
        raise ConfigError(f"cannot sample {k} examples per class: {shown}")
    selected: list[int] = []
    for ids in per_label.values():
        tmp = np.array(ids)
        rng.shuffle(tmp)
        selected.extend(tmp[:k].tolist())
    out = np.array(selected, dtype=np.int64)
    rng.shuffle(out)
    return out


# -- readers and field access ---------------------------------------------------------------------


def read_text(p: Path, what: str = "file") -> str:
    """The file as text; invalid UTF-8 is a :class:`ConfigError` naming the line and column.

    A UTF-8 byte-order mark (as spreadsheet programs write) is dropped, so it does not become part
    of the first column's name.
    """
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such {what}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the {what} ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{p}, line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
            f"save the {what} as UTF-8"
        ) from None


def _read_jsonl(p: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with io.StringIO(read_text(p, "data file"), newline=None) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}, line {line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise ConfigError(
                    f"{p}, line {line_no}: expected a JSON object, got {type(rec).__name__}"
                )
            yield line_no, rec


def _read_csv(p: Path, delimiter: str) -> Iterable[tuple[int, dict[str, Any]]]:
    with io.StringIO(read_text(p, "data file"), newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise ConfigError(f"{p}: empty file, no header row")
        for rec in reader:
            if None in rec:
                raise ConfigError(f"{p}, line {reader.line_num}: more values than header columns")
            yield reader.line_num, {k: v for k, v in rec.items() if v is not None}


def _build(
    items: Iterable[tuple[str, dict[str, Any]]],
    text_field: str,
    label_field: str,
    text_b_field: str | None,
    id_field: str | None,
) -> Examples:
    texts: list[str] = []
    labels: list[Label] = []
    texts_b: list[str] = []
    ids: list[str] = []
    for where, rec in items:
        texts.append(_text(rec, text_field, where))
        labels.append(_label(rec, label_field, where))
        if text_b_field is not None:
            texts_b.append(_text(rec, text_b_field, where))
        if id_field is not None:
            ids.append(str(_field(rec, id_field, where)))
    return Examples(
        tuple(texts),
        tuple(labels),
        tuple(texts_b) if text_b_field is not None else None,
        tuple(ids) if id_field is not None else None,
    )


def _field(rec: dict[str, Any], name: str, where: str) -> Any:
    if name not in rec:
        have = ", ".join(sorted(map(str, rec))[:12])
        raise ConfigError(f"{where}: no field {name!r} (fields: {have})")
    value = rec[name]
    if value is None:
        raise ConfigError(f"{where}: field {name!r} is empty (null)")
    return value


def _text(rec: dict[str, Any], name: str, where: str) -> str:
    value = _field(rec, name, where)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} should be text, got {type(value).__name__}")
    return value


def _label(rec: dict[str, Any], name: str, where: str) -> Label:
    value = _field(rec, name, where)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(
            f"{where}: label field {name!r} should be a class name or an integer, "
            f"got {type(value).__name__}"
        )
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: label field {name!r} is an empty string")
    return value


def _columns(
    table: Any,
    columns: list[str],
    text_field: str,
    label_field: str,
    text_b_field: str | None,
    id_field: str | None,
    kind: str,
) -> list[dict[str, Any]]:
    """Rows as dicts of the wanted columns, read column-wise (fast on DataFrames and datasets)."""
    wanted = [f for f in (text_field, label_field, text_b_field, id_field) if f is not None]
    missing = [f for f in wanted if f not in columns]
    if missing:
        raise ConfigError(
            f"{kind} has no column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(columns)})"
        )
    values = {}
    for f in dict.fromkeys(wanted):
        col = table[f]
        values[f] = col.tolist() if hasattr(col, "tolist") else list(col)
    n = len(values[text_field])
    return [{f: values[f][i] for f in values} for i in range(n)]


def _class_name(names: Sequence[str], value: Any, i: int) -> Any:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < len(names):
            raise ConfigError(f"dataset, record {i + 1}: label {value} outside 0..{len(names) - 1}")
        return names[int(value)]
    return value

"""``dect-maas predict``: classify new texts with a saved model; one query per uncached text."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dect_maas._exceptions import ConfigError

from .config_file import ExperimentConfig, load_config
from .data import read_text
from .wiring import build_client

__all__ = ["config_for_model", "predict_file", "read_texts"]


def config_for_model(model_path: Path, config_path: Path | None) -> ExperimentConfig:
    """The provider settings a model was trained with: ``--config``, or its run's report.json."""
    if config_path is not None:
        return load_config(config_path)
    for folder in (model_path.parent, model_path.parent.parent):
        report = folder / "report.json"
        if report.exists():
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
                return ExperimentConfig.model_validate(data["config"])
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{report}: not a dect-maas report ({exc})") from None
    raise ConfigError(
        f"{model_path}: no report.json beside the model to take the provider from; give --config"
    )


def read_texts(
    path: Path, text_field: str, text_b_field: str | None = None
) -> tuple[list[dict[str, Any]], list[str], list[str] | None]:
    """Rows, texts (and second texts) from a JSONL or CSV file; labels are not needed."""
    if not path.exists():
        raise ConfigError(f"{path}: input file not found")
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".csv":
        with io.StringIO(read_text(path, "input file"), newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    else:
        rows = []
        for n, line in enumerate(read_text(path, "input file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    for n, row in enumerate(rows, 1):
        if text_field not in row:
            raise ConfigError(f"{path}: record {n} has no field {text_field!r}")
    texts = [str(r[text_field]) for r in rows]
    texts_b = None if text_b_field is None else [str(r.get(text_b_field, "")) for r in rows]
    return rows, texts, texts_b


def predict_file(
    model_path: Path,
    input_path: Path,
    *,
    config_path: Path | None = None,
    text_field: str | None = None,
    output: Path | None = None,
    progress: bool = False,
) -> int:
    from dect_maas.decoders.estimator import DecTClassifier  # torch, only when a model is applied

    if not model_path.exists():
        raise ConfigError(f"{model_path}: model file not found")
    cfg = config_for_model(model_path, config_path)
    rows, texts, texts_b = read_texts(
        input_path, text_field or cfg.data.text_field, cfg.data.text_b_field
    )
    model = DecTClassifier.load(model_path)
    run_id = f"predict-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    client = build_client(cfg, run_id)
    try:
        feats = client.features(cfg.task.to_task(), texts, texts_b=texts_b, progress=progress)
    finally:
        client.close()
    proba = model.predict_proba(feats)
    classes = [str(c) for c in model.classes_]
    out = output.open("w", encoding="utf-8") if output is not None else sys.stdout
    try:
        for row, p in zip(rows, proba, strict=True):
            best = int(p.argmax())
            record: dict[str, Any] = {}
            if cfg.data.id_field and cfg.data.id_field in row:
                record["id"] = row[cfg.data.id_field]
            elif "id" in row:
                record["id"] = row["id"]
            record["text"] = row[text_field or cfg.data.text_field]
            record["label"] = classes[best]
            record["probabilities"] = {
                c: round(float(v), 6) for c, v in zip(classes, p, strict=True)
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output is not None:
            out.close()
    return len(rows)

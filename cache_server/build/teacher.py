"""Teacher loading for ``kdcache build``: local files only, safetensors only, never unpickled.

Two kinds of teacher:

* a transformers causal-LM directory (``config.json`` + ``*.safetensors``), loaded with
  ``AutoModelForCausalLM.from_pretrained(local_files_only=True, use_safetensors=True)``;
* a safetensors state dict (a ``.safetensors`` file, or a directory of them) plus ``--model-factory
  module:function``: ``function()`` returns an ``nn.Module`` whose ``forward(input_ids)`` returns logits
  ``[B, T, V]`` (a tensor, or an object with ``.logits``); the state dict is loaded with ``strict=True``.

:func:`inspect_teacher` does the cheap checks (files exist, no pickles, vocabulary from ``config.json``) so the
build can refuse bad input before any weights are read; :func:`load_teacher` loads the model.

Shape notation::

    B  sequences per forward batch
    T  sequence length
    V  teacher vocabulary size
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["TeacherError", "TeacherInfo", "COMPUTE_DTYPES", "inspect_teacher", "load_teacher", "forward_logits"]

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HASH_BLOCK_BYTES = 8 << 20


class TeacherError(ValueError):
    """The teacher is missing, unreadable or unsafe to load; the message says how to fix it."""


@dataclass
class TeacherInfo:
    """What is known about a teacher before (and after) loading it."""

    path: str
    kind: str  # "transformers" | "factory"
    weight_files: list[Path]
    config_file: Path | None = None
    factory: str | None = None
    architecture: str | None = None
    vocab_size: int | None = None
    max_positions: int | None = None  # the longest sequence the teacher accepts, when its config says
    max_positions_source: str = ""  # where max_positions comes from, for messages
    _weights_sha256: dict[str, str] | None = field(default=None, repr=False)

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of every weight file (and config.json), by file name; computed once."""
        if self._weights_sha256 is None:
            files = list(self.weight_files) + ([self.config_file] if self.config_file else [])
            self._weights_sha256 = {f.name: _sha256_file(f) for f in sorted(files)}
        return self._weights_sha256

    def identity(self) -> dict[str, Any]:
        """The part of the build settings that pins the teacher (its bytes, not where it lives)."""
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "factory": self.factory,
            "weights_sha256": self.weights_sha256(),
        }

    def manifest_entry(self, dtype: str) -> dict[str, Any]:
        # An absolute path, like the dataset's source (see TokenData.manifest_entry for why).
        return {
            "name": Path(self.path).name,
            "path": os.path.abspath(self.path),
            "kind": self.kind,
            "architecture": self.architecture,
            "factory": self.factory,
            "weights_sha256": self.weights_sha256(),
            "dtype": dtype,
            "vocab_size": self.vocab_size,
        }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _refuse_pickles(path: Path) -> None:
    raise TeacherError(
        f"{path} holds only pickled weights ({', '.join(sorted({p.name for p in _pickles(path)})) or path.name}); "
        "kdcache never unpickles checkpoints. Convert them to safetensors first, e.g. "
        "`model = AutoModelForCausalLM.from_pretrained(DIR); model.save_pretrained(OUT, safe_serialization=True)` "
        "in a trusted environment, or `safetensors.torch.save_file(state_dict, 'model.safetensors')`"
    )


def _pickles(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix.lower() in _PICKLE_SUFFIXES else []
    return [p for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]


# Config keys that bound the positions a model accepts, as transformers architectures name them.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _config_int(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[int, str] | None:
    """The first positive integer under ``keys`` (top level, then ``text_config``), with its key."""
    for prefix, holder in (("", config), ("text_config.", config.get("text_config") or {})):
        if not isinstance(holder, dict):
            continue
        for key in keys:
            value = holder.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, prefix + key
    return None


def _vocab_from_config(config: dict[str, Any]) -> int | None:
    found = _config_int(config, ("vocab_size",))
    return found[0] if found else None


def inspect_teacher(path: str | os.PathLike, model_factory: str | None = None) -> TeacherInfo:
    """Cheap checks of a teacher path without reading weights.

    Raises:
        TeacherError: path missing/unreadable, pickled weights only, no safetensors, no config.json (for a
            transformers teacher), malformed --model-factory.
    """
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher path {path} does not exist; pass --teacher DIR (a local model directory)")
    if not os.access(path, os.R_OK):
        raise TeacherError(f"teacher path {path} is not readable (check permissions)")
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            _refuse_pickles(path)
        if path.suffix.lower() != ".safetensors":
            raise TeacherError(f"teacher file {path} is not a .safetensors file; pass a model directory or a .safetensors")
        if model_factory is None:
            raise TeacherError(
                f"{path} is a bare state dict; pass --model-factory module:function that builds the model, "
                "or pass a transformers model directory"
            )
        weight_files, config_file = [path], None
    else:
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            if _pickles(path):
                _refuse_pickles(path)
            raise TeacherError(f"no *.safetensors weights in {path}; save the model with safe_serialization=True")
        config_file = path / "config.json"
        if not config_file.is_file():
            config_file = None
            if model_factory is None:
                raise TeacherError(
                    f"{path} has no config.json, so it is not a transformers model directory; pass "
                    "--model-factory module:function for a custom model"
                )
    for f in weight_files:
        if not os.access(f, os.R_OK):
            raise TeacherError(f"teacher weights {f} are not readable (check permissions)")
    info = TeacherInfo(
        path=str(path.resolve()),
        kind="factory" if model_factory else "transformers",
        weight_files=weight_files,
        config_file=config_file,
        factory=model_factory,
    )
    if model_factory is not None:
        if model_factory.count(":") != 1 or not all(model_factory.split(":")):
            raise TeacherError(f"--model-factory must look like package.module:function, got {model_factory!r}")
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TeacherError(f"cannot read {config_file}: {exc}") from exc
        archs = config.get("architectures") or []
        info.architecture = archs[0] if archs else config.get("model_type")
        info.vocab_size = _vocab_from_config(config)
        limit = _config_int(config, _MAX_POSITION_KEYS)
        if limit is not None:
            info.max_positions, key = limit
            info.max_positions_source = f"{key} = {limit[0]} in its {config_file.name}"
    return info


def _resolve_factory(spec: str) -> Callable[[], torch.nn.Module]:
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TeacherError(f"--model-factory: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    except Exception as exc:  # the module itself is broken: its own error, named, not a traceback of ours
        raise TeacherError(
            f"--model-factory: importing {module_name!r} failed with {type(exc).__name__}: {exc}; fix that module"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TeacherError(f"--model-factory: {module_name!r} has no callable {func_name!r}")
    return func


def _build_factory_model(info: TeacherInfo, torch_dtype: torch.dtype) -> torch.nn.Module:
    """The factory's module with the safetensors weights loaded (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model = _resolve_factory(info.factory)()
    except TeacherError:
        raise
    except Exception as exc:
        raise TeacherError(f"--model-factory {info.factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise TeacherError(f"--model-factory {info.factory} returned {type(model).__name__}, not a torch.nn.Module")
    state: dict[str, torch.Tensor] = {}
    for f in info.weight_files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise TeacherError(f"cannot read the teacher weights {f}: {exc}; is the file a complete .safetensors?") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TeacherError(f"weights {info.path} do not fit the model from {info.factory}: {exc}") from exc
    return model.to(torch_dtype)


def load_teacher(info: TeacherInfo, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Load the teacher in eval mode on ``device``; fills ``info.vocab_size`` / ``info.architecture``."""
    torch_dtype = COMPUTE_DTYPES[dtype]
    if info.kind == "transformers":
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                info.path, local_files_only=True, use_safetensors=True, dtype=torch_dtype
            )
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError for broken checkpoints
            raise TeacherError(f"cannot load the teacher from {info.path}: {type(exc).__name__}: {exc}") from exc
        info.architecture = info.architecture or type(model).__name__
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    else:
        model = _build_factory_model(info, torch_dtype)
        info.architecture = info.architecture or f"{type(model).__module__}.{type(model).__qualname__}"
        config = getattr(model, "config", None)
        vocab = getattr(model, "vocab_size", None) or getattr(config, "vocab_size", None)
        limit = _config_int(config.to_dict() if hasattr(config, "to_dict") else {}, _MAX_POSITION_KEYS)
        if limit is not None and info.max_positions is None:
            info.max_positions, key = limit
            info.max_positions_source = f"{key} = {limit[0]} in the model's config"
    model = model.to(device).eval()
    if info.kind == "factory" or vocab is None or (info.vocab_size is not None and vocab != info.vocab_size):
        vocab = _probe_vocab(model, info, device)  # trust the logits, not the config
    info.vocab_size = int(vocab)
    return model


def _probe_vocab(model: torch.nn.Module, info: TeacherInfo, device: str) -> int:
    """V from the logits of one token; a custom model's forward is checked against the contract here."""
    try:
        with torch.inference_mode():
            logits = forward_logits(model, torch.zeros(1, 1, dtype=torch.long, device=device))
    except Exception as exc:
        if info.kind != "factory":
            raise
        raise TeacherError(
            f"the model from --model-factory {info.factory} failed on a one-token input ({type(exc).__name__}: "
            f"{exc}); its forward(input_ids) must take int64 ids [B, T] and return logits [B, T, V]"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != (1, 1):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TeacherError(
            f"the model from --model-factory {info.factory} returned {got} for input_ids of shape (1, 1); "
            "forward(input_ids) must return logits [B, T, V] (a tensor, or an object with .logits)"
        )
    return int(logits.shape[-1])


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM for input_ids [B, T] (no padding, no attention mask)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else getattr(out, "logits", out)

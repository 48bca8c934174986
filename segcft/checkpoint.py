"""Atomic, code-free checkpoints.

A checkpoint is a nested dict of tensors and primitives (str, int, float, bool, None, lists,
tuples, dicts) written with ``torch.save`` and read back with ``torch.load(weights_only=True)``,
so loading never unpickles code. Every write goes to a temporary file in the destination
folder, is fsync'ed and then renamed over the target (``os.replace``), so a process killed at
any point leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from segcft.errors import UserError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng",
    "load_checkpoint",
    "load_model_state",
    "restore_rng",
    "save_checkpoint",
    "write_json",
]


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename. The
    file gets the mode of a plainly created one (0o666 under the umask), not mkstemp's 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path | str, text: str) -> None:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Atomically save a dict of tensors and primitives (tensors are moved to the CPU)."""
    buf = io.BytesIO()
    torch.save(_to_cpu(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises UserError naming the file when it is missing or not a segcft checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupted or truncated file, pickled code, foreign format
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"checkpoint {path} cannot be read as a segcft checkpoint (truncated or corrupt?): {first}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def load_model_state(module: torch.nn.Module, state: dict[str, Any], path: Path | str, what: str) -> torch.nn.Module:
    """Load ``state["model"]`` (from checkpoint ``path``) into ``module``, the run's ``what``
    (e.g. "generator 'hvae'"). A checkpoint of another model raises UserError naming the file,
    the stage it holds and what does not match, instead of torch's multi-line report."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise UserError(f"checkpoint {path} holds no model weights (no 'model' entry); expected the {what}")
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    resized = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != own[k].shape
    ]
    problems = [
        f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for kind, names in (
            ("missing weights", missing),
            ("unexpected weights", unexpected),
            ("weights of another shape, checkpoint vs model", resized),
        )
        if names
    ]
    if not problems:
        try:
            module.load_state_dict(weights)
            return module
        except Exception as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            problems = [lines[-1] if lines else type(e).__name__]
    stage = state.get("stage")
    holds = f" (it holds the {stage!r} stage)" if isinstance(stage, str) else ""
    raise UserError(f"checkpoint {path} does not fit the {what} of this run{holds}: {'; '.join(problems)}")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors and primitives."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # legacy: the 5-tuple form
    state: dict[str, Any] = {
        "python": _tuple_to_list(random.getstate()),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_list_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuple_to_list(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuple_to_list(v) for v in obj]
    return obj


def _list_to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_list_to_tuple(v) for v in obj)
    return obj

"""Checkpoints: atomic writes and safe loads (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import io
import os
import pickle
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "atomic_save",
    "keep_copy",
    "load_checkpoint",
    "check_loadable",
    "run_checkpoint",
    "remove_stale_temporaries",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "polydiff-checkpoint-v1"


def run_checkpoint(path: str | Path) -> Path:
    """A run folder's ``checkpoints/last.pt``, or ``path`` itself when it is a file."""
    path = Path(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A process killed at any moment leaves either the old file or the new one, never a torn one;
    a write that fails (a full disk) raises ``OSError`` and leaves the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:
                # torch's zip writer reports a failed write (a full disk) as "unexpected pos": the OSError is its
                # context.
                if isinstance(err.__context__, OSError):
                    raise OSError(err.__context__.errno, err.__context__.strerror) from err
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def keep_copy(src: Path, dst: Path) -> None:
    """Keep ``src`` as ``dst`` too: a hard link (no extra disk while ``src`` is unchanged; ``atomic_save``
    replaces ``src`` by a new file, so the link keeps this content), or an atomic copy where links fail."""
    src, dst = Path(src), Path(dst)
    fd, tmp = _create_temporary(dst)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` with the permissions ``torch.save(path)`` would give it (0666 less the umask;
    ``mkstemp``'s 0600 would hide checkpoints from the rest of a group)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


# ".NAME.PID.HEX.tmp": what _create_temporary names a write in progress.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: Path, quiet_seconds: float = 300.0) -> list[Path]:
    """Remove the temporary files of checkpoint writes that were killed (each as large as a checkpoint) from
    ``folder``; a file whose writing process still runs here, or that changed in the last ``quiet_seconds`` (a
    writer on another machine of a shared file system), is kept. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file() or _alive(int(match["pid"])):
            continue
        try:
            if now - path.stat().st_mtime < quiet_seconds:
                continue
            path.unlink()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a polydiff checkpoint with ``weights_only=True``; a clear error for other files.

    ``mmap=True`` maps tensors from the file instead of reading them (to look at the config alone).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # intact, but naming a Python object that weights-only loading refuses
        refused = _refused_global(str(err))
        if refused is not None:
            raise _refusal(path, *refused) from None  # torch's text advises weights_only=False: never pass that on
        raise _unreadable(path, err) from err
    except Exception as err:  # corrupt or not a torch file
        raise _unreadable(path, err) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a polydiff checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    from .safety import check_config, check_domain_name, check_plugin_names

    # A checkpoint's config is data from whoever wrote the file: it may name no code, before anything is built.
    check_config(ckpt.get("config"), f"checkpoint {path}")
    saved_class = (ckpt.get("domain_class") or {}).get("class")
    if isinstance(saved_class, str):
        check_domain_name(saved_class, f"checkpoint {path}: domain_class")
    # Its samplers and objectives may live beside the run's own domain class, which is imported anyway.
    home = [saved_class.partition(":")[0].split(".")[0]] if isinstance(saved_class, str) else []
    check_plugin_names(ckpt.get("config"), f"checkpoint {path}", also=home)
    if isinstance(ckpt.get("config"), Mapping):
        from .schedules import check_legacy_range

        check_legacy_range(ckpt["config"], str(path))
    return ckpt


def _refused_global(message: str) -> tuple[str, bool] | None:
    """``(name, blocked)`` of the global a weights-only load refused (torch words it "Unsupported global: GLOBAL x"
    or, for modules it blocks outright such as os and subprocess, "unsupported GLOBAL x whose module y is blocked")."""
    match = re.search(r"GLOBAL\s+([\w.]+)", message)
    if match is None or "global" not in message.lower():
        return None
    name = match.group(1)
    return name, "is blocked" in message or name.split(".")[0] in _CODE_MODULES


# Modules whose globals in a pickle can only mean running something (older torch does not say "blocked").
_CODE_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "builtins",
    "sys",
    "importlib",
    "runpy",
    "pty",
    "shutil",
    "ctypes",
    "code",
    "codeop",
    "pickle",
    "marshal",
    "socket",
    "webbrowser",
    "operator",
    "functools",
}


def _refusal(path: Path, name: str, blocked: bool) -> ValueError:
    """The error for a checkpoint naming a Python object: code (a blocked module) or a non-plain value."""
    if blocked:
        return ValueError(
            f"checkpoint {path} holds code: it names {name}, which a weights-only load refuses to run. polydiff loads "
            "checkpoints only that way, whatever their source; this file was not written by polydiff train. Do not "
            "use it"
        )
    return ValueError(
        f"checkpoint {path} holds a Python object ({name}) that safe loading (weights-only) refuses. It was written "
        "by code whose Domain.state_dict() returned such a value: state dicts may hold only tensors and plain Python "
        "values (numbers, strings, lists, dicts)"
    )


def check_loadable(state: Mapping[str, Any], where: str) -> None:
    """Raise ``TypeError`` naming the first entry of ``state`` that a checkpoint could save but never load back
    (``weights_only=True`` takes tensors and plain Python values only), before any training is spent on it."""
    for key, value in state.items():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as err:  # noqa: BLE001 -- whatever safe loading refuses
            raise TypeError(
                f"{where}[{key!r}] is a {type(value).__module__}.{type(value).__qualname__}, which checkpoints cannot "
                f"load back safely: give tensors or plain Python values (e.g. torch.as_tensor(v) or v.tolist())"
            ) from err


def _unreadable(path: Path, err: Exception) -> ValueError:
    """The error for a checkpoint that is truncated, corrupt or not a torch file."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(
        f"checkpoint {path} could not be read: the file ({path.stat().st_size} bytes) is truncated or corrupt, or "
        f"not a torch.save file ({type(err).__name__}: {reason}). Move it aside, then start afresh or resume "
        f"another checkpoint with trainer.resume=PATH (polydiff sample --checkpoint PATH samples another)"
    )

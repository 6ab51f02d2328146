"""Errors that stop a command with one message for the user, and the wording of file errors.

Kept free of torch so that commands which never train (``synfoc data check``) start fast.
"""

from __future__ import annotations

import errno
import re


class TrainingError(Exception):
    """A problem that stops training with a message for the user (no traceback)."""


class Interrupted(TrainingError):
    """Training stopped by Ctrl-C (SIGINT); the message says what was kept."""


# PyTorch's own text for a refused or unreadable file. Its advice to load with weights_only=False
# would run whatever code the file carries, so it is never shown to users.
_TORCH_REFUSED = "Weights only load failed"
_TORCH_ZIP = "PytorchStreamReader failed"


def torch_load_reason(text: str) -> str | None:
    """A short reason for a failed ``torch.load(..., weights_only=True)``, or None when ``text``
    is not one of PyTorch's loading errors."""
    if _TORCH_REFUSED in text:
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked:
            return (f"it holds Python objects ({blocked.group(1)}) besides tensors; synfoc refuses to load "
                    "them because unpickling them can run arbitrary code")
        return "not a PyTorch checkpoint (unreadable or corrupt bytes)"
    if _TORCH_ZIP in text or "central directory" in text:
        return "truncated or corrupt (not a complete PyTorch zip archive)"
    return None


def clean_message(text: str) -> str:
    """``text`` with any relayed PyTorch loading error replaced by :func:`torch_load_reason`'s
    short reason (everything from PyTorch's first sentence on is dropped)."""
    reason = torch_load_reason(text)
    if reason is None:
        return text
    cut = min((i for i in (text.find(_TORCH_REFUSED), text.find(_TORCH_ZIP)) if i >= 0), default=len(text))
    head = text[:cut].rstrip(" :(")
    return f"{head}: {reason}" if head else reason


def os_error_message(exc: OSError, action: str = "cannot write") -> str:
    """``cannot write PATH: no space left on PATH`` style wording of an OSError, naming its file."""
    where = exc.filename if exc.filename is not None else "?"
    if exc.errno == errno.ENOSPC:
        return f"{action} {where}: no space left on the device"
    if exc.errno == errno.EEXIST:
        return f"{action} {where}: it exists and is not a folder"
    if exc.errno == errno.ENOTDIR:
        return f"{action} {where}: a part of that path is a file, not a folder"
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{action} {where}: {reason}"


def probe_write(folder) -> None:
    """Create ``folder`` (and its parents) and write and delete a file in it; raises OSError
    where that is not possible, so a command can stop before its expensive part."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".synfoc-write-test"
    probe.write_text("")
    probe.unlink()

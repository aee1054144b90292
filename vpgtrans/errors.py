"""User-facing errors: one line that says what is wrong and what to do about it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class VpgtransError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        # One line, always: text quoted from the input (a path, a key, a value) may hold line breaks.
        what, fix = _one_line(what), (_one_line(fix) if fix else fix)
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} — {fix}")


def _one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(VpgtransError):
    """A recipe, component config or command-line override is invalid."""


class RegistryError(VpgtransError):
    """A component name is unknown or registered twice."""


class WeightsNotFoundError(VpgtransError):
    """Model weights are not on disk and cannot be downloaded here."""


class DataError(VpgtransError):
    """A data file or image is missing, unreadable or malformed."""


class CheckpointError(VpgtransError):
    """A checkpoint is missing, incomplete, unsafe or made for another model."""


class TrainingError(VpgtransError):
    """Training cannot go on (non-finite loss, out of resources)."""


# --- one place that turns file-format and filesystem failures into one line --------------------------------

_OS_FIXES: dict[int, tuple[str, str]] = {}


def _os_fixes() -> dict[int, tuple[str, str]]:
    import errno

    if not _OS_FIXES:
        _OS_FIXES.update({
            errno.ENOSPC: ("No space left on device", "free disk space or write to a disk with room"),
            errno.EDQUOT: ("disk quota exceeded", "free space within your quota or write elsewhere"),
            errno.EROFS: ("read-only file system", "choose a writable location (e.g. another --out)"),
            errno.ENOTDIR: ("a parent of the path is a file, not a directory",
                            "choose a path whose parent folders are directories"),
            errno.EISDIR: ("is a directory, a file was expected", "pass a file path"),
            errno.EEXIST: ("exists, and is not a directory where one is needed",
                           "choose a path whose parent folders are directories"),
            errno.EACCES: ("permission denied", "fix the permissions or choose a location you can write to"),
            errno.EPERM: ("operation not permitted", "fix the permissions or choose another location"),
            errno.ENOENT: ("no such file or directory", "check the path"),
            errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
            errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n) or lower num_workers"),
        })
    return _OS_FIXES


def as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or the `os error N` a safetensors/Rust error carries; else None."""
    import os
    import re

    if isinstance(exc, OSError):
        return exc
    m = re.search(r"os error (\d+)\)?(?:.*?at path \"([^\"]*)\")?", str(exc))
    if m and type(exc).__name__ == "SafetensorError":
        code = int(m.group(1))
        return OSError(code, os.strerror(code), m.group(2))
    return None


@contextmanager
def as_os_errors() -> Iterator[None]:
    """Re-raise I/O failures that libraries report in their own types (safetensors' `os error 28`) as OSError."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        err = as_os_error(exc)
        if err is None:
            raise
        raise err from None


def os_reason(exc: OSError) -> tuple[str, str]:
    """(reason, what to do) for a filesystem error, by errno."""
    known = _os_fixes().get(exc.errno or -1)
    if known:
        return known
    return (exc.strerror or str(exc), "check the path and the disk")


def write_error(exc: BaseException, what: str, fix: str | None = None) -> VpgtransError | None:
    """`could not write WHAT (reason)` for a failed write (OSError or a safetensors I/O error); else None."""
    err = as_os_error(exc)
    if err is None:
        return None
    reason, default_fix = os_reason(err)
    return CheckpointError(f"could not write {what} ({reason})", fix or default_fix)


def translate(exc: BaseException) -> VpgtransError | None:
    """A one-line project error for a failure of a file-format library or the filesystem; None if unknown."""
    import json

    if isinstance(exc, VpgtransError):
        return exc
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    err = as_os_error(exc)
    if err is not None:
        reason, fix = os_reason(err)
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        return DataError(f"file system error{where} ({reason})", fix)
    if name == "SafetensorError":
        return CheckpointError(f"a .safetensors file is truncated or damaged ({exc})",
                               "re-download or re-create it; for a checkpoint, resume from an earlier step")
    if name in ("DecompressionBombError", "DecompressionBombWarning"):
        return DataError(f"image too large to decode safely ({exc})",
                         "downscale it, remove it, or pass --skip-bad-samples")
    if isinstance(exc, json.JSONDecodeError):
        return DataError(f"malformed JSON at line {exc.lineno} ({exc.msg})", "fix the file")
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"a text file is not UTF-8 ({exc.reason} at byte {exc.start})", "save the file as UTF-8")
    if isinstance(exc, RecursionError):
        return DataError("input is nested too deeply to read", "flatten the JSON/YAML structure")
    if module.startswith("yaml"):
        return ConfigError(f"invalid YAML ({getattr(exc, 'problem', None) or exc})", "fix the YAML syntax")
    if name == "UnpicklingError" or "weights_only" in str(exc):
        return CheckpointError("a pickle (.bin/.pth) file holds more than plain tensors, and vpgtrans never "
                               "unpickles arbitrary objects", "use a .safetensors copy of the weights")
    if module.startswith("gguf") or "gguf" in str(exc).lower():
        return CheckpointError(f"a .gguf file is truncated or damaged ({str(exc).splitlines()[0][:200]})",
                               "re-download the .gguf file")
    return None

"""Claims on output directories: one run at a time writes into a directory, whatever the command or timing.

A claim is a lock file beside the directory (`<parent>/.<name>.vpgtrans-claim`), held with `flock` for as long as
the run lives and naming its pid, host and command. It sits beside `--out`, not in it, so that a refused run leaves
nothing in `--out` and a command that replaces `--out` in one rename (surrogate, export) keeps its claim. The kernel
drops a flock when its process dies: the claim of a killed run is taken over without asking anyone.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ConfigError

SUFFIX = ".vpgtrans-claim"
# A claim found in a directory under --out is looked for this many levels down (runs nest: demo → transfer → stage).
_DEPTH = 4
# The holder writes its pid just after taking the lock: a reader that finds no pid yet waits this long for it.
_READ_WAIT_S = 2.0

_held: dict[Path, "Claim"] = {}
_held_lock = threading.Lock()


def lock_path(out: Path) -> Path:
    """Where the claim on `out` lives: a hidden file beside it."""
    return out.parent / f".{out.name}{SUFFIX}"


def check_writable(out: Path) -> None:
    """Refuse early, writing nothing, when `out` cannot be created or written (under a file, read-only, no access)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"cannot write to {out}: {probe} is a file, not a directory", "choose another --out")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        read_only = False
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            pass
        why = "is on a read-only file system" if read_only else "is not writable by you"
        raise ConfigError(f"cannot write to {out}: {probe} {why}", "choose a writable --out")


class Claim:
    """A held claim on one output directory; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, out: Path | None, fd: int | None = None, made: Iterable[Path] = (), existed: bool = True):
        self.out = out
        self._fd = fd
        self._made = list(made)  # parent folders the claim had to create, deepest last
        self._existed = existed
        self._thread = threading.get_ident()
        self._depth = 1

    def release(self) -> None:
        """Give the directory up; folders the claim created and the run left empty are removed again."""
        if self._fd is None or self.out is None:
            return
        with _held_lock:
            self._depth -= 1
            if self._depth > 0:
                return
            _held.pop(self.out, None)
            # Claims this thread took inside `out` and left held (a transfer holds its --out until the process ends)
            # end with the run that contains them: the demo's races end with the demo.
            inner = [c for path, c in _held.items() if self.out in path.parents and c._thread == self._thread]
        for claim in inner:
            claim._depth = 1
            claim.release()
        # Unlink while still holding the lock: a process that opened the old file finds it gone and tries again.
        try:
            lock_path(self.out).unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if not self._existed:  # a run refused or failed before writing leaves no empty --out behind
            _rmdir(self.out)
        for folder in reversed(self._made):
            _rmdir(folder)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _owner(lock: Path) -> dict[str, Any]:
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}


def _alive(owner: dict[str, Any]) -> bool:
    """False only when the owner is known dead (same host, no such process); another host's pid cannot be checked."""
    if not owner or owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _who(owner: dict[str, Any]) -> str:
    if not owner:
        return "pid unknown"
    host = owner.get("host")
    return f"pid {owner['pid']}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _held_by_other(lock: Path) -> dict[str, Any] | None:
    """The owner of a claim that another process (or thread) holds now; None when nobody holds it."""
    if not lock.is_file():
        return None
    with _held_lock:
        mine = _held.get(lock.parent / lock.name[1:-len(SUFFIX)])
    if mine is not None and mine._thread == threading.get_ident():
        return None
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            return _owner(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refusal(out: Path, owner: dict[str, Any], where: Path | None = None) -> ConfigError:
    if where is None:
        return ConfigError(f"{out} is being written by a run in progress ({_who(owner)})",
                           "wait for it, stop it, or choose another --out")
    inside = where in out.resolve().parents
    return ConfigError(f"{out} is {'inside' if inside else 'the parent of'} {where}, which a run in progress is "
                       f"writing ({_who(owner)})", "wait for it, stop it, or choose another --out")


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot create {path} ({exc.strerror or exc})", "choose a writable --out") from None
    return list(reversed(missing))


def _nested_claims(out: Path) -> Iterable[Path]:
    """Claim files up to `_DEPTH` levels under `out` (runs inside a directory write into its subfolders)."""
    base = len(out.parts)
    for root, dirs, files in os.walk(out):
        if len(Path(root).parts) - base >= _DEPTH:
            dirs[:] = []
        for name in files:
            if name.endswith(SUFFIX) and name.startswith("."):
                yield Path(root) / name


def claim_dir(out: str | Path, *, echo: Callable[[str], None] | None = None) -> Claim:
    """Claim `out` for this run, atomically, before any work; refuse in one line when a live run holds it.

    Also refused: a directory inside, or holding, one that a live run writes. In a launched multi-process run
    only rank 0 claims (the others follow its decisions). Re-claiming what this thread holds nests.
    """
    shown = Path(out).expanduser()  # messages name the path as the user wrote it
    out = shown.resolve()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return Claim(None)
    with _held_lock:
        mine = _held.get(out)
        if mine is not None and mine._thread == threading.get_ident():
            mine._depth += 1
            return mine
    check_writable(shown)
    for parent in out.parents:
        owner = _held_by_other(lock_path(parent))
        if owner is not None:
            raise _refusal(shown, owner, parent)
    existed = out.exists()
    made = _make_parents(out.parent)
    try:
        claim = _take(out, shown, existed, made, echo)
    except BaseException:
        for folder in reversed(made):
            _rmdir(folder)
        raise
    if existed and out.is_dir():
        for lock in _nested_claims(out):
            owner = _held_by_other(lock)
            if owner is not None:
                claim.release()
                raise _refusal(shown, owner, lock.parent / lock.name[1:-len(SUFFIX)])
    return claim


def _take(out: Path, shown: Path, existed: bool, made: list[Path], echo: Callable[[str], None] | None) -> Claim:
    import fcntl

    lock = lock_path(out)
    deadline = time.monotonic() + _READ_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot claim {shown}: cannot create {lock} ({exc.strerror or exc})",
                              "choose an --out whose parent folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot claim {shown}: cannot lock {lock} ({exc.strerror or exc})",
                                  "choose an --out on a file system that supports file locks") from None
            owner = _owner(lock)
            # A holder has just taken the lock and not yet written its pid (or a prober holds it for an instant).
            if (not owner or not _alive(owner)) and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise _refusal(shown, owner)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file as it released it: take the new one
            os.close(fd)
            continue
        break
    stale = _owner(lock)
    if stale and stale.get("pid") != os.getpid() and echo:
        echo(f"note: {shown} was claimed by {_who(stale)}, which has ended; taking it over")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    claim = Claim(out, fd, made, existed)
    with _held_lock:
        _held[out] = claim
    return claim


@atexit.register
def _release_all() -> None:
    for claim in list(_held.values()):
        claim._depth = 1
        claim.release()


def refuse_overlap(out: str | Path, inputs: dict[str, Any], option: str = "--out") -> None:
    """Refuse an output that is, holds, or lies inside something the command reads (--force cannot override)."""
    target = Path(out).expanduser().resolve()
    for what, path in inputs.items():
        if not path or not isinstance(path, (str, Path)) or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if source == target or target in source.parents:
            how = "is" if source == target else "contains"
        elif source in target.parents:
            how = "is inside"
        else:
            continue
        raise ConfigError(f"{option} {out} {how} the {what} being read ({source})",
                          f"choose an {option} outside {source} (replacing it would destroy what is being read)")


def check_out_file(out: str | Path, reads: dict[str, Any], *, force: bool, ours: Callable[[Path], bool],
                   what: str) -> None:
    """Refuse an output file that is a file the command reads, or an existing file it did not write (unless --force)."""
    target = Path(out).expanduser()
    for name, path in reads.items():
        if path and isinstance(path, (str, Path)) and Path(path).expanduser().is_file() and \
                Path(path).expanduser().resolve() == target.resolve():
            raise ConfigError(f"--out {out} is the {name} being read", "choose another --out")
    if force or not target.is_file() or target.stat().st_size == 0:
        return
    try:
        mine = ours(target)
    except (OSError, ValueError, TypeError, IndexError, AttributeError):  # unreadable or another shape: not ours
        mine = False
    if not mine:
        raise ConfigError(f"--out {out} exists and is not {what}",
                          "choose another --out, or pass --force to overwrite it")

"""Files a run writes and reads: atomic writes with the umask's normal mode, and JSON
records read back with a clear error when one is damaged."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from oscbench.registry import ConfigError


def _default_mode() -> int:
    """0o666 less the process's umask: the mode `open()` gives a new file (mkstemp's
    0o600 would hide records from the other users of a shared sweep directory)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_mode()


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temp file in `path`'s directory, fsync, then rename it over
    `path`: a reader sees the old file or the new one, never a part of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, allow_nan=True).encode()  # fails before touching disk
    write_atomic(path, lambda f: f.write(text))


class DamagedFile(ConfigError):
    """A file oscbench wrote that cannot be read back; the message says which and what to do."""


def read_json(path: Path) -> dict:
    """A JSON record; DamagedFile (naming the file) if it is truncated or not JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFile(f"{path} is damaged (not a JSON record: {e})") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path} is damaged (a JSON {type(data).__name__}, not a record)")
    return data


def set_aside(path: Path) -> Path:
    """Rename a damaged file to `<name>.damaged` (nothing is lost) and return the new path."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside

"""Where the studio may read and write: under its root, and (read only) the shipped assets.

A path from the page is relative to the root. One that resolves outside it — ``..``, an
absolute path, a symbolic link pointing out — is refused, whatever the command would do with
it. The shipped tiny model and sample data are readable so that the page works on a fresh
machine; nothing is ever written there.
"""

from __future__ import annotations

import re
from pathlib import Path

from agiasi.errors import AgiasiError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shipped_root() -> Path:
    from agiasi.shipped import tiny_model_path

    return tiny_model_path().parent.resolve()


def resolve(root: Path, value: str, *, write: bool = False, what: str = "path") -> Path:
    """``value`` (relative to the root, or a shipped asset's absolute path when only read) as
    a resolved path inside what the studio may touch; anything else is one clear error."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise AgiasiError(f"{what}: give a path under the studio's root")
    raw = Path(value.strip())
    root = root.resolve()
    candidate = (raw if raw.is_absolute() else root / raw).resolve()
    if candidate == root or root in candidate.parents:
        return candidate
    if not write:
        shipped = shipped_root()
        if candidate == shipped or shipped in candidate.parents:
            return candidate
    raise AgiasiError(
        f"{what} {value!r} is outside the studio's root ({root}); the studio reads and writes "
        "only there"
    )


def check_model(root: Path, value: str) -> str:
    """A base model: a hub id (``owner/name``, left to the trainer: offline it is refused
    there) or a folder under the root / shipped; returns what to pass to the command."""
    value = value.strip()
    local = (root / value) if not Path(value).is_absolute() else Path(value)
    if HUB_ID.match(value) and not local.exists():
        return value
    return str(resolve(root, value, what="--base-model"))


def check_datasets(root: Path, value: str, what: str) -> str:
    """``a.jsonl,b.parquet`` under the root (or shipped); hub ids (``hf:NAME``) pass through."""
    parts = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith("hf:"):
            parts.append(part)
            continue
        parts.append(str(resolve(root, part, what=what)))
    return ",".join(parts)


def relative(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def for_command(root: Path, path: Path) -> str:
    """How a command run in the root names ``path``: relative inside the root, else absolute."""
    try:
        return relative(root, path)
    except ValueError:
        return str(path)

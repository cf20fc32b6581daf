"""Where benchmark results go: one JSON file per run under benchmarks/results/, stamped with
the date, the machine and the commit of the code that was measured.

The code measured is not always this checkout: an A/B run starts a server from another worktree
(`PYTHONPATH=<worktree>`, or from inside it) or imports another tree's store. So the commit comes
from where the measured code was really loaded: `server_code(pid)` reads which
`pychat/_core*.so` a running server mapped, `imported_code(module)` where a module in this
process came from. The harness (these scripts and the load generator) is recorded apart.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Written by the runs themselves: never a reason to call a tree dirty.
_NOT_CODE = ":(exclude)benchmarks/results"


def _git(tree: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass(frozen=True)
class Code:
    """A source tree as git describes it: the commit it is at and whether it had uncommitted
    changes (outside benchmarks/results/) when it was looked at."""

    tree: str
    commit: str
    dirty: bool
    changed: tuple[str, ...] = ()
    # The compiled extension a server ran (path, build time, and whether any Rust source or
    # Cargo file of the tree is newer than it: then the commit may not be what was compiled).
    extension: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tree": self.tree, "commit": self.commit, "dirty": self.dirty}
        if self.changed:
            out["changed"] = list(self.changed)
        if self.extension:
            out["extension"] = self.extension
        return out


def tree_code(path: Path) -> Code:
    """The git tree holding `path` (a file or directory), its HEAD and its uncommitted changes."""
    start = path if path.is_dir() else path.parent
    top = _git(start, "rev-parse", "--show-toplevel")
    if top is None:  # not in a clone (an installed wheel): no commit to name
        return Code(str(start), "unknown", False)
    tree = Path(top.strip())
    head = (_git(tree, "rev-parse", "--short", "HEAD") or "unknown").strip()
    status = _git(tree, "status", "--porcelain", "--untracked-files=all", "--", ".", _NOT_CODE) or ""
    changed = tuple(line[3:] for line in status.splitlines() if line.strip())
    return Code(str(tree), head, bool(changed), changed[:30])


def _extension(so: Path, tree: Path) -> dict[str, Any]:
    if not so.exists():  # removed (a rebuild) since it was loaded: its build time is unknown
        return {"path": str(so), "replaced_since_loaded": True}
    built = so.stat().st_mtime
    sources = (_git(tree, "ls-files", "-z", "core", "Cargo.toml", "Cargo.lock") or "").split("\0")
    newer = sorted(s for s in sources if s and (tree / s).exists() and (tree / s).stat().st_mtime > built)
    out: dict[str, Any] = {
        "path": str(so),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(built)),
        "older_than_source": bool(newer),
    }
    if newer:
        out["newer_sources"] = newer[:10]
    return out


def _with_extension(so: Path) -> Code:
    code = tree_code(so.parent)
    return Code(code.tree, code.commit, code.dirty, code.changed, _extension(so, Path(code.tree)))


def server_code(pid: int) -> Code:
    """The tree a running pychat server loaded its code from: the directory of the
    `pychat/_core*.so` in its memory map (whatever PYTHONPATH or working directory chose it)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        name = parts[5]
        replaced = name.endswith(" (deleted)")  # rebuilt since the server loaded it
        path = Path(name.removesuffix(" (deleted)"))
        if path.parent.name == "pychat" and path.name.startswith("_core") and path.suffix == ".so":
            code = _with_extension(path)
            if replaced:
                code.extension["replaced_since_loaded"] = True
            return code
    raise RuntimeError(f"process {pid} has no pychat/_core*.so mapped: is it a pychat server?")


def imported_code(module: ModuleType) -> Code:
    """The tree a module of this process was imported from (with the extension this process
    loaded, when it loaded one from that tree)."""
    assert module.__file__ is not None
    path = Path(module.__file__).resolve()
    core = sys.modules.get("pychat._core")
    so = Path(core.__file__).resolve() if core is not None and core.__file__ else None
    if so is not None and so.parent in path.parents:
        return _with_extension(so)
    return tree_code(path)


def one(codes: Iterable[Code]) -> Code:
    """The tree several servers of one run came from (dirty if it was at any point). If they
    came from different trees or commits (the tree moved during the run), all are named,
    joined by " | ", and the run counts as dirty: it did not measure one commit."""
    seen = list(codes)
    if not seen:
        raise ValueError("no code under test was recorded")
    trees = list(dict.fromkeys(c.tree for c in seen))
    commits = list(dict.fromkeys(c.commit for c in seen))
    changed = tuple(dict.fromkeys(p for c in seen for p in c.changed))
    return Code(
        " | ".join(trees),
        " | ".join(commits),
        any(c.dirty for c in seen) or len(trees) > 1 or len(commits) > 1,
        changed[:30],
        seen[0].extension,
    )


def record(name: str, figures: dict[str, Any], measured: Code, out_dir: Path | None = None) -> Path:
    """Writes benchmarks/results/<name>-<time>.json (or into `out_dir`): `commit` and `dirty` are
    those of `measured`, the code under test; `harness` is this checkout (the scripts, the load
    generator)."""
    harness = tree_code(ROOT)
    out = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "commit": measured.commit,
        "dirty": measured.dirty,
        "code_under_test": measured.as_json(),
        "harness": {"tree": harness.tree, "commit": harness.commit, "dirty": harness.dirty},
        **figures,
    }
    path = (out_dir or ROOT / "benchmarks" / "results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path

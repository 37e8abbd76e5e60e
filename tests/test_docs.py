"""The documentation is self-contained: nothing points outside the repository."""

from __future__ import annotations

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Self-contained: no reference to files outside the repository
# ----------------------------------------------------------------------------------------------
def _repository_files() -> list[str]:
    """Tracked and untracked (not ignored) files, as a clone or `tpu_pod.sh sync` would see them."""
    try:
        out = subprocess.run(["git", "-C", REPO, "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True).stdout.decode()
        return sorted(f for f in out.split("\0") if f and os.path.isfile(os.path.join(REPO, f)))
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        found = []
        for d, dirs, files in os.walk(REPO):
            dirs[:] = [x for x in dirs if x not in {".git", ".venv", "__pycache__", "build", "dist"}]
            found += [os.path.relpath(os.path.join(d, f), REPO) for f in files]
        return sorted(found)


def _text(path: str) -> str | None:
    with open(os.path.join(REPO, path), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None  # binary
    return data.decode("utf-8", errors="replace")


_OUTSIDE = re.compile(r"\.\./shared"  # the team's shared folder next to the checkout
                      r"|DESIGN(\.md|\s*§|\b)")  # its brief: DESIGN.md, "DESIGN §2", "the DESIGN names"


def test_no_reference_outside_the_repository():
    """Users clone the repository alone: nothing may point at the team's brief or shared folder; the
    design notes are docs/design.md (lower case, inside the repository)."""
    bad = []
    for path in _repository_files():
        text = _text(path) if path != os.path.relpath(__file__, REPO) else None  # this file names them
        for n, line in enumerate((text or "").splitlines(), 1):
            if _OUTSIDE.search(line):
                bad.append(f"{path}:{n}: {line.strip()}")
    assert not bad, "references outside the repository (the design notes are docs/design.md):\n" + "\n".join(bad)

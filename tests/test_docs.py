"""The documentation: self-contained (nothing points outside the repository), links resolve, and every
command of docs/imagenet.md parses as written.

A real run of the ImageNet page is impossible here (no ImageNet, no accelerator, no network), so each
command is checked as far as it can be without running the job: bash itself splits it into arguments;
`msf_jax.main` commands go through main's own flag parser and config loading; `python -m
msf_jax.convert` through its argument parser; `tfds` through tfds's own parser (`tfds --dry_run`);
launchers run with `--dry-run`; downloads and other programs' commands are checked for what they
produce and consume. A command of an unknown program fails the test, so a new kind needs a rule here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "imagenet.md")


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


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    docs = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                            if f.endswith(".md")]
    assert "docs/design.md" in docs and "docs/imagenet.md" in docs
    bad = []
    for doc in docs:
        text = _text(doc)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else \
                os.path.join(REPO, doc)
            if not os.path.exists(full):
                bad.append(f"{doc}: {target}: no such file")
            elif anchor and full.endswith(".md"):
                with open(full) as f:
                    slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", f.read(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{doc}: {target}: no heading #{anchor}")
    assert not bad, "\n".join(bad)
    # Repository paths named in backticks exist (they go stale when modules move).
    for doc in docs:
        for path in re.findall(r"`((?:msf_jax|configs|launch|benchmarks|tests|docs)/[\w./-]*\w)`", _text(doc)):
            if not os.path.exists(os.path.join(REPO, path)):
                bad.append(f"{doc}: `{path}`: no such file or folder")
    assert not bad, "\n".join(bad)
    readme = _text("README.md")
    assert "(docs/design.md)" in readme and "(docs/imagenet.md)" in readme


# ----------------------------------------------------------------------------------------------
# docs/imagenet.md: every command parses
# ----------------------------------------------------------------------------------------------
def page_commands(path: str = PAGE) -> list[str]:
    """The commands of the page's ```bash blocks: continuation lines joined, comments dropped."""
    with open(path) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _argv(command: str, home: str) -> list[str]:
    """The arguments bash gives the program (quotes, ~ and $HOME expanded), without running it."""
    for bad in ("|", "&&", ";", ">", "<", "`", "$("):
        assert bad not in command, f"keep page commands simple (no {bad!r}): {command}"
    r = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], capture_output=True, text=True,
                       env={"HOME": home, "PATH": os.environ["PATH"]}, check=True)
    return r.stdout.split("\0")[:-1]


_MAIN_PARSER = r"""
import contextlib, io, json, sys
from absl import flags
from msf_jax import main

results = []
for argv in json.load(sys.stdin):
    F = flags.FLAGS
    F.unparse_flags()
    for name in [n for n in F if n.startswith("config.")]:  # the previous command's overrides
        delattr(F, name)
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main._parse_flags(argv)
        c = F.config
        results.append({"ok": True, "mode": F.mode, "stage": c.stage})
    except SystemExit:
        results.append({"ok": False, "error": err.getvalue().strip()})
print("RESULTS" + json.dumps(results))
"""


def parse_main_flags(argvs: list[list[str]]) -> list[dict]:
    """main's flag parser and config loading (configs/*.py plus every override), without running the
    job, for each argv, in one fresh process (absl's flags are global): {"ok", "mode", "stage"} or
    {"ok": False, "error": main's one-line message}."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _MAIN_PARSER], input=json.dumps(argvs), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULTS", 1)[1])


_TFDS_PARSER = r"""
import contextlib, importlib.util, io, json, sys, types

class _Stub(types.ModuleType):  # tfds's command imports these at start-up; parsing never uses them
    def __getattr__(self, name):
        return type(name, (), {})

for name in ("apache_beam", "mlcroissant"):
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = _Stub(name)
from tensorflow_datasets.scripts.cli import main

out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # what `tfds --dry_run true ARGS` parses and prints
            args = main._parse_flags(["tfds", "--dry_run", "true", *argv])
        out.append({"ok": True, "command": type(args.command).__module__.rsplit(".", 1)[-1],
                    "args": repr(args.command)})
    except SystemExit:
        out.append({"ok": False, "error": err.getvalue().strip()})
print("RESULTS" + json.dumps(out))
"""


def parse_tfds(argvs: list[list[str]]) -> list[dict]:
    """tfds's own command-line parser (tensorflow-datasets' `tfds`), for each argv, in one process.
    Apache Beam and mlcroissant, which the `tfds` command imports at start-up, are stubbed when absent."""
    r = subprocess.run([sys.executable, "-c", _TFDS_PARSER], input=json.dumps(argvs), capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULTS", 1)[1])


def _convert_args(argv: list[str], monkeypatch) -> dict:
    """`python -m msf_jax.convert ...` through its own parser; the conversion is replaced by a recorder."""
    import importlib
    import types

    from msf_jax.convert import __main__ as convert_main

    seen = {}

    def fake_module(name):
        def convert_file(inp, out, **kw):
            seen.update(module=name, input=inp, output=out, **kw)
            return "recorded"
        return types.SimpleNamespace(convert_file=convert_file)

    with monkeypatch.context() as m:
        m.setattr(importlib, "import_module", fake_module)
        assert convert_main.main(argv) == 0
    return seen


def _setup_extras() -> set[str]:
    with open(os.path.join(REPO, "setup.py")) as f:
        block = f.read().split("extras_require=", 1)[1]
    return set(re.findall(r'^\s*"(\w+)":', block, re.M))


def _after(argv: list[str], token: str) -> list[str]:
    return argv[argv.index(token) + 1:]


def test_imagenet_page_commands_parse(tmp_path, monkeypatch):
    home = str(tmp_path / "home")
    commands = page_commands()
    assert len(commands) >= 15, commands
    main_argvs, tfds_argvs, converted, consumed, downloads = [], [], [], [], []
    on_workers = set()  # files copied to every TPU worker's ~/msf_jax/ (runs start in ~/msf_jax/code)
    remote = []  # main_argvs that run on the pod
    for command in commands:
        argv = _argv(command, home)
        prog = os.path.basename(argv[0])
        if prog.startswith("python") and argv[1:3] == ["-m", "msf_jax.main"] or prog == "msf-jax":
            main_argvs.append(["msf-jax", *(argv[3:] if prog.startswith("python") else argv[1:])])
        elif prog.startswith("python") and argv[1:3] == ["-m", "msf_jax.convert"]:
            seen = _convert_args(argv[3:], monkeypatch)
            assert seen["module"] == f"msf_jax.convert.{argv[3]}", seen
            assert seen["output"].endswith(".safetensors"), command
            converted.append(seen["output"])
            consumed.append(seen["input"])
        elif prog.startswith("python") and argv[1:3] == ["-m", "venv"]:
            assert len(argv) == 4, command
        elif prog == "pip":
            assert argv[1] == "install", command
            for extra in re.findall(r"^\.\[([\w,]+)\]$", " ".join(a for a in argv if a.startswith(".["))):
                assert set(extra.split(",")) <= _setup_extras(), f"no such extra in setup.py: {command}"
        elif prog == "tfds":
            tfds_argvs.append(argv[1:])
        elif prog == "bash" and argv[1].startswith("launch/"):
            r = subprocess.run(["bash", argv[1], "--dry-run", *argv[2:]], cwd=REPO, capture_output=True,
                               text=True, timeout=60, env=dict(os.environ, HOME=home))
            assert r.returncode == 0, f"{command}\n{r.stderr}"
            if "--" in argv:
                main_argvs.append(["msf-jax", *_after(argv, "--")])
                remote.append(main_argvs[-1])
                assert shlex.quote(_after(argv, "--")[0]) in r.stdout  # the flags reach the workers
        elif prog == "curl":
            dest, url = _after(argv, "-o")[0], argv[-1]
            assert url.startswith("https://") and "-L" in argv, command
            downloads.append(dest)
        elif prog == "mkdir":
            assert argv[1] == "-p", command
        elif prog == "gcloud" and argv[1:3] == ["storage", "cp"]:
            assert len(argv) >= 5, command
            consumed.extend(argv[3:])
        elif prog == "gcloud" and argv[1:5] == ["compute", "tpus", "tpu-vm", "scp"]:
            # tpu_pod.sh's own copy to every worker; the files land next to the runs' code/ folder
            files = [a for a in argv[5:] if not a.startswith("--")]
            assert "--worker=all" in argv and files[-1].endswith(":msf_jax/"), command
            assert all(f in converted for f in files[:-1]), f"copies files no command of the page writes: {command}"
            on_workers.update("../" + os.path.basename(f) for f in files[:-1])
            consumed.extend(files[:-1])
        elif prog == "git":
            assert argv[1] == "clone" and argv[2] == "https://github.com/openai/guided-diffusion", command
        elif prog.startswith("python") and argv[1].endswith("guided-diffusion/evaluations/evaluator.py"):
            # ADM's evaluator: two npz files, the reference batch first.
            assert len(argv) == 4 and argv[2].endswith("VIRTUAL_imagenet256_labeled.npz"), command
            assert argv[3].endswith(".npz"), command
            consumed.extend(argv[2:])
        elif prog.startswith("python") and argv[1:3] == ["-m", "pytest"]:
            # The tests the page cites exist (pytest's -k names).
            test_file = next(a for a in argv if a.startswith("tests/"))
            with open(os.path.join(REPO, test_file)) as f:
                defined = set(re.findall(r"^def (test_\w+)", f.read(), re.M))
            for name in re.findall(r"\w+", _after(argv, "-k")[0]):
                assert name == "or" or any(name in d for d in defined), f"{name}: no such test in {test_file}"
        else:
            pytest.fail(f"no rule for this command of docs/imagenet.md (add one to {__file__}):\n{command}")

    # A typo in a config key must fail the same check (the last argv).
    typo = ["msf-jax", "--mode=train", "--config=configs/msf_256.py", "--workdir=w", "--config.data.cache_dirr=x"]
    *results, typo_result = parse_main_flags(main_argvs + [typo])
    assert not typo_result["ok"] and "cache_dirr" in typo_result["error"], typo_result
    errors = [f"{' '.join(a)}\n  -> {r['error']}" for a, r in zip(main_argvs, results) if not r["ok"]]
    assert not errors, "\n".join(errors)
    modes = [r["mode"] for r in results]
    for mode in ("extract_latents", "train", "sample", "evaluate"):
        assert mode in modes, f"the page has no --mode={mode} command"
    assert {r["stage"] for r in results if r["mode"] == "train"} == {"base", "residual"}
    # Converted weights the jobs read are written by a convert command of the page, and on the pod
    # copied to every worker.
    for argv in main_argvs:
        for arg in argv:
            value = arg.split("=", 1)[-1]
            if value.endswith(".safetensors"):
                have = on_workers if any(argv is r for r in remote) else converted
                assert value in have, f"{value}: not written (or not copied to the workers) by the page"
            consumed.append(value)
    # Every download is used by a later command (the file, or its folder for the VAE).
    for dest in downloads:
        assert any(c == dest or c == os.path.dirname(dest) for c in consumed), f"{dest}: downloaded, never used"

    *tfds, bad = parse_tfds(tfds_argvs + [["build", "imagenet2012", "--file_fmt=array_record"]])
    assert not bad["ok"] and "file_fmt" in bad["error"], bad
    assert all(t["ok"] for t in tfds), tfds
    assert [t["command"] for t in tfds] == ["build", "convert_format"], tfds
    assert "file_format='array_record'" in tfds[0]["args"] and "manual_dir=" in tfds[0]["args"]
    assert "out_file_format='array_record'" in tfds[1]["args"]

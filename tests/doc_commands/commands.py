"""Every shell command of README.md and docs/*.md, parsed into what it runs.

Commands come from ```bash / ```sh / ```console blocks, indented (4-space) blocks, and inline code spans that
start like a command (`python ...`, `torchrun ...`, `bash ...`, `launch/...`, `sbatch ...`).  Each is split
at `&&` / `;`, its leading VAR=value assignments kept apart, and classified; a command this module cannot
classify makes the tests fail, so a new doc command needs a decision here.  Used by
tests/test_cli_doc_commands.py (every recipe command composed through the real schema, the cheap ones run)
and tests/doc_commands/ (every CPU-runnable one run as written: ``bash tests/doc_commands/run.sh``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INLINE = re.compile(r"`((?:python3? |streaming-adapters |torchrun |bash |launch/\S+\.sh |sbatch |tests/\S+\.sh)[^`]*)`")
TEMPLATE = ("RECIPE", "NAME", "...", "[hydra", "[key=value", "[benchmark.")
SHELL = {"mkdir", "eval", "sinfo", "squeue", "cd", "export", "source"}


@dataclass
class Command:
    where: str
    text: str
    kind: str  # recipe | docs | file | template | shell | mention | pip | self | python_code | nemo | module
    argv: list[str] = field(default_factory=list)     # streaming_adapters.run arguments
    env: dict[str, str] = field(default_factory=dict)
    launcher: str = ""             # python | torchrun | launch | sbatch | slurm_test
    nproc: int = 1                 # processes the command starts (all nodes)
    files: list[str] = field(default_factory=list)    # repository files it names
    words: list[str] = field(default_factory=list)    # words the named file must contain (a script's stage)

    @property
    def recipe(self) -> tuple[str, list[str]]:
        """(recipe name, overrides) as streaming_adapters.run composes them."""
        args = list(self.argv)
        plan = bool(args) and args[0] == "plan"
        if plan:
            args = args[1:]
        name = "plan" if plan else None
        if "--config-name" in args:
            i = args.index("--config-name")
            name = args[i + 1]
            del args[i:i + 2]
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        return name, overrides + (["task=plan"] if plan and name == "plan" else
                                  ["dry_run=true"] if plan else [])


def _blocks(lines: list[str]):
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            if m.group(1) in ("bash", "sh", "shell", "console"):
                yield i + 2, lines[i + 1:j]
            i = j + 1
            continue
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            yield i + 1, [ln[4:] for ln in lines[i:j]]
            i = j
            continue
        i += 1


def raw_commands(md: Path) -> list[tuple[str, str]]:
    lines = md.read_text().splitlines()
    out = []
    for start, body in _blocks(lines):
        cur, first = "", None
        for k, ln in enumerate(body):
            s = "" if ln.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", ln).rstrip()
            if not s.strip() and not cur:
                continue
            first = start + k if first is None else first
            if s.endswith("\\"):
                cur += s[:-1].strip() + " "
                continue
            cur += s.strip()
            if cur:
                out.append((f"{md.name}:{first}", cur))
            cur, first = "", None
    for n, ln in enumerate(lines, 1):
        for m in INLINE.finditer(ln):
            out.append((f"{md.name}:{n}", m.group(1)))
    return out


def _split(text: str) -> list[list[str]]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&")
    lex.whitespace_split = True
    parts, cur = [], []
    for tok in lex:
        if tok in (";", "&&"):
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [p for p in parts + [cur] if p]


def _opt(tokens: list[str], *names: str, default=None):
    for i, t in enumerate(tokens):
        for n in names:
            if t == n and i + 1 < len(tokens):
                return tokens[i + 1]
            if t.startswith(n + "="):
                return t.split("=", 1)[1]
    return default


def classify(where: str, text: str) -> list[Command]:
    if re.match(r"^\w+ = \w", text):
        return [Command(where, text, "python_code")]
    out = []
    for tokens in _split(text):
        env = {}
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
            k, v = tokens.pop(0).split("=", 1)
            env[k] = v
        out.append(_one(where, " ".join(tokens), tokens, env))
    return out


def _one(where: str, text: str, t: list[str], env: dict[str, str]) -> Command:
    c = Command(where, text, "unknown", env=env)
    if any(x in text for x in TEMPLATE) or any(re.fullmatch(r"[A-Z]+", x) for x in t):
        c.kind = "template"
        return c
    head = t[0]
    if (head == "torchrun" and "-m" not in t) or (head == "sbatch" and not any(x.endswith(".sbatch") for x in t)):
        c.kind = "mention"  # prose naming a tool or an option (`torchrun --standalone`, `sbatch --wait`)
    elif head in SHELL:
        c.kind = "shell"
    elif head == "pip":
        c.kind = "pip"
    elif head in ("python", "python3") and t[1:2] == ["-c"]:
        c.kind, c.words = "python_code", t[2:3]  # the snippet: compiled by the tests
    elif head in ("python", "python3") and t[1:3] == ["-m", "pytest"]:
        c.kind = "self"
    elif head == "torchrun" and "nemo_automodel" in " ".join(t):
        c.kind, c.files = "nemo", [_opt(t, "-c")]
    elif head == "torchrun" or (head in ("python", "python3") and t[1:3] == ["-m", "streaming_adapters.run"]) \
            or head == "streaming-adapters":
        c.kind = "recipe"
        c.launcher = "torchrun" if head == "torchrun" else "python"
        c.nproc = int(_opt(t, "--nproc-per-node", "--nproc_per_node", default=1))
        c.argv = t[t.index("streaming_adapters.run") + 1:] if "streaming_adapters.run" in t else t[1:]
        if "--docs" in c.argv:  # a generated doc (tests/test_docs.py checks the files are current)
            c.kind, c.words = "docs", [c.argv[c.argv.index("--docs") + 1]]
    elif head in ("python", "python3") and t[1] == "-m":
        c.kind, c.words = "module", [t[2]]
    elif head in ("python", "python3"):
        c.kind, c.files = "file", [t[1]]
    elif head == "launch/torchrun.sh":
        c.kind, c.launcher, c.files = "recipe", "launch", [head]
        rest = t[1:]
        c.nproc = int(_opt(rest, "--nproc", default=1))
        while rest and rest[0].startswith("--"):
            rest = rest[2:] if rest[0] == "--nproc" else rest[1:]
        c.argv = ["--config-name", rest[0], *rest[1:]]
        if "--cpu" in t:
            c.env["SA_CPU"] = "1"
    elif head == "sbatch":
        script = next(x for x in t if x.endswith(".sbatch"))
        rest = t[t.index(script) + 1:]
        c.files = [script]
        if env.get("SA_ENTRY") == "dist_smoke":  # the launcher's stand-in entry point: its own keys
            c.kind, c.words = "file", [k.split("=")[0] for k in rest[1:]]
            c.files.append("tests/slurm/dist_smoke.py")
            return c
        c.kind, c.launcher = "recipe", "sbatch"
        per_node = int(_opt(t, "--ntasks-per-node", default=0)) if "srun" in script else 0
        per_node = per_node or int(env.get("SA_NPROC_PER_NODE", _opt(t, "--gpus-per-node", default=1)))
        c.nproc = int(_opt(t, "--nodes", "-N", default=2)) * per_node
        c.argv = ["--config-name", rest[0], *rest[1:]]
    elif head.endswith("run_slurm_test.sh") and "SA_TEST_RECIPE" in env:
        c.kind, c.launcher, c.files = "recipe", "slurm_test", [head]
        nodes, per = int(env.get("SA_TEST_NODES", 2)), int(env.get("SA_TEST_PROCS_PER_NODE", 2))
        c.nproc = nodes * per
        subst = {"@WORLD@": str(c.nproc), "@NODES@": str(nodes), "@OUT@": "/tmp/sa_doc_out", "@VARIANT@": "srun"}
        overrides = env.get("SA_TEST_OVERRIDES", "")
        for k, v in subst.items():
            overrides = overrides.replace(k, v)
        c.argv = ["--config-name", env["SA_TEST_RECIPE"], *shlex.split(overrides)]
    elif head == "bash" or head.endswith(".sh") or head.endswith(".ci/run"):
        script = t[1] if head == "bash" else head
        c.kind, c.files, c.words = "file", [script], t[2:] if head == "bash" else t[1:]
    return c


def all_commands() -> list[Command]:
    return [c for md in DOCS for where, text in raw_commands(md) for c in classify(where, text)]


def substitute(argv: list[str], checkpoints, tmp) -> list[str]:
    """The documented placeholder folders (/ckpt/..., /lustre/..., /fixtures/...) -> a fabricated checkpoint
    of the family the name says (DeepSeek-V3, else Llama) and scratch output folders under ``tmp``."""
    out = []
    for a in argv:
        key, _, value = a.partition("=")
        if key == "checkpoint.path" and value.startswith("/"):
            a = f"{key}={checkpoints('deepseek_v3' if 'DeepSeek' in value else 'llama', 'fp8_block')}"
        elif key in ("output.path", "report.path") and value.startswith("/"):
            a = f"{key}={tmp / value.strip('/').replace('/', '_')}"
        out.append(a)
    return out

"""The README's walkthrough as data: its commands, run in order, checked against its outputs.

Convention (README.md): a ```bash block right after the line `<!-- walkthrough -->` is part of
the walkthrough. In it, each command (with `\\` continuations) runs in order in bash; `NAME=...`
lines set variables for the commands after them; `# ` lines right after a command are that
command's output, and a ```json block right after the bash block is the output of its last
command. Outputs are JSON and may leave fields out.

Compared: every field the README shows must be in the answer; strings, integers, booleans and
nulls must be equal, floats only of type, except volatile fields (ids, tokens, keys, times) whose
README value is instead remembered and replaced by the real one in the commands that follow (the
README's feedback example quotes the prediction id of the example before it).
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

MARKER = "<!-- walkthrough -->"
VOLATILE = frozenset({"prediction_id", "id", "access_token", "refresh_token", "key", "prefix", "created_at",
                      "author", "feedback_id", "event_times", "updated_at", "last_used_at", "expires_at"})
_ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$", re.DOTALL)


@dataclass
class Step:
    command: str
    expected: str | None  # JSON text, or None: only the exit status and well-formed output count


def _blocks(text: str) -> list[tuple[str, str, int, int]]:
    """(language, body, start, end) of every fenced block, in order."""
    return [(m.group(1), m.group(2), m.start(), m.end())
            for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", text, re.DOTALL | re.MULTILINE)]


def walkthrough(text: str) -> list[Step]:
    steps: list[Step] = []
    blocks = _blocks(text)
    for i, (lang, body, start, end) in enumerate(blocks):
        if lang != "bash" or not text[:start].rstrip().endswith(MARKER):
            continue
        block_steps: list[Step] = []
        lines, k = body.splitlines(), 0
        while k < len(lines):
            line = lines[k]
            if not line.strip() or line.startswith("#"):
                k += 1
                continue
            command = line
            while command.endswith("\\") and k + 1 < len(lines):
                k += 1
                command = command[:-1] + " " + lines[k].strip()
            k += 1
            output = []
            while k < len(lines) and lines[k].startswith("# "):
                output.append(lines[k][2:])
                k += 1
            block_steps.append(Step(command.strip(), "\n".join(output) or None))
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if following and following[0] == "json" and not text[end:following[2]].strip() and block_steps:
            block_steps[-1].expected = following[1]
        steps += block_steps
    return steps


def compare(expected, actual, path: str, seen: dict[str, str]) -> list[str]:
    """Differences between the README's output and the real one (see the module docstring)."""
    key = path.rsplit(".", 1)[-1]
    if key in VOLATILE:
        if isinstance(expected, str) and isinstance(actual, str):
            seen[expected] = actual
        return [] if actual is not None else [f"{path}: missing"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r}"]
        diffs = []
        for k, v in expected.items():
            if k not in actual:
                diffs.append(f"{path}.{k}: missing from the answer")
            else:
                diffs += compare(v, actual[k], f"{path}.{k}", seen)
        return diffs
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {len(expected)} items, got {actual!r}"]
        return [d for n, (e, a) in enumerate(zip(expected, actual)) for d in compare(e, a, f"{path}[{n}]", seen)]
    if isinstance(expected, float):
        return [] if isinstance(actual, (int, float)) and not isinstance(actual, bool) else [
            f"{path}: expected a number, got {actual!r}"]
    return [] if expected == actual and type(expected) is type(actual) else [
        f"{path}: README says {expected!r}, the stack answers {actual!r}"]


def run(steps: list[Step], env: dict[str, str], ports: dict[str, str], cwd,
        placeholders: dict[str, str] | None = None) -> None:
    """Run every step against a stack whose ports are the README's plus an offset; placeholders
    are what the README asks the reader to paste (the admin password `aistack up` printed)."""
    variables: dict[str, str] = {}
    seen: dict[str, str] = dict(placeholders or {})
    for step in steps:
        command = step.command
        for old, new in seen.items():
            command = command.replace(old, new)
        command = re.sub(r"localhost:(\d+)", lambda m: f"localhost:{ports.get(m.group(1), m.group(1))}", command)
        assign = _ASSIGN.match(command)
        script = f'{assign.group(1)}={assign.group(2)}; printf %s "${assign.group(1)}"' if assign else command
        out = subprocess.run(["bash", "-o", "pipefail", "-c", script], check=False, env={**env, **variables}, cwd=cwd,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"README command failed ({out.returncode}): {step.command}\n{out.stderr}"
        if assign:
            variables[assign.group(1)] = out.stdout
            assert out.stdout and out.stdout != "null", f"README command set {assign.group(1)} to nothing: {step.command}"
            continue
        try:
            actual = json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"README command printed no JSON: {step.command}\n{out.stdout[:500]}") from None
        if step.expected is None:
            continue
        expected = json.loads(step.expected)
        diffs = compare(expected, actual, "$", seen)
        assert not diffs, f"README output of `{step.command}` is not what the stack answers:\n" + "\n".join(diffs) \
            + f"\nanswer: {out.stdout[:1500]}"

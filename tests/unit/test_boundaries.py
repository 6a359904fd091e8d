"""Service boundaries: pyproject.toml's import-linter contracts, on this tree and on a tiny tree that
breaks them (so the configuration is known to catch an import of another service's internals)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (the dev extra brings it)")

SERVICES = ("gateway", "auth", "orchestrator", "model", "features", "pipeline")


def _config() -> str:
    """pyproject's [tool.importlinter] as an INI file that lint-imports reads on a tree of our making."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[importlinter]", f"root_package = {cfg['root_package']}",
             f"include_external_packages = {cfg.get('include_external_packages', False)}"]
    for c in cfg["contracts"]:
        lines.append(f"[importlinter:contract:{c['id']}]")
        for key, value in c.items():
            if key != "id":
                lines.append(f"{key} =" + ("".join(f"\n    {v}" for v in value) if isinstance(value, list)
                                           else f" {value}"))
    return "\n".join(lines) + "\n"


def _tree(tmp: Path, extra: dict[str, str]) -> Path:
    files = {f"services/{s}/__init__.py": "" for s in (*SERVICES, "chassis", "demo", "cli")}
    for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]:
        for module in (*c.get("source_modules", ()), *c.get("forbidden_modules", ())):
            if module.startswith("services.") and module.count(".") == 2:  # every module a contract names
                files[module.replace(".", "/") + ".py"] = ""
    files.update({"services/__init__.py": "", "services/model/client.py": "from services.chassis import errors\n",
                  "services/model/service.py": "", "services/features/client.py": "",
                  "services/orchestrator/contract.py": "", "services/chassis/errors.py": "",
                  "services/orchestrator/service.py": "from services.model.client import errors\n"})
    files.update(extra)
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / ".importlinter").write_text(_config())
    return tmp


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_contracts_pass_on_a_tree_that_meets_only_through_contracts(tmp_path):
    out = _lint(_tree(tmp_path, {}))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(("extra", "broken"), [
    ({"services/pipeline/training.py": "import services.model.service\n"}, "services-independent"),
    ({"services/chassis/x.py": "import services.gateway\n"}, "chassis-imports-no-service"),
    ({"services/model/client.py": "import services.model.service\n"}, "model-contract-alone"),
    ({"services/gateway/app.py": "import services.cli\n"}, "services-not-cli"),
])
def test_the_contracts_catch_an_import_of_internals(tmp_path, extra, broken):
    out = _lint(_tree(tmp_path, extra))
    assert out.returncode != 0
    names = {c["id"]: c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())
             ["tool"]["importlinter"]["contracts"]}
    assert f"{names[broken]} BROKEN" in out.stdout


def test_this_trees_model_contract_chassis_and_cli_rules_hold():
    """The rules this tree keeps today (services-independent and contracts-light are the CI step's)."""
    out = subprocess.run([LINT, "--no-cache", "--contract", "model-contract-alone", "--contract",
                          "chassis-imports-no-service", "--contract", "services-not-cli"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]

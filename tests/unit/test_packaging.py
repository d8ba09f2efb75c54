"""Registry / ComfyUI-Manager packaging: pyproject.toml and requirements.txt agree and leave torch to ComfyUI."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO = Path(__file__).resolve().parents[2]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchsde"}  # ComfyUI-Manager never installs these


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _requirements(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dependencies_equal_requirements_txt(pyproject):
    assert sorted(pyproject["project"]["dependencies"]) == sorted(_requirements(REPO / "requirements.txt"))


def test_no_torch_and_only_lower_bounds(pyproject):
    for req in pyproject["project"]["dependencies"] + _requirements(REPO / "requirements-test.txt"):
        assert _name(req) not in TORCH_FAMILY, req
        assert not re.search(r"==|<|~=|!=", req), f"{req}: use >= bounds (ComfyUI-Manager installs line by line)"


def test_registry_metadata(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,99}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"] and (REPO / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "InfinityStar"
    assert "Icon" in comfy
    for path in comfy.get("includes", []):
        assert (REPO / path).exists(), path
    accelerators = [c for c in project["classifiers"] if c.startswith("Environment :: GPU")]
    assert accelerators == ["Environment :: GPU :: NVIDIA CUDA"]


def test_pack_entry_point_is_v3_only():
    """ComfyUI imports the root __init__.py; it exposes comfy_entrypoint and no V1 mappings."""
    source = (REPO / "__init__.py").read_text()
    assert "comfy_entrypoint" in source and "NODE_CLASS_MAPPINGS" not in source


def test_node_list_json_names_every_node_for_the_manager():
    """ComfyUI-Manager finds the pack that provides a workflow's missing nodes by scanning sources for
    NODE_CLASS_MAPPINGS, which a V3 pack has not; it reads node_list.json ({node id: description}) instead. Every
    node id declared in nodes/ must be in it, and nothing else (the in-process host test checks the registry)."""
    import json
    import re

    listed = json.loads((REPO / "node_list.json").read_text())
    declared = {m.group(1): m.group(2) for f in sorted((REPO / "nodes").glob("*.py"))
                for m in re.finditer(r'node_id="([^"]+)",\s*display_name="([^"]+)"', f.read_text())}
    assert len(declared) >= 13 and listed == declared


def test_readme_test_command_is_the_ci_command():
    """.ci/run must run exactly the test command the README documents (and the README must tell to run .ci/run)."""
    ci = (REPO / ".ci" / "run").read_text()
    runs = [line.split("2>&1")[0].strip() for line in ci.splitlines() if "-m pytest" in line]
    assert len(runs) == 1, runs
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = {line.strip() for block in blocks for line in block.splitlines()}
    assert runs[0] in commands and "bash .ci/run" in commands


def test_github_workflows_publish_and_test():
    """The registry publish runs when pyproject.toml changes on main (with the registry token secret), and the
    test workflow runs .ci/run: the same command as our CI."""
    yaml = pytest.importorskip("yaml")  # installed with transformers
    folder = REPO / ".github" / "workflows"
    publish = yaml.safe_load((folder / "publish.yml").read_text())
    on = publish.get("on", publish.get(True))  # YAML 1.1 reads a bare `on` as True
    assert on["push"]["paths"] == ["pyproject.toml"] and on["push"]["branches"] == ["main"]
    steps = [s for job in publish["jobs"].values() for s in job["steps"]]
    action = [s for s in steps if str(s.get("uses", "")).startswith("Comfy-Org/publish-node-action@")]
    assert action and "secrets.REGISTRY_ACCESS_TOKEN" in action[0]["with"]["personal_access_token"]
    tests = yaml.safe_load((folder / "tests.yml").read_text())
    runs = [s.get("run", "") for job in tests["jobs"].values() for s in job["steps"]]
    assert ".ci/run" in runs


def test_the_pack_folder_runs_the_cli_where_dash_m_cannot_find_it(tmp_path):
    """The Windows portable build's Python (a ._pth file: isolated, no current folder on the path) cannot run
    ``-m infinitystar``; ``python <pack folder> ...`` works with it. ``-I`` is the same isolation on any Python."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    isolated = subprocess.run([sys.executable, "-I", "-m", "infinitystar", "--help"], cwd=repo, capture_output=True,
                              text=True, timeout=120)
    assert isolated.returncode != 0 and "No module named infinitystar" in isolated.stderr
    ran = subprocess.run([sys.executable, "-I", str(repo), "tiny", str(tmp_path / "models")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "models" / "infinitystar_videovae.pth").is_file()

"""`difftool plugins new`: write a minimal, working, tested plugin package from a template."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from difftool.errors import DifftoolError
from difftool.files import usual_mode

TEMPLATES = Path(__file__).parent / "templates" / "plugin"
# kind -> what the template registers it with, and how a recipe names it
KINDS = {
    "scheduler": {"hook": "register_schedulers", "noun": "noise scheduler",
                  "description": "DDIM with trailing timestep spacing",
                  "usage": '[noise_scheduler]\nname = "{component}"\n\n[sampling]\nscheduler = "{component}"'},
    "dataset": {"hook": "register_datasets", "noun": "dataset",
                "description": "random colour gradients (a template to replace with real data)",
                "usage": '[dataset]\nname = "{component}"\ncount = 256'},
}
NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def new_plugin(name: str, kind: str, parent: Path) -> Path:
    """Write the package `difftool-{name}` for a `kind` component into `parent`; returns its folder."""
    component = name.removeprefix("difftool-")
    if not NAME.match(component):
        raise DifftoolError(f"plugin name '{name}': use lowercase letters, digits and single hyphens, "
                            "starting with a letter (e.g. 'cosine-ddim')")
    if kind not in KINDS:
        raise DifftoolError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    dist = f"difftool-{component}"
    module = dist.replace("-", "_")
    target = parent / dist
    if target.exists():
        raise DifftoolError(f"{target} already exists; choose another name or --dir")
    values = {"dist": dist, "module": module, "component": component, "component_id": component.replace("-", "_"),
              **{k: v.format(component=component) for k, v in KINDS[kind].items()}}
    files = {
        "common/pyproject.toml.tmpl": "pyproject.toml",
        "common/README.md.tmpl": "README.md",
        "common/__init__.py.tmpl": f"{module}/__init__.py",
        f"{kind}/components.py.tmpl": f"{module}/components.py",
        "common/conftest.py.tmpl": "tests/conftest.py",
        f"{kind}/test.py.tmpl": f"tests/test_{module}.py",
    }
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dist}."))
    usual_mode(staging, 0o777)
    try:
        for template, relative in files.items():
            text = (TEMPLATES / template).read_text()
            for key, value in values.items():
                text = text.replace("{{" + key + "}}", value)
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(text)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

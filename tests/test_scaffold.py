"""`difftool plugins new`: packages that install by entry point and whose own tests pass."""

import os
import subprocess
import sys
import tomllib


def test_new_plugins_are_packages_whose_tests_pass(cli, tmp_path):
    for name, kind in (("cosine-ddim", "scheduler"), ("difftool-colour-ramps", "dataset")):
        code, _, err = cli("plugins", "new", name, "--kind", kind, "--dir", tmp_path)
        assert code == 0, err
    packages = [tmp_path / "difftool-cosine-ddim", tmp_path / "difftool-colour-ramps"]
    project = tomllib.loads((packages[0] / "pyproject.toml").read_text())["project"]
    assert project["name"] == "difftool-cosine-ddim"
    assert project["entry-points"]["difftool"] == {"difftool-cosine-ddim": "difftool_cosine_ddim"}
    assert (packages[1] / "difftool_colour_ramps" / "components.py").is_file()
    # their tests, as an author runs them before installing (the fixture registers in-process)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in packages)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         *(str(p / "tests") for p in packages)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "6 passed" in result.stdout


def test_new_refuses_bad_names_kinds_and_existing_folders(cli, tmp_path):
    code, _, err = cli("plugins", "new", "My_Plugin", "--dir", tmp_path)
    assert code == 1 and "lowercase letters, digits and single hyphens" in err
    code, _, err = cli("plugins", "new", "ok", "--kind", "model", "--dir", tmp_path)
    assert code == 1 and "choose one of scheduler, dataset" in err
    (tmp_path / "difftool-taken").mkdir()
    code, _, err = cli("plugins", "new", "taken", "--dir", tmp_path)
    assert code == 1 and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["difftool-taken"]  # nothing half-written

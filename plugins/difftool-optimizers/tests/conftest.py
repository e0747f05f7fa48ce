from difftool.testing import cli, plugin, tiny_recipe  # noqa: F401 (fixtures)

from difftool.testing import cli, plugin, tiny_recipe, tiny_sd, tiny_sdxl  # noqa: F401 (fixtures)

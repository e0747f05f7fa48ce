"""The plugin manager: in-process plugins, entry points, broken plugins, clashes, the hook contract."""

from importlib import metadata

import pytest

import difftool
from difftool import hookspecs, plugins
from difftool.adapters import Adapter
from difftool.errors import DifftoolError
from difftool.plugins import pm, registry
from difftool.registry import KINDS


class SchedulerPlugin:
    """Adds one scheduler and re-registers a built-in name."""

    __version__ = "1.2.3"

    @difftool.hookimpl
    def register_schedulers(self, register):
        register("ddpm-alias", "diffusers:DDPMScheduler", "DDPM under another name")
        register("ddpm", "diffusers:DDIMScheduler", "a clashing ddpm")


class BrokenPlugin:
    @difftool.hookimpl
    def register_models(self, register):
        raise RuntimeError("this plugin is broken")


def test_hookimpl_is_exported_and_every_kind_has_a_hook():
    assert difftool.hookimpl is hookspecs.hookimpl
    assert {f"register_{kind}" for kind in KINDS} == {
        name for name in dir(hookspecs) if name.startswith("register_")
    }


def test_every_hook_is_documented_in_the_plugin_guide():
    from pathlib import Path

    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith(("register_", "on_"))]
    assert len(hooks) == len(KINDS) + 5
    for hook in hooks:
        assert f"`{hook}`" in guide or f"`{hook}(" in guide


def test_in_process_plugin_registers_and_builtins_keep_their_names(plugin):
    plugin(SchedulerPlugin(), "myplugin")
    assert registry("schedulers").get("ddpm-alias").plugin == "myplugin"
    assert registry("schedulers").get("ddpm").plugin == "difftool"
    assert registry("schedulers").get("myplugin:ddpm").factory == "diffusers:DDIMScheduler"
    clashes = registry("schedulers").clashes()
    assert [[e.plugin for e in c] for c in clashes] == [["difftool", "myplugin"]]
    assert plugins.plugin_version("myplugin") == "1.2.3"


def test_plugin_components_are_gone_after_unregistering(plugin):
    plugin(SchedulerPlugin(), "temporary")
    assert "temporary:ddpm-alias" in registry("schedulers").entries
    pm.unregister(name="temporary")
    assert "temporary:ddpm-alias" not in registry("schedulers").entries
    pm.register(SchedulerPlugin(), name="temporary")  # so the fixture can unregister it


def test_broken_plugin_does_not_break_the_cli(plugin, cli):
    plugin(BrokenPlugin(), "broken")
    code, out, err = cli("list", "models")
    assert code == 0 and "unet2d" in out
    assert "plugin 'broken' failed (register_models): RuntimeError: this plugin is broken" in err
    code, out, err = cli("plugins")
    assert code == 0 and "broken" in out and "this plugin is broken" in err


PLUGIN_MODULE = """
import difftool

@difftool.hookimpl
def register_schedulers(register):
    register("ddpm-alias", "diffusers:DDPMScheduler", "DDPM under another name")
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A real plugin module on sys.path, as an installed plugin package would provide."""
    (tmp_path / "difftool_example_plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "difftool_example_plugin"


def test_entry_points_load_and_failures_are_recorded(monkeypatch, plugin_module):
    good = metadata.EntryPoint("ep-good", plugin_module, "difftool")
    bad = metadata.EntryPoint("ep-bad", "no_such_module_xyz", "difftool")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [good, bad] if group == "difftool" else [])
    failures_before = list(plugins.failures)
    try:
        plugins.load_entry_points()
        assert pm.has_plugin("ep-good") and not pm.has_plugin("ep-bad")
        assert "ep-good:ddpm-alias" in registry("schedulers").entries
        failure = plugins.failures[-1]
        assert (failure.plugin, failure.stage) == ("ep-bad", "import")
        assert "No module named 'no_such_module_xyz'" in failure.error
    finally:
        if pm.has_plugin("ep-good"):
            pm.unregister(name="ep-good")
        plugins.failures[:] = failures_before


def test_load_plugins_env_var_picks_entry_points(monkeypatch, plugin_module):
    good = metadata.EntryPoint("ep-picked", plugin_module, "difftool")
    skipped = metadata.EntryPoint("ep-skipped", "no_such_module_xyz", "difftool")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [good, skipped])
    monkeypatch.setenv("DIFFTOOL_LOAD_PLUGINS", "ep-picked")
    failures_before = list(plugins.failures)
    try:
        plugins.load_entry_points()
        assert pm.has_plugin("ep-picked")
        assert plugins.failures == failures_before  # the broken one was never imported
    finally:
        if pm.has_plugin("ep-picked"):
            pm.unregister(name="ep-picked")


def test_ambiguous_bare_name_fails_only_the_recipe_that_uses_it(plugin, tiny_recipe, cli):
    class Alpha:
        @difftool.hookimpl
        def register_schedulers(self, register):
            register("fancy", "diffusers:DDIMScheduler", "alpha's")

    class Beta:
        @difftool.hookimpl
        def register_schedulers(self, register):
            register("fancy", "diffusers:PNDMScheduler", "beta's")

    plugin(Alpha(), "alpha")
    plugin(Beta(), "beta")
    code, out, err = cli("list", "schedulers")
    assert code == 0 and "alpha:fancy" in out and "beta:fancy" in out
    code, out, err = cli("check", tiny_recipe())
    assert code == 0
    code, out, err = cli("check", tiny_recipe(), "--set", 'sampling.scheduler="fancy"')
    assert code == 1 and "'alpha' and 'beta'" in err and "'alpha:fancy' or 'beta:fancy'" in err
    code, out, err = cli("check", tiny_recipe(), "--set", 'sampling.scheduler="beta:fancy"')
    assert code == 0, err


def test_plugin_components_are_built_with_recipe_keys_and_context(plugin, tiny_recipe):
    from difftool import build
    from difftool import recipe as recipes

    seen = {}

    class Recorder:
        @difftool.hookimpl
        def register_lr_schedules(self, register):
            def factory(optimizer, num_training_steps, gamma: float = 1.0):
                import torch

                seen.update(steps=num_training_steps, gamma=gamma)
                return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)

            register("exp", factory, "exponential decay")

        @difftool.hookimpl
        def register_adapters(self, register):
            def freeze_down_blocks(model, depth: int = 1):
                model.down_blocks.requires_grad_(False)
                seen["depth"] = depth
                return Adapter()  # the defaults save and load the trainable weights

            register("freeze-down", freeze_down_blocks, "freezes the down blocks")
            register("returns-model", lambda model: model, "an adapter written for the old contract")

    plugin(Recorder(), "recorder")
    recipe = recipes.load(tiny_recipe('\n[[adapters]]\nname = "freeze-down"\ndepth = 3\n'),
                          ['lr_schedule={name="exp", gamma=0.5}'])
    model = build.model(recipe)
    build.adapters(recipe, model)
    optimizer = build.optimizer(recipe, model)
    build.lr_schedule(recipe, optimizer, 7)
    assert seen == {"steps": 7, "gamma": 0.5, "depth": 3}
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trainable for p in model.down_blocks.parameters())
    wrong = recipes.load(tiny_recipe('\n[[adapters]]\nname = "returns-model"\n', name="wrong.toml"))
    with pytest.raises(DifftoolError, match="returned UNet2DModel, not a difftool.adapters.Adapter"):
        build.adapters(wrong, build.model(wrong))


def test_list_and_plugins_commands(cli):
    code, out, _ = cli("list")
    assert code == 0 and "schedulers" in out and "attention_processors" in out
    code, out, _ = cli("list", "scheduler")
    assert code == 0 and "dpm-solver++" in out and "difftool" in out
    code, _, err = cli("list", "shedulers")
    assert code == 1 and "did you mean 'schedulers'" in err
    code, out, _ = cli("plugins")
    assert code == 0 and "register_schedulers" in out and difftool.__version__ in out


def test_listing_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from difftool.cli import main\ntry: main(['list', 'schedulers'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")

"""A plugin factory that returns the wrong kind of object is named when it is built, before any
training: the section, the plugin, the component and what it returned."""

import pytest

import difftool
from difftool import contracts
from difftool.adapters import Adapter
from difftool.registry import KINDS

PLUGIN = "bad-plugin"
UPDATE = "update the plugin, or report this to its authors"


class NoStateSchedule:
    """Steps and reports its LR, but cannot be saved in a checkpoint."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


class BadPlugin:
    """One wrongly-typed component of each kind, beside one that keeps its contract."""

    @difftool.hookimpl
    def register_models(self, register):
        register("dict-model", lambda: {"unet": "not a module"})

    @difftool.hookimpl
    def register_schedulers(self, register):
        register("string-scheduler", lambda: "ddpm")

    @difftool.hookimpl
    def register_datasets(self, register):
        register("strings", lambda: ["butterfly-1.png", "butterfly-2.png"])
        register("one-string", lambda: "butterflies/")
        register("path-images", lambda: [{"image": "butterfly-1.png"}])

    @difftool.hookimpl
    def register_optimizers(self, register):
        register("none-optimizer", lambda params: None)

    @difftool.hookimpl
    def register_lr_schedules(self, register):
        register("no-state", lambda optimizer: NoStateSchedule(optimizer))

    @difftool.hookimpl
    def register_attention_processors(self, register):
        register("not-callable", lambda: 42)

    @difftool.hookimpl
    def register_adapters(self, register):
        register("returns-model", lambda model: model)
        register("fine", lambda model: Adapter())

    @difftool.hookimpl
    def register_loss_weightings(self, register):
        register("callable", lambda: lambda times, objective: None)
        register("equal", lambda: None)  # None: equal weights, as the engine allows
        register("number", lambda: 5.0)

    @difftool.hookimpl
    def register_timestep_samplers(self, register):
        register("not-callable", lambda: [0, 1, 2])


@pytest.fixture
def bad(plugin):
    return plugin(BadPlugin(), PLUGIN)


def assert_refused(code, out, err, section, noun, name, returned, promise):
    assert code == 1, out + err
    assert (f"[{section}]: {noun} '{name}' (plugin '{PLUGIN}') returned {returned}, not {promise}" in err
            and UPDATE in err), err
    assert "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize("override, section, noun, name, returned, promise", [
    ('noise_scheduler={name="string-scheduler"}', "noise_scheduler", "scheduler", "string-scheduler",
     "str 'ddpm'", "a diffusers scheduler (with config, set_timesteps and step)"),
    ('sampling.scheduler="string-scheduler"', "sampling", "scheduler", "string-scheduler",
     "str 'ddpm'", "a diffusers scheduler"),
    ('model={name="dict-model"}', "model", "model", "dict-model",
     "dict {'unet': 'not a module'}", "a torch.nn.Module"),
    ('optimizer={name="none-optimizer"}', "optimizer", "optimizer", "none-optimizer",
     "None", "a torch optimizer (with step, zero_grad, state_dict, load_state_dict and param_groups)"),
    ('lr_schedule={name="no-state"}', "lr_schedule", "LR schedule", "no-state",
     "NoStateSchedule", "a torch LR scheduler (with step, state_dict, load_state_dict and get_last_lr): "
                        "it has no state_dict, load_state_dict"),
    ('attention={processor="not-callable"}', "attention", "attention processor", "not-callable",
     "int 42", "an attention processor"),
    ('loss_weighting={name="number"}', "loss_weighting", "loss weighting", "number",
     "float 5.0", "a callable (times, objective) -> weights, or None"),
    ('timestep_sampler={name="not-callable"}', "timestep_sampler", "timestep sampler", "not-callable",
     "list [0, 1, 2]", "a callable (batch_size, num_train_timesteps, device) -> timesteps"),
])
def test_check_and_run_refuse_a_factory_that_breaks_its_contract(bad, cli, tiny_recipe, tmp_path,
                                                                 override, section, noun, name, returned, promise):
    output_dir = tmp_path / "never"
    recipe = tiny_recipe(output_dir=output_dir)
    assert_refused(*cli("check", recipe, "--set", override), section, noun, name, returned, promise)
    assert_refused(*cli("run", recipe, "--set", override), section, noun, name, returned, promise)
    assert not output_dir.exists()


def test_an_adapter_that_returns_the_model(bad, cli, tiny_recipe):
    recipe = tiny_recipe('\n[[adapters]]\nname = "returns-model"\n')
    code, out, err = cli("check", recipe)
    assert_refused(code, out, err, "adapters.0", "adapter", "returns-model", "UNet2DModel", "a difftool.adapters.Adapter")
    code, out, err = cli("check", tiny_recipe('\n[[adapters]]\nname = "fine"\n'))
    assert code == 0, err


@pytest.mark.parametrize("weighting", ["callable", "equal"])
def test_a_callable_loss_weighting_or_none_passes(bad, cli, tiny_recipe, weighting):
    code, out, err = cli("check", tiny_recipe(), "--set", f'loss_weighting={{name="{weighting}"}}')
    assert code == 0, err
    assert f"│ {weighting} " in out


@pytest.mark.parametrize("dataset, message", [
    ("strings", "[dataset] dataset 'strings' (plugin 'bad-plugin') row 0 is str 'butterfly-1.png', not a mapping "
                "with an 'image' column (e.g. {'image': PIL.Image}); " + UPDATE),
    ("one-string", "[dataset]: dataset 'one-string' (plugin 'bad-plugin') returned str 'butterflies/', not a "
                   "map-style dataset (len() and [i] giving rows, e.g. a datasets.Dataset); " + UPDATE),
    ("path-images", "[dataset] dataset 'path-images' (plugin 'bad-plugin') row 0 has image = str "
                    "'butterfly-1.png', not a PIL image (or datasets' {'path': ..., 'bytes': ...}); " + UPDATE),
])
def test_run_refuses_a_dataset_of_the_wrong_rows_before_training(bad, cli, tiny_recipe, tmp_path, dataset, message):
    output_dir = tmp_path / "never"
    recipe = tiny_recipe(output_dir=output_dir)
    override = f'dataset={{name="{dataset}", image_size=32, batch_size=8}}'
    assert cli("check", recipe, "--set", override)[0] == 0  # check does not build the dataset
    code, out, err = cli("run", recipe, "--set", override)
    assert code == 1 and message in err, err
    assert "internal error" not in err and "Traceback" not in err
    assert not output_dir.exists()


def test_every_kind_has_a_contract_and_the_builtins_keep_theirs(cli, tiny_recipe):
    assert set(contracts.CONTRACTS) == set(KINDS)
    code, out, err = cli("check", tiny_recipe('\n[attention]\nprocessor = "default"\n'))
    assert code == 0, err


def test_duck_typed_third_party_objects_pass():
    class Scheduler:
        config = {}

        def set_timesteps(self, n):
            pass

        def step(self, *args):
            pass

    class Rows:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": None}

    for kind, value in [("schedulers", Scheduler()), ("datasets", Rows()), ("datasets", [{"image": 1}]),
                        ("attention_processors", lambda *a, **k: None), ("loss_weightings", None)]:
        contracts.check(kind, value, noun=kind, name="x", plugin="p", where="w")

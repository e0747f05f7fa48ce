"""The registry: lookup, suggestions, clashes, signature checks, building."""

import pytest

from difftool.errors import DifftoolError
from difftool.registry import Entry, Registry


class Built:
    """Stands in for a scheduler or an LR schedule (it keeps both contracts) and records the
    arguments it was built with."""

    config: dict = {}

    def __init__(self, *args):
        self.args = args

    def set_timesteps(self, *args): ...
    def step(self, *args): ...
    def state_dict(self): ...
    def load_state_dict(self, state): ...
    def get_last_lr(self): ...


def factory(beta_start: float = 0.1, beta_end: float = 0.2):
    return Built("built", beta_start, beta_end)


def lr_factory(optimizer, num_training_steps, warmup: int = 0):
    return Built(optimizer, num_training_steps, warmup)


def make(name="ddpm", plugin="difftool", kind="schedulers", fn=factory):
    return Entry(kind, name, fn, f"{name} from {plugin}", plugin)


def test_unknown_name_suggests_close_matches_and_difftool_list():
    registry = Registry("schedulers")
    registry.add(make("ddpm"))
    registry.add(make("ddim"))
    with pytest.raises(DifftoolError) as info:
        registry.get("ddmp")
    assert "unknown scheduler 'ddmp'; did you mean 'ddpm'" in str(info.value)
    assert "difftool list schedulers" in str(info.value)


def test_builtin_keeps_its_name_and_clash_is_recorded():
    registry = Registry("schedulers")
    third_party = make("ddpm", plugin="other")
    registry.add(third_party)
    builtin = make("ddpm")
    registry.add(builtin)
    assert registry.get("ddpm") is builtin
    assert registry.get("other:ddpm") is third_party
    assert registry.get("difftool:ddpm") is builtin
    assert [[e.plugin for e in c] for c in registry.clashes()] == [["difftool", "other"]]
    assert dict(registry.visible()) == {"ddpm": builtin, "other:ddpm": third_party}


def test_ambiguous_name_between_two_plugins_names_both():
    registry = Registry("schedulers")
    registry.add(make("fancy", plugin="alpha"))
    registry.add(make("fancy", plugin="beta"))
    registry.add(make("plain", plugin="alpha"))
    assert registry.get("plain").plugin == "alpha"  # the clash touches only its own name
    with pytest.raises(DifftoolError) as info:
        registry.get("fancy")
    message = str(info.value)
    assert "'alpha'" in message and "'beta'" in message and "'alpha:fancy'" in message
    assert registry.get("beta:fancy").plugin == "beta"


def test_check_rejects_unknown_key_with_suggestion():
    with pytest.raises(DifftoolError) as info:
        make().check(["beta_strat"], "[noise_scheduler]")
    message = str(info.value)
    assert "[noise_scheduler]" in message
    assert "unknown key 'beta_strat'; did you mean 'beta_start'?" in message


def test_check_wants_required_keys_but_not_context():
    entry = make("needs", kind="lr_schedules", fn=lambda optimizer, num_training_steps, warmup: None)
    with pytest.raises(DifftoolError, match="missing required key 'warmup'"):
        entry.check([], "[lr_schedule]")
    entry.check(["warmup"], "[lr_schedule]")
    with pytest.raises(DifftoolError, match="unknown key 'optimizer'"):
        entry.check(["warmup", "optimizer"], "[lr_schedule]")  # context is not the recipe's to set


def test_build_passes_only_the_context_a_factory_accepts():
    assert make().build({"beta_end": 0.5}, "w").args == ("built", 0.1, 0.5)
    entry = make("cos", kind="lr_schedules", fn=lr_factory)
    assert entry.build({"warmup": 3}, "w", optimizer="opt", num_training_steps=10).args == ("opt", 10, 3)
    constant = make("c", kind="lr_schedules", fn=lambda optimizer: Built(optimizer))
    assert constant.build({}, "w", optimizer="opt", num_training_steps=10).args == ("opt",)


def test_build_wraps_factory_errors_in_a_clear_message():
    def broken(size: int = 1):
        raise ValueError("size must be even")

    with pytest.raises(DifftoolError, match=r"\[dataset\]: scheduler 'b' \(plugin 'p'\) could not be built: ValueError: size must be even"):
        make("b", plugin="p", fn=broken).build({}, "[dataset]")


def test_lazy_factory_imports_on_first_use_and_explains_failure():
    lazy = make("d", fn="difftool.builtins.lr_schedules:warmup_cosine")
    assert callable(lazy.load())
    missing = make("m", plugin="ghost", fn="no_such_module_xyz:thing")
    with pytest.raises(DifftoolError, match="plugin 'ghost' points at 'no_such_module_xyz:thing', which cannot be imported"):
        missing.load()

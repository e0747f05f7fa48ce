"""Objectives: flow matching by hand and against diffusers, the timestep samplers in both modes,
the loss weightings, the misfits `difftool check` refuses, flow runs end to end (validation,
exact resume, the saved diffusers pipeline), DDPM named or not, and a plugin objective (EDM)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import difftool
from difftool import build
from difftool import recipe as recipes
from difftool.builtins.objectives import DDPM, FlowMatching
from difftool.engine import train
from difftool.errors import DifftoolError
from difftool.objective import Objective, broadcast
from difftool.plugins import registry
from difftool.testing import TINY_RECIPE
from test_training import assert_identical, read_state

FLOW = '\n[objective]\nname = "flow-matching"\n'
# small and quick: 8 images in batches of 2, one 32 px sample per grid
QUICK = ["dataset.count=8", "dataset.batch_size=2", "sampling.num_images=1", 'run.log_with="none"']


@pytest.fixture
def objective_recipe(tmp_path):
    """The tiny recipe as a flow-matching run whose [noise_scheduler] and [sampling] name no
    scheduler (so the objective's is used), plus extra TOML; returns its path."""

    def write(extra: str = "", output_dir=None, name: str = "flow.toml", objective: str = FLOW):
        text = TINY_RECIPE.format(output_dir=(output_dir or tmp_path / "run").as_posix())
        for named in ('[noise_scheduler]\nname = "ddpm"\n', 'scheduler = "ddim"\n'):
            assert named in text  # what this fixture takes out
        text = text.replace('[noise_scheduler]\nname = "ddpm"\n', "[noise_scheduler]\n")
        path = tmp_path / name
        path.write_text(text.replace('scheduler = "ddim"\n', "") + objective + extra)
        return path

    return write


def one_line(text: str) -> str:
    """A CLI message with rich's line wrapping undone."""
    return " ".join(text.split())


def history(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "history.jsonl").read_text().splitlines()]


def flow_scheduler(shift: float = 1.0, steps: int = 1000):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)


def component(kind: str, name: str, **kwargs):
    return registry(kind).get(name).build(kwargs, "test")


# flow matching by hand


def test_flow_matching_forward_process_target_and_model_time():
    objective = FlowMatching(flow_scheduler())
    assert objective.continuous and objective.prediction_type == "flow" and objective.num_train_timesteps == 1000
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    by_hand = (1 - t.view(-1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1) * noise
    assert torch.allclose(objective.noisy(clean, noise, t), by_hand)
    noisy = objective.noisy(clean, noise, t)
    assert torch.equal(noisy[0], clean[0]) and torch.equal(noisy[3], noise[3])  # t = 0 is data, t = 1 noise
    assert torch.equal(objective.target(clean, noise, t), noise - clean)
    assert torch.equal(objective.model_time(t), t * 1000)
    assert objective.noisy(clean.half(), noise.half(), t).dtype == torch.float16  # in the data's dtype
    assert objective.target(clean.half(), noise.half(), t).dtype == torch.float32

    seen = {}

    def model(sample, timestep, return_dict=True):  # records what compute_loss gives the model
        seen.update(sample=sample, timestep=timestep)
        return (torch.zeros_like(sample),)

    settings = {"loss": "mse", "huber_delta": 1.0}
    loss = objective.compute_loss(model, clean, noise, noisy, t, settings)
    assert torch.equal(seen["sample"], noisy) and torch.equal(seen["timestep"], t * 1000)
    assert torch.isclose(loss, ((noise - clean) ** 2).mean())
    times = objective.times(component("timestep_samplers", "uniform"), 64, "cpu")
    assert times.dtype == torch.float32 and 0 <= times.min() and times.max() <= 1


def test_shift_is_diffusers_flow_match_sigma_shift():
    scheduler = flow_scheduler(shift=3.0)
    objective = FlowMatching(scheduler)
    assert objective.shift == 3.0
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the scheduler's training sigmas before its shift
    assert torch.allclose(objective.shifted(unshifted), scheduler.sigmas, atol=1e-6)
    assert torch.allclose(objective.model_time(objective.shifted(unshifted)), scheduler.timesteps, atol=1e-3)
    drawn = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    shifted = objective.times(lambda batch_size, num_train_timesteps, device: drawn.clone(), 5, "cpu")
    assert torch.allclose(shifted, 3 * drawn / (1 + 2 * drawn))  # the sampled times go through the shift
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:4] > drawn[1:4]).all()  # towards noise
    assert torch.equal(FlowMatching(flow_scheduler()).shifted(drawn), drawn)  # shift 1: as drawn
    fixed = objective.fixed_times(5, torch.Generator().manual_seed(1))  # validation's times are shifted too
    assert torch.allclose(fixed, objective.shifted(torch.rand(5, generator=torch.Generator().manual_seed(1))))


def test_base_image_size_sets_the_shift_and_conflicts_with_an_explicit_one(objective_recipe, cli):
    recipe = recipes.load(objective_recipe('base_image_size = 16\n'))
    noise_scheduler = build.noise_scheduler(recipe)
    objective = build.objective(recipe, noise_scheduler)
    assert objective.shift == 2.0 and noise_scheduler.config.shift == 2.0 and noise_scheduler.shift == 2.0
    assert build.sampling_scheduler(recipe, noise_scheduler).shift == 2.0  # sampling inherits it
    code, _, err = cli("check", objective_recipe('base_image_size = 16\n'), "--set", "noise_scheduler.shift=3.0")
    message = one_line(err)
    assert code == 1 and "[objective] base_image_size = 16" in message and "32 / 16 = 2" in message
    assert "[noise_scheduler] sets shift = 3.0 too; keep one of them" in message
    code, _, err = cli("check", objective_recipe('base_image_size = 0\n'))
    assert code == 1 and "base_image_size = 0 must be a positive number of pixels" in one_line(err)
    code, _, err = cli("check", objective_recipe('base_image_size = 16\n'), "--set", 'noise_scheduler.name="ddpm"')
    assert code == 1 and "DDPMScheduler has no shift; use flow-euler or flow-heun" in one_line(err)


def test_flow_objective_and_flow_euler_sample_the_data_an_exact_model_knows():
    """A model that outputs the objective's exact target for one known image (the ideal model of
    a one-image dataset) makes FlowMatchEulerDiscreteScheduler land on that image: the target's
    sign and the model time are what the scheduler steps by, shift included."""
    scheduler = flow_scheduler(shift=3.0)
    objective = FlowMatching(scheduler)
    image = torch.rand(2, 3, 8, 8) * 2 - 1

    def exact(sample, timestep):
        t = (timestep / objective.num_train_timesteps).float().expand(sample.shape[0])
        noise = (sample - (1 - t.view(-1, 1, 1, 1)) * image) / t.view(-1, 1, 1, 1)
        assert torch.allclose(objective.noisy(image, noise, t), sample, atol=1e-5)
        return objective.target(image, noise, t)

    sample = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps:
        sample = scheduler.step(exact(sample, t), t, sample).prev_sample
    assert torch.allclose(sample, image, atol=1e-4)


# timestep samplers


@pytest.mark.parametrize("name", ["uniform", "logit-normal", "mode", "cosmap"])
def test_every_builtin_sampler_draws_indices_or_continuous_times(name):
    sampler = component("timestep_samplers", name)
    torch.manual_seed(0)
    indices = sampler(4096, 1000, "cpu")
    assert indices.dtype == torch.int64 and indices.shape == (4096,)
    assert indices.min() >= 0 and indices.max() <= 999 and len(indices.unique()) > 100
    times = sampler(4096, None, "cpu")
    assert times.is_floating_point() and times.shape == (4096,)
    assert times.min() >= 0 and times.max() <= 1 and len(times.unique()) > 1000
    assert abs(times.mean() - 0.5) < 0.03  # every built-in density is symmetric about the middle
    assert abs(indices.float().mean() / 1000 - 0.5) < 0.03


def test_sampler_densities_have_their_papers_spreads():
    def spread(name, **kwargs):
        torch.manual_seed(0)
        times = component("timestep_samplers", name, **kwargs)(20000, None, "cpu")
        return times.mean().item(), times.std().item()

    uniform = 1 / math.sqrt(12)
    assert abs(spread("uniform")[1] - uniform) < 0.005
    mean, std = spread("logit-normal")
    assert abs(mean - 0.5) < 0.01 and 0.15 < std < 0.25  # sigmoid(N(0, 1)): std 0.21
    assert spread("logit-normal", std=0.5)[1] < std  # narrower normal, narrower density
    assert spread("logit-normal", mean=1.0)[0] > 0.6  # mean > 0 leans towards noise
    mean, std = spread("mode", scale=0.0)
    assert abs(mean - 0.5) < 0.01 and abs(std - uniform) < 0.005  # scale 0 is uniform
    assert spread("mode", scale=1.29)[1] < uniform - 0.05  # SD3's scale favours the middle
    assert spread("mode", scale=-0.5)[1] > uniform + 0.02  # a negative one the ends
    mean, std = spread("cosmap")
    assert abs(mean - 0.5) < 0.01 and std < uniform - 0.02  # density 4/pi in the middle, 2/pi at the ends
    with pytest.raises(DifftoolError, match="must be within"):
        component("timestep_samplers", "mode", scale=2.0)


# loss weightings


def test_weightings_for_flow_matching():
    objective = FlowMatching(flow_scheduler(steps=100))
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    inner = t.clamp(min=1e-6)
    snr = ((1 - inner) / inner) ** 2
    assert torch.allclose(objective.snr(t), snr)
    min_snr = component("loss_weightings", "min-snr", gamma=5.0)(t, objective)
    assert torch.allclose(min_snr, torch.minimum(snr, torch.tensor(5.0)) * inner**2, atol=1e-6)
    assert torch.allclose(min_snr[[1, 4, 5]], torch.tensor([5 * 0.1**2, 0.1**2, 0.0]))  # gamma t^2, else (1 - t)^2
    sigma_sqrt = component("loss_weightings", "sigma-sqrt")(t, objective)
    assert torch.allclose(sigma_sqrt, t.clamp(min=0.01) ** -2) and sigma_sqrt[0] == 10000  # t >= 1 / 100
    cosmap = component("loss_weightings", "cosmap")(t, objective)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    assert torch.allclose(cosmap[[0, 3, 5]], torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi]))
    assert component("loss_weightings", "none")(t, objective) is None


def test_min_snr_is_finite_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    t = torch.tensor([0, 500, 999])
    epsilon = DDPM(DDPMScheduler(rescale_betas_zero_snr=True))
    velocity = DDPM(DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    assert epsilon.snr(t)[-1] == 0
    weighting = component("loss_weightings", "min-snr", gamma=5.0)
    assert torch.equal(weighting(t, epsilon)[1:], torch.tensor([1.0, 1.0]))  # min(snr, gamma) / snr -> 1, not NaN
    assert weighting(t, velocity)[-1] == 0 and torch.isfinite(weighting(t, velocity)).all()


@pytest.mark.parametrize("weighting", ["sigma-sqrt", "cosmap"])
def test_flow_only_weightings_refuse_ddpm(tiny_recipe, cli, weighting):
    code, _, err = cli("check", tiny_recipe(f'\n[loss_weighting]\nname = "{weighting}"\n'))
    message = one_line(err)
    assert code == 1 and f"[loss_weighting] loss weighting '{weighting}' does not fit objective 'ddpm'" in message
    assert "predicts 'epsilon'" in message and 'name = "flow-matching"' in message


class OldContracts:
    """Components written for the contracts before objectives: a timestep sampler that always
    gives indices, one that needs num_train_timesteps, and a weighting of three arguments."""

    @difftool.hookimpl
    def register_timestep_samplers(self, register):
        register("indices-only", lambda: lambda batch_size, num_train_timesteps, device: torch.randint(
            0, num_train_timesteps or 1000, (batch_size,), device=device), "always int64")
        register("needs-steps", lambda: lambda batch_size, num_train_timesteps, device: torch.randint(
            0, num_train_timesteps, (batch_size,), device=device), "assumes num_train_timesteps")
        register("floats-only", lambda: lambda batch_size, num_train_timesteps, device: torch.rand(
            batch_size, device=device), "always float")

    @difftool.hookimpl
    def register_loss_weightings(self, register):
        register("three-arguments", lambda: lambda timesteps, noise_scheduler, prediction_type: None, "old")


def test_components_of_the_old_contracts_are_refused_by_check(plugin, objective_recipe, tiny_recipe, cli):
    plugin(OldContracts(), "old-contracts")
    code, _, err = cli("check", objective_recipe('\n[timestep_sampler]\nname = "indices-only"\n'))
    message = one_line(err)
    assert code == 1 and "[timestep_sampler] timestep sampler 'indices-only' does not fit objective" in message
    assert "'flow-matching': it gives an int64 tensor, and this objective trains on float t in [0, 1]" in message
    code, _, err = cli("check", objective_recipe('\n[timestep_sampler]\nname = "needs-steps"\n', name="steps.toml"))
    message = one_line(err)
    assert code == 1 and "timestep sampler 'needs-steps' failed on a trial draw (TypeError" in message
    assert "with num_train_timesteps None for a continuous objective" in message
    code, _, err = cli("check", tiny_recipe('\n[timestep_sampler]\nname = "floats-only"\n'))
    message = one_line(err)
    assert code == 1 and "does not fit objective 'ddpm': it gives a float32 tensor" in message
    assert "int64 indices in [0, num_train_timesteps)" in message
    for path in (tiny_recipe('\n[loss_weighting]\nname = "three-arguments"\n', name="w.toml"),
                 objective_recipe('\n[loss_weighting]\nname = "three-arguments"\n', name="flow-w.toml")):
        code, _, err = cli("check", path)
        message = one_line(err)
        assert code == 1 and "[loss_weighting] loss weighting 'three-arguments' failed on a trial batch" in message
        assert "(TypeError" in message and "it is called as (times, objective)" in message


# schedulers


def test_check_refuses_schedulers_that_do_not_fit_the_objective(objective_recipe, tiny_recipe, cli):
    code, _, err = cli("check", tiny_recipe(FLOW))  # the tiny recipe names ddpm and ddim explicitly
    message = one_line(err)
    assert code == 1 and "[noise_scheduler] scheduler 'DDPMScheduler' does not fit objective 'flow-matching'" in message
    assert "use flow-euler or flow-heun" in message
    code, _, err = cli("check", tiny_recipe(), "--set", 'sampling.scheduler="flow-euler"')
    message = one_line(err)
    assert code == 1 and "[sampling] scheduler 'FlowMatchEulerDiscreteScheduler' does not fit objective 'ddpm'" \
        in message
    assert "is a flow-matching scheduler" in message and 'name = "flow-matching"' in message
    code, _, err = cli("check", objective_recipe(), "--set", 'sampling.scheduler="ddim"')
    assert code == 1 and "[sampling] scheduler 'DDIMScheduler' does not fit objective 'flow-matching'" in one_line(err)
    code, out, err = cli("check", objective_recipe(), "--set", 'sampling.scheduler="flow-heun"')
    assert code == 0, err
    # dynamic shifting needs a `mu` per image size at every set_timesteps: training would finish and
    # its first sample grid fail, so check refuses it
    code, _, err = cli("check", objective_recipe(), "--set", "noise_scheduler.use_dynamic_shifting=true")
    message = one_line(err)
    assert code == 1 and "[noise_scheduler] scheduler 'FlowMatchEulerDiscreteScheduler' does not fit" in message
    assert "sets use_dynamic_shifting = true" in message and "base_image_size" in message


def test_flow_matching_gets_flow_euler_when_no_scheduler_is_named(objective_recipe, cli):
    recipe = recipes.load(objective_recipe())
    assert recipe["noise_scheduler"]["name"] == "flow-euler" and recipe["sampling"]["scheduler"] == "flow-euler"
    assert recipe["noise_scheduler"]["num_train_timesteps"] == 100  # its other keys stay
    code, out, err = cli("check", objective_recipe())
    assert code == 0, err
    rows = {line.split()[1]: line.split()[3] for line in out.splitlines() if line.count("│") == 4}
    assert rows["noise_scheduler"] == rows["sampling"] == "flow-euler" and rows["objective"] == "flow-matching"


# runs


def test_flow_run_validates_resumes_exactly_and_saves_a_diffusers_pipeline(objective_recipe, tmp_path):
    """A shifted flow run with logit-normal times and min-snr: validation loss, a checkpoint
    mid-epoch from which a second run ends bit-identical, and a pipeline that plain diffusers
    loads and samples with."""
    extra = ('base_image_size = 16\n[timestep_sampler]\nname = "logit-normal"\n'
             '[loss_weighting]\nname = "min-snr"\n')
    steps = QUICK + ["run.max_steps=4", "run.checkpointing_steps=2", "ema.enabled=true", "ema.decay=0.9",
                     "validation.every_n_steps=2", "validation.fraction=0.25", "validation.num_batches=1"]
    straight = train(recipes.load(objective_recipe(extra, output_dir=tmp_path / "straight"), steps))
    logged = history(straight)
    losses = [e["loss"] for e in logged if "loss" in e]
    validated = [(e["step"], e["val_loss"]) for e in logged if "val_loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) and 0 < v < 10 for v in losses)
    assert [s for s, _ in validated] == [2, 4] and all(math.isfinite(v) and 0 < v < 10 for _, v in validated)

    # 6 training images in batches of 2: step 2 is mid-epoch, step 4 one batch into the second epoch
    halves = tmp_path / "halves"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", halves / "checkpoints" / "checkpoint-2")
    train(recipes.load(objective_recipe(extra, output_dir=halves, name="halves.toml"),
                       steps + ['run.resume_from_checkpoint="latest"']))
    assert_identical(read_state(straight / "checkpoints" / "checkpoint-4"),
                     read_state(halves / "checkpoints" / "checkpoint-4"))
    for folder in ("unet", "unet_raw"):
        assert_identical(load_file(straight / folder / "diffusion_pytorch_model.safetensors"),
                         load_file(halves / folder / "diffusion_pytorch_model.safetensors"), folder)
    assert [e["step"] for e in history(halves) if "loss" in e] == [3, 4]

    from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipeline = DiffusionPipeline.from_pretrained(straight)
    assert isinstance(pipeline, DDPMPipeline) and isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipeline.scheduler.config.shift == 2.0 and pipeline.scheduler.config.num_train_timesteps == 100
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert output.images.shape == (2, 32, 32, 3) and (output.images >= 0).all() and (output.images <= 1).all()
    assert (straight / "samples" / "0001.png").is_file()  # the run sampled with flow-euler as well
    saved = recipes.read(straight / "recipe.toml")
    assert saved["objective"]["name"] == "flow-matching" and saved["noise_scheduler"]["name"] == "flow-euler"


def test_naming_ddpm_trains_the_same_weights_as_the_default(tiny_recipe, tmp_path):
    one = QUICK + ["run.max_steps=2"]
    default = train(recipes.load(tiny_recipe(output_dir=tmp_path / "default"), one))
    named = train(recipes.load(tiny_recipe('\n[objective]\nname = "ddpm"\n', output_dir=tmp_path / "named",
                                           name="named.toml"), one))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert_identical(load_file(default / weights), load_file(named / weights))
    assert recipes.read(default / "recipe.toml")["objective"] == recipes.read(named / "recipe.toml")["objective"]


# a plugin objective


class EDM(Objective):
    """EDM's preconditioning (Karras et al. 2022, table 1), as a plugin writes it.

    A time t in [0, 1] from any timestep sampler is a noise level sigma = exp(P_mean + P_std
    Phi^-1(t)), so the uniform sampler gives EDM's log-normal sigmas. The model F gets c_in x and
    c_noise = ln(sigma) / 4, for x = x0 + sigma noise, and learns (x0 - c_skip x) / c_out, so that
    the denoiser is D = c_skip x + c_out F: what diffusers' EDMEulerScheduler samples with. EDM's
    loss weight, 1 / c_out^2 on D's error, is exactly 1 on F's, so the loss needs no weighting.
    """

    scheduler = "edm-euler"  # a recipe that names no scheduler trains and samples with this one
    continuous = True  # t in [0, 1]
    prediction_type = "edm"  # no built-in weighting has a form for it (min-snr says so)

    def __init__(self, noise_scheduler, p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__(noise_scheduler)
        self.p_mean, self.p_std = p_mean, p_std
        self.sigma_data = noise_scheduler.config.get("sigma_data", 0.5)  # the sampler's, so they agree

    def sigma(self, times):
        return torch.exp(self.p_mean + self.p_std * torch.special.ndtri(times.float().clamp(1e-5, 1 - 1e-5)))

    def scales(self, clean, noise, times):
        """(x, c_in, c_skip, c_out) at `times`, shaped to broadcast over `clean`."""
        sigma = broadcast(self.sigma(times), clean)
        total = sigma**2 + self.sigma_data**2
        x = clean.float() + sigma * noise.float()
        return x, total.rsqrt(), self.sigma_data**2 / total, sigma * self.sigma_data * total.rsqrt()

    def noisy(self, clean, noise, times):
        x, c_in, _, _ = self.scales(clean, noise, times)
        return (c_in * x).to(clean.dtype)

    def target(self, clean, noise, times):
        x, _, c_skip, c_out = self.scales(clean, noise, times)
        return (clean.float() - c_skip * x) / c_out

    def snr(self, times):
        return self.sigma(times) ** -2

    def model_time(self, times):
        return self.sigma(times).log() / 4

    def check_scheduler(self, scheduler, role):
        if not hasattr(scheduler, "precondition_outputs"):
            return "does not sample with EDM's preconditioning; use edm-euler"
        return None


class EDMPlugin:
    """Registers `edm` (and diffusers' EDMEulerScheduler as `edm-euler`), and keeps the model's
    weights at the start and the end of a run."""

    def __init__(self):
        self.weights = {}

    @difftool.hookimpl
    def register_objectives(self, register):
        register("edm", EDM, "EDM preconditioning (Karras et al. 2022)")

    @difftool.hookimpl
    def register_schedulers(self, register):
        register("edm-euler", "diffusers:EDMEulerScheduler", "EDM's Euler sampler")

    @difftool.hookimpl
    def on_train_start(self, state):
        self.weights["start"] = {k: v.clone() for k, v in state.model.state_dict().items()}

    @difftool.hookimpl
    def on_train_end(self, state):
        self.weights["end"] = {k: v.clone() for k, v in state.model.state_dict().items()}


def test_edm_preconditioning_is_diffusers_edm_euler():
    """The plugin's input, noise and output scalings are those EDMEulerScheduler samples with."""
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_data=0.25)
    edm = EDM(scheduler)
    assert edm.sigma_data == 0.25
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(5, 3, 8, 8, generator=generator), torch.randn(5, 3, 8, 8, generator=generator)
    t = torch.tensor([0.001, 0.2, 0.5, 0.8, 0.999])
    sigma = broadcast(edm.sigma(t), clean)
    x = clean + sigma * noise
    assert torch.allclose(edm.noisy(clean, noise, t), scheduler.precondition_inputs(x, sigma), atol=1e-6)
    assert torch.allclose(edm.model_time(t), scheduler.precondition_noise(sigma.flatten()), atol=1e-6)
    assert torch.allclose(scheduler.precondition_outputs(x, edm.target(clean, noise, t), sigma), clean, atol=1e-4)
    assert torch.allclose(edm.sigma(torch.tensor([0.5])), torch.tensor(math.exp(-1.2)))  # the median is exp(P_mean)


def test_hook_register_objectives_adds_edm_and_the_engine_trains_it(plugin, objective_recipe, cli):
    edm = plugin(EDMPlugin(), "edm-plugin")
    path = objective_recipe(objective='\n[objective]\nname = "edm"\np_std = 1.0\n')
    recipe = recipes.load(path, QUICK + ["run.max_steps=2"])
    assert recipe.entries["objective"].plugin == "edm-plugin"
    assert recipe["noise_scheduler"]["name"] == recipe["sampling"]["scheduler"] == "edm-euler"  # EDM.scheduler
    output_dir = train(recipe)
    losses = [e["loss"] for e in history(output_dir) if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) and 0 < v < 10 for v in losses)
    start, end = edm.weights["start"], edm.weights["end"]
    assert all(torch.isfinite(w).all() for w in end.values())
    assert sum(not torch.equal(start[k], end[k]) for k in start) > len(start) // 2  # it trained
    assert (output_dir / "samples" / "0000.png").is_file()  # and sampled with edm-euler
    saved = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EDMEulerScheduler"
    assert recipes.read(output_dir / "recipe.toml")["provenance"]["plugins"]["edm-plugin"] == ""
    code, _, err = cli("check", path, "--set", 'sampling.scheduler="ddim"')
    message = one_line(err)
    assert code == 1 and "[sampling] scheduler 'DDIMScheduler' does not fit objective 'edm': it does not" in message
    code, _, err = cli("check", path, "--set", 'loss_weighting.name="min-snr"')
    message = one_line(err)
    assert code == 1 and "loss weighting 'min-snr' does not fit objective 'edm'" in message
    assert "no form for a model that predicts 'edm'" in message
    code, _, err = cli("check", path, "--set", "objective.p_mena=-1.0")
    assert code == 1 and "unknown key 'p_mena'; did you mean 'p_mean'?" in one_line(err)

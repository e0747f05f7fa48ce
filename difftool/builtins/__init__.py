"""The built-in components, registered through the same hooks as any plugin.

Factories are lazy "module:attr" strings so that listing them imports no torch.
"""

from importlib.util import find_spec

from difftool.hookspecs import hookimpl

SCHEDULERS = {
    "ddpm": ("DDPMScheduler", "DDPM ancestral sampling (Ho et al. 2020); the tutorial's scheduler"),
    "ddim": ("DDIMScheduler", "DDIM, deterministic (eta=0) few-step sampling"),
    "pndm": ("PNDMScheduler", "pseudo numerical methods (PLMS)"),
    "dpm-solver++": ("DPMSolverMultistepScheduler", "DPM-Solver++ multistep, good in 20-25 steps"),
    "dpm-solver-singlestep": ("DPMSolverSinglestepScheduler", "DPM-Solver singlestep"),
    "euler": ("EulerDiscreteScheduler", "Euler (Karras et al. 2022)"),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", "Euler with ancestral noise"),
    "heun": ("HeunDiscreteScheduler", "Heun second-order (2 model calls per step)"),
    "lms": ("LMSDiscreteScheduler", "linear multistep"),
    "kdpm2": ("KDPM2DiscreteScheduler", "DPM-Solver-2 (k-diffusion)"),
    "kdpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", "DPM-Solver-2 with ancestral noise"),
    "unipc": ("UniPCMultistepScheduler", "UniPC multistep predictor-corrector"),
    "deis": ("DEISMultistepScheduler", "DEIS multistep exponential integrator"),
    "sa-solver": ("SASolverScheduler", "SA-Solver stochastic Adams"),
}
FLOW_SCHEDULERS = {
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", "flow matching, Euler steps (SD3's); the default of a flow-matching run"),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", "flow matching, Heun second-order steps (2 model calls per step)"),
}
if find_spec("torchsde") is not None:
    SCHEDULERS["dpm-solver-sde"] = ("DPMSolverSDEScheduler", "DPM-Solver SDE (needs torchsde)")

LR_SCHEDULES = {
    "constant": ("get_constant_schedule", "constant learning rate"),
    "constant-with-warmup": ("get_constant_schedule_with_warmup", "linear warm-up, then constant"),
    "linear": ("get_linear_schedule_with_warmup", "linear warm-up, then linear decay to 0"),
    "cosine": ("get_cosine_schedule_with_warmup", "linear warm-up, then cosine decay (the tutorial's)"),
    "cosine-with-restarts": ("get_cosine_with_hard_restarts_schedule_with_warmup", "warm-up, then cosine with hard restarts"),
    "polynomial": ("get_polynomial_decay_schedule_with_warmup", "warm-up, then polynomial decay to lr_end"),
}


@hookimpl
def register_models(register):
    register("unet2d", "difftool.builtins.models:unet2d", "diffusers UNet2DModel, from keyword arguments or `pretrained` (a local folder)")
    register("dit", "difftool.builtins.dit:dit", "diffusers DiTTransformer2DModel (a transformer on image patches, class-conditional by adaLN-Zero), from keyword arguments or `pretrained`")
    register("stable-diffusion", "difftool.latent:stable_diffusion", "Stable Diffusion 1.x/2.x text-to-image (VAE + CLIP + UNet2DConditionModel) from `pretrained`")
    register("stable-diffusion-xl", "difftool.latent:stable_diffusion_xl", "Stable Diffusion XL text-to-image (VAE + two CLIPs + UNet) from `pretrained`")
    register("stable-diffusion-3", "difftool.latent:stable_diffusion_3", "Stable Diffusion 3 text-to-image (VAE + CLIPs (+ T5) + SD3 transformer, flow matching) from `pretrained`")


@hookimpl
def register_schedulers(register):
    for name, (cls, description) in {**SCHEDULERS, **FLOW_SCHEDULERS}.items():
        register(name, f"diffusers:{cls}", description)


@hookimpl
def register_datasets(register):
    register("huggingface", "difftool.builtins.datasets:huggingface", "a dataset from the Hugging Face Hub or a local dataset script/folder")
    register("imagefolder", "difftool.builtins.datasets:imagefolder", "a local folder of images (datasets' imagefolder)")
    register("folders", "difftool.builtins.datasets:folders", "one class per local folder of images, for class-conditional runs")
    register("synthetic-butterflies", "difftool.builtins.synthetic:synthetic_butterflies", "offline, seeded, generated butterfly-like images")


@hookimpl
def register_lr_schedules(register):
    for name, (function, description) in LR_SCHEDULES.items():
        register(name, f"diffusers.optimization:{function}", description)
    register("warmup-cosine", "difftool.builtins.lr_schedules:warmup_cosine", "LinearLR warm-up then CosineAnnealingLR down to eta_min")


@hookimpl
def register_optimizers(register):
    register("adamw", "torch.optim:AdamW", "AdamW (decoupled weight decay)")
    register("adam", "torch.optim:Adam", "Adam")
    register("sgd", "torch.optim:SGD", "SGD with optional momentum and Nesterov")


@hookimpl
def register_attention_processors(register):
    register("default", "difftool.builtins.attention:default", "what diffusers uses by default: sdpa where torch has it, else vanilla")
    register("sdpa", "diffusers.models.attention_processor:AttnProcessor2_0", "torch scaled_dot_product_attention (fused kernels)")
    register("vanilla", "diffusers.models.attention_processor:AttnProcessor", "explicit softmax(QK^T * scale) V")
    register("sliced", "diffusers.models.attention_processor:SlicedAttnProcessor", "attention in slices of `slice_size` heads, to save memory")


@hookimpl
def register_loss_weightings(register):
    register("none", "difftool.builtins.objectives:no_weighting", "every sample weighs the same")
    register("min-snr", "difftool.builtins.objectives:min_snr", "Min-SNR-gamma weighting (Hang et al. 2023), for every built-in objective")
    register("sigma-sqrt", "difftool.builtins.objectives:sigma_sqrt", "1 / t^2 (SD3's sigma_sqrt), flow matching only")
    register("cosmap", "difftool.builtins.objectives:cosmap_weighting", "2 / (pi (1 - 2t + 2t^2)) (SD3's cosmap), flow matching only")


@hookimpl
def register_timestep_samplers(register):
    register("uniform", "difftool.builtins.objectives:uniform", "timesteps uniform over the training range (the tutorial's)")
    register("logit-normal", "difftool.builtins.objectives:logit_normal", "timesteps from a logit-normal (mean, std), favouring the middle (SD3's default)")
    register("mode", "difftool.builtins.objectives:mode", "SD3's mode density with heavy tails (scale; 0 is uniform)")
    register("cosmap", "difftool.builtins.objectives:cosmap", "SD3's CosMap density")


@hookimpl
def register_objectives(register):
    register("ddpm", "difftool.builtins.objectives:ddpm", "DDPM: noise by the scheduler's betas, predict epsilon/v/sample (the tutorial's)")
    register("flow-matching", "difftool.builtins.objectives:flow_matching", "rectified flow (SD3): x_t = (1-t) x_0 + t noise, predict noise - x_0")


@hookimpl
def register_metrics(register):
    register("swd", "difftool.builtins.swd:swd", "sliced Wasserstein distance of Laplacian-pyramid patches (Karras et al. 2018), x1e3; offline, no network")
    register("fid", "difftool.builtins.inception:fid", "Frechet Inception distance (torchmetrics, Inception-v3 pool features of the FID network)")
    register("kid", "difftool.builtins.inception:kid", "kernel Inception distance (torchmetrics, unbiased; mean and std over subsets)")
    register("clip-score", "difftool.builtins.clip_score:clip_score", "CLIP score of images against their prompts (torchmetrics; CLIP from a local folder)")

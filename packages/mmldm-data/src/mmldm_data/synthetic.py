"""Synthetic sounding videos with exactly known audio-video correspondence.

Two class sets (``SyntheticConfig.classes``):

- ``colour_pitch`` (the default): each class is a coloured shape with its own sound, a distinct hue
  in the video and a distinct pitch and timbre in the audio;
- ``shape_timbre``: every class has the same colour and a sound in the same pitch range (drawn per
  clip); the classes differ only by the object's shape and by the sound's spectral envelope (voiced
  vowels, a bell, a snare, a chord, a hiss), closer to real data, where pitch and colour rarely
  name the class.

In both, the object bounces on a floor with a constant period (elastic, ballistic arcs) while
drifting sideways between silent walls; every floor impact starts the class's short sound at
exactly the impact time. Learning can therefore be checked without any pretrained network:

- ``class_oracles(classes)`` recover the class from decoded pixels / samples: by hue and pitch
  (``video_class_oracle`` / ``audio_class_oracle``) or by silhouette and spectral envelope
  (``shape_class_oracle`` / ``timbre_class_oracle``),
- ``impact_frames_oracle`` / ``onset_times_oracle`` recover the events that must coincide.

The oracles read only decoded media (they never see metadata), so they can judge generated samples
(a2v / v2a class accuracy, onset-to-impact error) the same way as real clips.

Clip timing: frame k shows the scene at time k / fps. Impacts are kept at least 1.5 frames away
from both ends of a clip, so every impact inside it is visible as a local minimum of height and
every onset has its rise inside the audio; the bounce period is short enough that every window of
16 frames at 10 fps holds at least one impact.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import label, map_coordinates, maximum_filter1d
from scipy.signal import fftconvolve
from tqdm import tqdm

from .media import write_video

GENERATOR_TAG = "mmldm_data.synthetic"

# Class = (name, shape, RGB colour, fundamental Hz, harmonic amplitudes, decay s). Hues sit 60
# degrees apart and fundamentals about 0.7 octave apart (no integer ratios between them).
_CLASSES = (
    ("red_circle", "circle", (220, 40, 40), 160.0, (1.0, 0.5, 0.25), 0.12),
    ("green_square", "square", (40, 200, 60), 260.0, (1.0, 0.0, 0.33, 0.0, 0.2), 0.09),
    ("blue_triangle", "triangle", (50, 70, 235), 420.0, (1.0, 0.15), 0.15),
    ("yellow_diamond", "diamond", (225, 215, 40), 680.0, (1.0, 0.7, 0.5, 0.35, 0.25), 0.07),
    ("magenta_cross", "cross", (215, 45, 215), 1100.0, (1.0, 0.0, 0.0, 0.5), 0.10),
    ("cyan_ring", "ring", (40, 210, 215), 1780.0, (1.0, 0.3), 0.06),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, *_ in _CLASSES)

# Shape/timbre set: class = (name, shape, sound). One saturated colour for all (the object is still
# found by its chroma; the colour oracle reads it as red for every class), and sounds whose
# fundamental is drawn per clip from one shared octave, so neither hue nor pitch names the class.
_TIMBRE_CLASSES = (
    ("circle_ah", "circle", "ah"),
    ("square_ee", "square", "ee"),
    ("triangle_bell", "triangle", "bell"),
    ("diamond_snare", "diamond", "snare"),
    ("cross_chord", "cross", "chord"),
    ("ring_hiss", "ring", "hiss"),
)
_TIMBRE_COLOUR = (230, 100, 40)
_TIMBRE_F0_HZ = (140.0, 280.0)
COLOUR_PITCH, SHAPE_TIMBRE = "colour_pitch", "shape_timbre"
CLASS_SETS = {
    COLOUR_PITCH: CLASS_NAMES,
    SHAPE_TIMBRE: tuple(name for name, *_ in _TIMBRE_CLASSES),
}

_FLOOR_TOP = 0.88  # floor surface, as a fraction of the frame height from the top
_APEX_HEIGHT = (0.35, 0.55)  # bounce height above the floor contact, fraction of the frame
_SIDE_SPEED = (0.15, 0.4)  # sideways drift, frame widths per second
_LOUDNESS = (0.35, 0.6)  # peak amplitude of an impact's tone burst
_ATTACK_SECONDS = 0.003
_EDGE_CLEARANCE_FRAMES = 1.5  # impacts stay this far from the first and last frame
# Pixels count as the object when their chroma (max - min over RGB) exceeds this; background,
# floor and letterbox padding are grey (chroma 0), the objects have chroma > 150.
_CHROMA_THRESHOLD = 60.0


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 6
    resolution: int = 64
    fps: float = 10.0
    duration: float = 3.2  # seconds: 32 frames, i.e. 17 windows of 16 frames
    sample_rate: int = 44100
    min_bounce_period: float = 0.6  # seconds between floor impacts, drawn per clip
    max_bounce_period: float = 1.1  # below ~1.6 s every 16-frame window at 10 fps holds an impact
    object_radius: float = 0.12  # half the object's height, fraction of the frame
    classes: str = COLOUR_PITCH  # class set: colour_pitch or shape_timbre (module docstring)

    def __post_init__(self) -> None:
        problems = []
        if self.classes not in CLASS_SETS:
            problems.append(f"classes must be one of {', '.join(CLASS_SETS)}, got {self.classes!r}")
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            problems.append(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {self.num_classes}")
        if self.resolution < 16:
            problems.append(f"resolution must be >= 16 pixels, got {self.resolution}")
        if self.fps <= 0 or self.sample_rate <= 0:
            problems.append(f"fps and sample_rate must be positive, got {self.fps} and {self.sample_rate}")
        if self.num_frames < 2 * _EDGE_CLEARANCE_FRAMES + 2:
            problems.append(
                f"duration {self.duration} s gives {self.num_frames} frames at {self.fps} fps; "
                "need at least 5"
            )
        if not 0 < self.min_bounce_period <= self.max_bounce_period:
            problems.append(
                "need 0 < min_bounce_period <= max_bounce_period, "
                f"got {self.min_bounce_period}, {self.max_bounce_period}"
            )
        if not 0.02 <= self.object_radius <= 0.2:
            problems.append(f"object_radius must be in [0.02, 0.2], got {self.object_radius}")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    @property
    def num_frames(self) -> int:
        return round(self.duration * self.fps)

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_SETS[self.classes][: self.num_classes]

    @property
    def num_samples(self) -> int:
        return round(self.duration * self.sample_rate)


@dataclass
class SyntheticClip:
    class_id: int
    frames: np.ndarray  # uint8 [T, R, R, 3]
    audio: np.ndarray  # float32 [N]
    impact_frames: list[int]  # frame nearest to each floor impact inside the clip
    onset_times: list[float]  # seconds; the same impacts, as sound onsets


@dataclass(frozen=True)
class _Motion:
    period: float  # seconds between impacts
    first_impact: float  # seconds, any impact time (the others are +- multiples of the period)
    apex_height: float  # fraction of the frame
    start_x: float  # object centre at t = 0, fraction of the frame width
    side_speed: float  # frame widths per second, signed
    loudness: float


# ---------------------------------------------------------------- rendering


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (negative inside) from offsets to the shape's centre; y points down.

    Every shape spans exactly [-radius, radius] vertically, so its bottom touches the floor at an
    impact. Half-plane intersections give exact distances inside and close ones outside, which is
    all antialiasing needs.
    """
    ax, ay = np.abs(x), np.abs(y)

    def box(half_width: float, half_height: float) -> np.ndarray:
        qx, qy = ax - half_width, ay - half_height
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)

    if shape == "circle":
        return np.hypot(x, y) - radius
    if shape == "square":
        return box(radius, radius)
    if shape == "diamond":
        return (ax + ay - radius) / np.sqrt(2)
    if shape == "triangle":  # apex up at (0, -r), base from (-r, r) to (r, r)
        slanted = (2 * ax - (y + radius)) / np.sqrt(5)
        return np.maximum(slanted, y - radius)
    if shape == "cross":
        return np.minimum(box(radius, 0.35 * radius), box(0.35 * radius, radius))
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.8 * radius) - 0.2 * radius
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=8)
def _background(resolution: int) -> np.ndarray:
    """Grey backdrop [R, R, 3] float: a soft vertical gradient, a faint texture, a lighter floor."""
    v, u = np.meshgrid(
        (np.arange(resolution) + 0.5) / resolution, (np.arange(resolution) + 0.5) / resolution, indexing="ij"
    )
    wall = 44 + 26 * v + 3 * np.sin(2 * np.pi * 6 * u) * np.sin(2 * np.pi * 6 * v)
    floor = 120 + 4 * np.sin(2 * np.pi * 16 * u)
    grey = np.where(v >= _FLOOR_TOP, floor, wall)
    return np.repeat(grey[..., None], 3, axis=-1)


def _impact_times(motion: _Motion, start: float, stop: float) -> np.ndarray:
    """All impact times t with start <= t < stop."""
    first = np.ceil((start - motion.first_impact) / motion.period)
    last = np.ceil((stop - motion.first_impact) / motion.period)
    return motion.first_impact + motion.period * np.arange(first, last)


def _draw_motion(rng: np.random.Generator, cfg: SyntheticConfig) -> _Motion:
    """Random bounce whose impacts keep clear of the clip's first and last frames."""
    clearance = _EDGE_CLEARANCE_FRAMES / cfg.fps
    forbidden = (
        (-clearance, clearance),
        (cfg.duration - 1 / cfg.fps - clearance, cfg.duration + 0.5 / cfg.fps),
    )
    for _ in range(1000):
        period = rng.uniform(cfg.min_bounce_period, cfg.max_bounce_period)
        motion = _Motion(
            period=period,
            first_impact=rng.uniform(0, period),
            apex_height=rng.uniform(*_APEX_HEIGHT),
            start_x=rng.uniform(cfg.object_radius, 1 - cfg.object_radius),
            side_speed=rng.uniform(*_SIDE_SPEED) * rng.choice((-1.0, 1.0)),
            loudness=rng.uniform(*_LOUDNESS),
        )
        if not any(len(_impact_times(motion, lo, hi)) for lo, hi in forbidden):
            return motion
    raise ValueError(
        f"cannot place impacts away from the clip ends with {cfg}; "
        "use a longer duration or other bounce periods"
    )


def _object_centres(motion: _Motion, times: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) of the object at each time, fractions of the frame; y points down."""
    phase = np.mod(times - motion.first_impact, motion.period) / motion.period  # 0 at impact
    height = motion.apex_height * (1 - (2 * phase - 1) ** 2)  # parabolic flight between impacts
    # Sideways drift reflected by the walls: a triangle wave over the free span.
    span = 1 - 2 * radius
    travelled = np.mod(motion.start_x - radius + motion.side_speed * times, 2 * span)
    x = radius + np.where(travelled <= span, travelled, 2 * span - travelled)
    return x, _FLOOR_TOP - radius - height


def _look(class_id: int, classes: str) -> tuple[str, tuple[int, int, int]]:
    """(shape, RGB colour) of a class of a class set."""
    if classes == SHAPE_TIMBRE:
        return _TIMBRE_CLASSES[class_id][1], _TIMBRE_COLOUR
    _, shape, colour, *_ = _CLASSES[class_id]
    return shape, colour


def _render_frames(class_id: int, motion: _Motion, cfg: SyntheticConfig) -> np.ndarray:
    """uint8 [T, R, R, 3], antialiased through the shape's signed distance."""
    shape, colour = _look(class_id, cfg.classes)
    resolution = cfg.resolution
    centre_x, centre_y = _object_centres(motion, np.arange(cfg.num_frames) / cfg.fps, cfg.object_radius)
    pixel = (np.arange(resolution) + 0.5) / resolution
    offset_x = pixel[None, None, :] - centre_x[:, None, None]  # [T, 1, R]
    offset_y = pixel[None, :, None] - centre_y[:, None, None]  # [T, R, 1]
    offset_x, offset_y = np.broadcast_arrays(offset_x, offset_y)
    distance = _signed_distance(shape, offset_x, offset_y, cfg.object_radius)
    coverage = np.clip(0.5 - distance * resolution, 0.0, 1.0)[..., None]  # [T, R, R, 1]
    frames = _background(resolution) * (1 - coverage) + np.asarray(colour, np.float64) * coverage
    return np.round(frames).astype(np.uint8)


@lru_cache(maxsize=32)
def _tone_burst(class_id: int, sample_rate: int) -> np.ndarray:
    """The class's impact sound at unit peak: a harmonic tone with a fast attack and an exponential decay."""
    _, _, _, fundamental, harmonics, decay = _CLASSES[class_id]
    t = np.arange(round(6 * decay * sample_rate)) / sample_rate
    partials = np.arange(1, len(harmonics) + 1)[:, None]
    tone = np.asarray(harmonics) @ np.sin(2 * np.pi * fundamental * partials * t)
    burst = tone * (1 - np.exp(-t / _ATTACK_SECONDS)) * np.exp(-t / decay)
    return burst / np.abs(burst).max()


def _resonances(freqs: np.ndarray, peaks: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """Gain at `freqs` (Hz) of resonance peaks (centre Hz, bandwidth Hz, gain): a spectral envelope."""
    return sum(gain / (1 + ((freqs - centre) / width) ** 2) for centre, width, gain in peaks)


def _harmonic_tone(
    t: np.ndarray, fundamental: float, envelope: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """A sawtooth-like harmonic tone (partial n at 1/n) shaped by `envelope` (gain per Hz), up to 8 kHz."""
    partials = np.arange(1, int(8000 // fundamental) + 1)
    gains = envelope(partials * fundamental) / partials
    return gains @ np.sin(2 * np.pi * fundamental * partials[:, None] * t)


def _shaped_noise(
    rng: np.random.Generator, t: np.ndarray, envelope: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """White noise filtered to `envelope` (gain per Hz), at unit peak."""
    spectrum = np.fft.rfft(rng.standard_normal(len(t)))
    noise = np.fft.irfft(spectrum * envelope(np.fft.rfftfreq(len(t), t[1] - t[0])), len(t))
    return noise / np.abs(noise).max()


# Per sound: decay (s); the vowels' formants (Hz, bandwidth, gain).
_TIMBRE_DECAY = {"ah": 0.12, "ee": 0.12, "bell": 0.15, "snare": 0.06, "chord": 0.13, "hiss": 0.07}
_RESONANCES = {
    "ah": ((730.0, 90.0, 1.0), (1090.0, 110.0, 0.6), (2440.0, 170.0, 0.3)),
    "ee": ((270.0, 60.0, 1.0), (2290.0, 150.0, 0.6), (3010.0, 200.0, 0.4)),
}
# Bell: partials of a free bar (ratio to the fundamental, gain, decay scale), brightest around 2-4 kHz.
_BELL_PARTIALS = (
    (1.0, 0.05, 1.0),
    (2.76, 0.1, 0.9),
    (5.40, 0.3, 0.8),
    (8.93, 1.0, 0.7),
    (13.34, 0.9, 0.6),
    (18.64, 0.6, 0.5),
)


def _timbre_burst(
    class_id: int, fundamental: float, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """The shape/timbre class's impact sound at unit peak, on `fundamental` Hz; noise drawn from `rng`.

    Voiced vowels (harmonics through formants), a bell (inharmonic partials of a free bar, the
    higher ones decaying faster), a snare (high-passed noise over a short body tone), a mellow major
    chord, and a hiss (noise through high resonances): broadband sounds told apart by their spectral
    envelope, not by their fundamental.
    """
    sound = _TIMBRE_CLASSES[class_id][2]
    decay = _TIMBRE_DECAY[sound]
    t = np.arange(round(6 * decay * sample_rate)) / sample_rate
    if sound in ("ah", "ee"):
        tone = _harmonic_tone(t, fundamental, lambda hz: _resonances(hz, _RESONANCES[sound]))
    elif sound == "bell":
        tone = sum(
            gain * np.sin(2 * np.pi * fundamental * ratio * t) * np.exp(-t / (decay * scale))
            for ratio, gain, scale in _BELL_PARTIALS
        )
    elif sound == "snare":
        tone = _shaped_noise(rng, t, lambda hz: np.clip(hz / 1000, 0, 1) * (hz < 12000))
        tone = tone + 0.1 * np.sin(2 * np.pi * fundamental * t) * np.exp(-t / 0.03)
    elif sound == "chord":
        tone = sum(_harmonic_tone(t, fundamental * r, lambda hz: np.exp(-hz / 600)) for r in (1, 1.25, 1.5))
    else:  # hiss: noise between steep skirts at 4 and 10 kHz
        tone = _shaped_noise(rng, t, lambda hz: 1 / (1 + (4000 / np.maximum(hz, 1)) ** 4 + (hz / 10000) ** 4))
    burst = tone * (1 - np.exp(-t / _ATTACK_SECONDS)) * np.exp(-t / decay)
    return burst / np.abs(burst).max()


def _render_audio(burst: np.ndarray, motion: _Motion, cfg: SyntheticConfig) -> np.ndarray:
    """float32 [N]: `burst` starting at every impact, including the tails of earlier ones."""
    preroll = len(burst)
    impulses = np.zeros(preroll + cfg.num_samples)
    starts = np.round(
        _impact_times(motion, -preroll / cfg.sample_rate, cfg.duration) * cfg.sample_rate
    ).astype(int)
    impulses[starts + preroll] = motion.loudness
    return fftconvolve(impulses, burst)[preroll : preroll + cfg.num_samples].astype(np.float32)


def render_clip(class_id: int, seed: int, cfg: SyntheticConfig | None = None) -> SyntheticClip:
    """One clip of class ``class_id``; identical for identical (class_id, seed, cfg)."""
    cfg = cfg or SyntheticConfig()
    if not 0 <= class_id < cfg.num_classes:
        raise ValueError(f"class_id must be in 0..{cfg.num_classes - 1}, got {class_id}")
    rng = np.random.default_rng([seed, class_id])
    motion = _draw_motion(rng, cfg)
    if cfg.classes == SHAPE_TIMBRE:  # drawn after the motion: the same seed bounces the same way in both sets
        burst = _timbre_burst(class_id, rng.uniform(*_TIMBRE_F0_HZ), rng, cfg.sample_rate)
    else:
        burst = _tone_burst(class_id, cfg.sample_rate)
    onsets = _impact_times(motion, 0.0, cfg.duration)
    return SyntheticClip(
        class_id=class_id,
        frames=_render_frames(class_id, motion, cfg),
        audio=_render_audio(burst, motion, cfg),
        impact_frames=[round(t * cfg.fps) for t in onsets],
        onset_times=[float(t) for t in onsets],
    )


def write_synthetic_dataset(
    out_dir: str | Path, num_clips: int, seed: int, cfg: SyntheticConfig | None = None, progress: bool = True
) -> dict:
    """Write ``num_clips`` mp4 clips as ``out_dir/<class_name>/<class_name>_<index>.mp4``, classes
    balanced (clip i has class i mod num_classes), plus ``out_dir/metadata.json`` listing the class
    set (``config.classes``) and every clip's class, impact frames and onset times. Returns a summary dict.
    """
    cfg = cfg or SyntheticConfig()
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    out_dir = Path(out_dir)
    began = time.perf_counter()
    clips = []
    for index in tqdm(range(num_clips), desc="synthetic clips", file=sys.stderr, disable=not progress):
        class_id = index % cfg.num_classes
        clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        clip = render_clip(class_id, clip_seed, cfg)
        name = cfg.class_names[class_id]
        relative = Path(name) / f"{name}_{index:05d}.mp4"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / relative, clip.frames, cfg.fps, clip.audio, cfg.sample_rate)
        clips.append(
            {
                "path": relative.as_posix(),
                "class_id": class_id,
                "class_name": name,
                "seed": clip_seed,
                "impact_frames": clip.impact_frames,
                "onset_times": clip.onset_times,
            }
        )
    metadata = {
        "generator": GENERATOR_TAG,
        "seed": seed,
        "config": asdict(cfg),
        "class_names": list(cfg.class_names),
        "clips": clips,
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return {
        "out_dir": str(out_dir),
        "num_clips": num_clips,
        "num_classes": cfg.num_classes,
        "total_seconds": num_clips * cfg.duration,
        "wall_seconds": time.perf_counter() - began,
    }


def synthetic_class_set(root: str | Path) -> str | None:
    """The class set of a folder written by `write_synthetic_dataset` (from its metadata.json), None
    for any other folder. Folders written before there was a choice hold the colour/pitch set."""
    try:
        metadata = json.loads((Path(root) / "metadata.json").read_text())
        if metadata.get("generator") != GENERATOR_TAG:
            return None
        classes = metadata["config"].get("classes", COLOUR_PITCH)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return classes if classes in CLASS_SETS else None


def oracle_class_set(root: str | Path) -> str:
    """The class set whose oracles read clips like those of `root`: the folder's own, else colour/pitch
    (the only set before there was a choice; for other folders, the set the oracles assume)."""
    return synthetic_class_set(root) or COLOUR_PITCH


# ---------------------------------------------------------------- oracles


def _object_weights(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel object evidence [T, H, W] (0..1, from chroma) and the frames as float [T, H, W, 3]."""
    rgb = np.asarray(frames, np.float32)
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {rgb.shape}")
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    return np.clip((chroma - _CHROMA_THRESHOLD) / _CHROMA_THRESHOLD, 0.0, 1.0), rgb


def _hue_vector(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] -> [..., 2]: the colour's direction in the chroma plane (its hue as a 2-D vector)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([2 * r - g - b, np.sqrt(3) * (g - b)], axis=-1)


def _hue_angle(vector: np.ndarray) -> np.ndarray:
    return np.arctan2(vector[..., 1], vector[..., 0])


_CLASS_HUES = _hue_angle(_hue_vector(np.array([colour for _, _, colour, *_ in _CLASSES], np.float32)))


def video_class_oracle(frames: np.ndarray) -> int:
    """Class whose colour is closest in hue to the clip's coloured pixels; -1 when there are none."""
    weights, rgb = _object_weights(frames)
    if weights.sum() < 1.0:
        return -1
    hue = _hue_angle(np.einsum("thw,thwc->c", weights, _hue_vector(rgb)))
    hue_gap = np.angle(np.exp(1j * (hue - _CLASS_HUES)))  # wrapped to (-pi, pi]
    return int(np.argmin(np.abs(hue_gap)))


# Shape: the object's silhouette over its bounding box and a margin, sampled on a grid, against every
# shape's (the margin makes the square, which fills its box, more than a constant).
_SHAPE_GRID = 16
_SHAPE_SPAN = 1.25  # the grid's half side, in half sides of the bounding box
_MIN_OBJECT_PIXELS = 6  # a smaller blob is too few pixels to have a shape


@lru_cache(maxsize=1)
def _shape_templates() -> np.ndarray:
    """[classes, G * G] each shape/timbre class's coverage of [-S, S]^2 (its bounding box is [-1, 1]^2)
    at the centres of a G x G grid (each cell 8 x 8 supersampled), less its mean and at unit norm."""
    fine = (((np.arange(8 * _SHAPE_GRID) + 0.5) / (4 * _SHAPE_GRID)) - 1) * _SHAPE_SPAN
    x, y = np.meshgrid(fine, fine)
    templates = []
    for _, shape, _ in _TIMBRE_CLASSES:
        inside = (_signed_distance(shape, x, y, 1.0) <= 0).astype(np.float64)
        coverage = inside.reshape(_SHAPE_GRID, 8, _SHAPE_GRID, 8).mean(axis=(1, 3)).ravel()
        templates.append(coverage - coverage.mean())
    templates = np.stack(templates)
    return templates / np.linalg.norm(templates, axis=1, keepdims=True)


def _silhouette(weights: np.ndarray) -> np.ndarray | None:
    """[G * G] one frame's object evidence [H, W] sampled on a grid over the bounding box of its largest
    blob (and the margin), less its mean and at unit norm; None without an object. Stray specks never
    set the box."""
    blobs, count = label(weights >= 0.5)
    if count == 0:
        return None
    sizes = np.bincount(blobs.ravel())[1:]
    if sizes.max() < _MIN_OBJECT_PIXELS:
        return None
    rows, cols = np.nonzero(blobs == 1 + np.argmax(sizes))
    # Every shape fills a square box: its larger side is the size, even where an edge is faint.
    half = (max(rows.max() - rows.min(), cols.max() - cols.min()) + 1) / 2
    offsets = ((np.arange(_SHAPE_GRID) + 0.5) / _SHAPE_GRID * 2 - 1) * half * _SHAPE_SPAN
    grid_rows, grid_cols = np.meshgrid(
        (rows.min() + rows.max()) / 2 + offsets, (cols.min() + cols.max()) / 2 + offsets, indexing="ij"
    )
    sampled = map_coordinates(weights, [grid_rows.ravel(), grid_cols.ravel()], order=1, cval=0.0)
    sampled = sampled - sampled.mean()
    norm = np.linalg.norm(sampled)
    return sampled / norm if norm > 0 else None


def shape_class_oracle(frames: np.ndarray) -> int:
    """Shape/timbre class whose shape best matches the object's silhouette, summed over the frames
    (whatever its colour, size or position); -1 when no frame shows an object."""
    weights, _ = _object_weights(frames)
    votes = np.zeros(len(_TIMBRE_CLASSES))
    seen = False
    for frame in weights:
        silhouette = _silhouette(frame)
        if silhouette is not None:
            votes += _shape_templates() @ silhouette
            seen = True
    return int(np.argmax(votes)) if seen else -1


def class_oracles(classes: str) -> tuple[Callable[[np.ndarray], int], Callable[[np.ndarray, int], int]]:
    """(video oracle (frames), audio oracle (audio, sample_rate)) reading the classes of a class set."""
    if classes not in CLASS_SETS:
        raise ValueError(f"classes must be one of {', '.join(CLASS_SETS)}, got {classes!r}")
    if classes == SHAPE_TIMBRE:
        return shape_class_oracle, timbre_class_oracle
    return video_class_oracle, audio_class_oracle


def object_centres_oracle(frames: np.ndarray) -> np.ndarray:
    """The object's weighted centroid (x, y) per frame [T, 2], fractions of the frame (y points down);
    NaN in frames without a coloured object."""
    weights, _ = _object_weights(frames)
    height, width = weights.shape[1:]
    mass = weights.sum(axis=(1, 2))  # [T]
    rows, columns = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = np.stack(
            [np.einsum("thw,w->t", weights, columns) / mass, np.einsum("thw,h->t", weights, rows) / mass],
            axis=1,
        )
    return np.where((mass > 1.0)[:, None], centres, np.nan)


def impact_frames_oracle(frames: np.ndarray) -> list[int]:
    """Frames where the object is at a lowest point near the floor (a local maximum of its row).

    Works from the object's weighted centroid row, so it is indifferent to resolution, letterbox
    padding and mild noise. Impacts in the first and last frame are not reported (no neighbour).
    """
    depth = object_centres_oracle(frames)[:, 1]  # [T], down is larger
    if np.isnan(depth).all():
        return []
    lowest, highest = np.nanmax(depth), np.nanmin(depth)
    if lowest - highest < 0.05:  # the object hardly moves vertically: no bounce to see
        return []
    near_floor = depth >= highest + 0.5 * (lowest - highest)
    previous, current, following = depth[:-2], depth[1:-1], depth[2:]
    is_lowest = (current > previous) & (current >= following) & near_floor[1:-1]
    return [int(k) + 1 for k in np.flatnonzero(is_lowest)]


# Audio analysis grid: quarter-tone bands over the classes' partials.
_BAND_RANGE_HZ = (100.0, 11000.0)
_BANDS_PER_OCTAVE = 24


def _band_energies(
    audio: np.ndarray,
    sample_rate: int,
    bands_per_octave: int = _BANDS_PER_OCTAVE,
    range_db: float | None = None,
) -> np.ndarray:
    """Log energy per band (quarter-tone by default) of the clip's loud parts, standardised to zero
    mean, unit std; with `range_db`, bands quieter than the loudest by more are raised to that level."""
    audio = np.asarray(audio, np.float64).reshape(-1)
    n_fft = 1 << int(np.ceil(np.log2(0.18 * sample_rate)))  # ~5 Hz bins: resolves the lowest class
    hop = n_fft // 4
    if len(audio) < n_fft:
        audio = np.pad(audio, (0, n_fft - len(audio)))
    windows = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(windows, axis=-1)) ** 2  # [frames, bins]
    frame_energy = power.sum(axis=-1)
    loud = frame_energy >= 0.01 * frame_energy.max()  # within 20 dB of the loudest window
    spectrum = power[loud].mean(axis=0)
    bin_hz = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    top = min(_BAND_RANGE_HZ[1], 0.45 * sample_rate)
    centres = _BAND_RANGE_HZ[0] * 2.0 ** (
        np.arange(int(bands_per_octave * np.log2(top / _BAND_RANGE_HZ[0]))) / bands_per_octave
    )
    # Triangular filters on a log-frequency axis, each spanning its two neighbours' centres.
    octaves = np.log2(np.maximum(bin_hz, 1.0) / _BAND_RANGE_HZ[0])[None, :]
    positions = np.log2(centres / _BAND_RANGE_HZ[0])[:, None]
    filters = np.clip(1 - np.abs(octaves - positions) * bands_per_octave, 0.0, None)  # [bands, bins]
    filters /= np.maximum(filters.sum(axis=1, keepdims=True), 1e-12)
    log_energy = np.log10(filters @ spectrum + 1e-12 * spectrum.max() + 1e-20)
    if range_db is not None:
        log_energy = np.maximum(log_energy, log_energy.max() - range_db / 10)
    return (log_energy - log_energy.mean()) / (log_energy.std() + 1e-12)


@lru_cache(maxsize=8)
def _class_templates(sample_rate: int) -> np.ndarray:
    """[classes, bands] band energies of each class's clean tone burst."""
    return np.stack([_band_energies(_tone_burst(c, sample_rate), sample_rate) for c in range(len(_CLASSES))])


def audio_class_oracle(audio: np.ndarray, sample_rate: int) -> int:
    """Class whose tone (pitch and harmonics) best correlates with the clip's spectrum; -1 if silent."""
    if not np.any(np.abs(np.asarray(audio)) > 1e-4):
        return -1
    correlation = _class_templates(sample_rate) @ _band_energies(audio, sample_rate)
    return int(np.argmax(correlation))


# Timbre: third-octave bands smooth over the harmonics of the shared pitch range; templates at
# several fundamentals across it cover how each envelope moves with pitch. Bands more than 60 dB
# below the loudest count as that level: what lies under a noise floor is no part of a timbre.
_TIMBRE_BANDS_PER_OCTAVE = 3
_TIMBRE_RANGE_DB = 60.0
_TIMBRE_TEMPLATE_PITCHES = 8


def _timbre_energies(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """[bands] the timbre oracle's view of a sound: third-octave log energies over 60 dB."""
    return _band_energies(audio, sample_rate, _TIMBRE_BANDS_PER_OCTAVE, _TIMBRE_RANGE_DB)


@lru_cache(maxsize=8)
def _timbre_templates(sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Third-octave band energies of each shape/timbre class's burst at fundamentals spread over the
    shared range: ([classes, pitches, bands] less their mean and at unit norm, that mean [bands]).
    Without the mean, what every sound shares (the overall tilt) would dominate each correlation.
    Each burst sits in 0.2 s of silence, so the analysis windows meet its onset at every phase, as
    in a clip (at the very start of a signal it would lie under the first window's taper)."""
    energies = np.stack(
        [
            [
                _timbre_energies(
                    np.pad(
                        _timbre_burst(c, f0, np.random.default_rng([c, k]), sample_rate),
                        round(0.2 * sample_rate),
                    ),
                    sample_rate,
                )
                for k, f0 in enumerate(np.geomspace(*_TIMBRE_F0_HZ, _TIMBRE_TEMPLATE_PITCHES))
            ]
            for c in range(len(_TIMBRE_CLASSES))
        ]
    )
    mean = energies.mean(axis=(0, 1))
    centred = energies - mean
    return centred / np.linalg.norm(centred, axis=-1, keepdims=True), mean


def timbre_class_oracle(audio: np.ndarray, sample_rate: int) -> int:
    """Shape/timbre class whose sound's spectral envelope (at any pitch of the shared range) best
    correlates with the clip's; -1 if silent."""
    if not np.any(np.abs(np.asarray(audio)) > 1e-4):
        return -1
    templates, mean = _timbre_templates(sample_rate)
    centred = _timbre_energies(audio, sample_rate) - mean
    correlation = templates @ (centred / (np.linalg.norm(centred) + 1e-12))  # [classes, pitches]
    return int(np.argmax(correlation.max(axis=1)))


_ENVELOPE_HOP_SECONDS = 0.01
_RISE_FRAMES = 3  # an onset is a rise of at least _RISE_DB within this many hops
_RISE_DB = 10.0
_ONSET_FLOOR_DB = 30.0  # onsets must reach within this of the clip's loudest moment
_MIN_ONSET_GAP_SECONDS = 0.2


def onset_times_oracle(audio: np.ndarray, sample_rate: int) -> list[float]:
    """Times (s) where the sound level jumps up sharply: the starts of impact tone bursts.

    The level is an RMS envelope in dB on a 10 ms grid; an onset is the steepest point of a rise of
    at least 10 dB over 30 ms that reaches within 30 dB of the loudest moment, with at most one
    onset per 0.2 s. Onsets within the first 30 ms cannot be seen.
    """
    audio = np.asarray(audio, np.float64).reshape(-1)
    hop = max(1, round(_ENVELOPE_HOP_SECONDS * sample_rate))
    if len(audio) < 2 * hop * (_RISE_FRAMES + 1):
        return []
    windows = np.lib.stride_tricks.sliding_window_view(audio, 2 * hop)[::hop]  # [frames, 2 hop]
    level = 20 * np.log10(np.sqrt((windows**2).mean(axis=-1)) + 1e-5)
    rise = np.full_like(level, -np.inf)
    rise[_RISE_FRAMES:] = level[_RISE_FRAMES:] - level[:-_RISE_FRAMES]
    steepest_nearby = maximum_filter1d(
        rise, size=2 * round(_MIN_ONSET_GAP_SECONDS / _ENVELOPE_HOP_SECONDS) + 1
    )
    is_onset = (rise >= _RISE_DB) & (rise == steepest_nearby) & (level >= level.max() - _ONSET_FLOOR_DB)
    # Window k is centred on sample (k + 1) * hop; the rise it ends began about half the rise span earlier.
    onset_hops = np.flatnonzero(is_onset) + 1 - _RISE_FRAMES / 2
    return [float(t) for t in onset_hops * hop / sample_rate]

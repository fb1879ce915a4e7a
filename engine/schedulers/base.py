"""The interface every sampler implements, and the noise-schedule maths they share.

A scheduler is a stateless object built from a checkpoint's ``scheduler/scheduler_config.json``
dict. ``start()`` returns an immutable state; ``step()`` maps (state, model output, sample) to
(previous sample, new state) without touching its inputs, so a denoising loop is a fold over
``state.timesteps`` and any intermediate state can be kept or replayed.

The maths follows diffusers, including its float32 dtype choices, so that a sampler here and its
diffusers counterpart agree to float32 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, TypeVar, runtime_checkable

import numpy as np

from sdrt.engine.array_namespace import is_host_array
from sdrt.engine.checks import is_finite_number, is_int

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# diffusers' betas_for_alpha_bar caps each cosine-schedule beta so no alpha reaches 0.
_COSINE_MAX_BETA = 0.999


class SchedulerConfigError(ValueError):
    """A scheduler config dict holds a value this engine cannot run (bad type, range or choice)."""


@runtime_checkable
class SchedulerState(Protocol):
    """What every scheduler state exposes: the U-Net timesteps of the run, in call order, and the scale of the
    initial noise (it depends on the planned run for sigma-based samplers).

    Timesteps are int64, or float32 for samplers that visit fractional timesteps as diffusers does (Euler, LMS).
    """

    @property
    def timesteps(self) -> np.ndarray:  # (num_calls,) int64 or float32
        ...

    @property
    def init_noise_sigma(self) -> float:
        ...


StateT = TypeVar("StateT", bound=SchedulerState)


@runtime_checkable
class Scheduler(Protocol[StateT]):
    """A sampler over explicit, immutable state.

    Text to image::

        state = scheduler.start(num_inference_steps)
        latents = noise * state.init_noise_sigma
        for i, t in enumerate(state.timesteps):
            model_output = unet(scheduler.scale_model_input(state, latents, i), t)
            step_noise = rng.standard_normal(latents.shape) if scheduler.needs_noise else None
            latents, state = scheduler.step(state, model_output, i, latents, step_noise)

    Image to image starts part-way (diffusers' `timesteps[t_start * order:]` with `set_begin_index`)::

        state = scheduler.start(num_inference_steps, begin_index=t_start * scheduler.order)
        latents = scheduler.add_noise(state, image_latents, noise, 0)
    """

    num_train_timesteps: int
    #: the fewest and the most steps ``start`` plans for this checkpoint's noise schedule (every count between runs)
    min_inference_steps: int
    max_inference_steps: int
    #: diffusers' `scheduler.order`: U-Net calls per step for multi-call solvers (Heun), 1 for the others
    order: int
    #: True for stochastic samplers (ancestral): `step()` needs fresh standard-normal noise shaped like the sample,
    #: which the caller draws from the request's seed so results are reproducible
    needs_noise: bool

    def start(self, num_inference_steps: int, begin_index: int = 0) -> StateT:
        """Plan a run of ``num_inference_steps`` steps, from call ``begin_index`` of the full run on (as diffusers
        runs after ``set_begin_index``); raises ValueError if out of range."""
        ...

    def scale_model_input(self, state: StateT, sample: np.ndarray, step_index: int) -> np.ndarray:
        """The U-Net input for call ``step_index`` given the current sample."""
        ...

    def add_noise(self, state: StateT, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` noised to the level of U-Net call ``step_index``'s input, as diffusers' ``add_noise`` does at
        ``timesteps[step_index]`` (image to image, and inpainting's blend of the known region)."""
        ...

    def step(
        self, state: StateT, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, StateT]:
        """Apply U-Net call ``step_index``'s output; returns (prev_sample, new_state), never mutating ``state``.
        ``noise`` is required when ``needs_noise`` and ignored otherwise."""
        ...


def add_noise_at_alpha_prod(original: np.ndarray, noise: np.ndarray, alpha_prod: np.float32) -> np.ndarray:
    """The forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps at alpha-bar ``a``, in float32 as diffusers'
    DDPM-family ``add_noise`` computes it."""
    alpha_prod = np.float32(alpha_prod)
    sqrt_alpha_prod = alpha_prod ** np.float32(0.5)
    sqrt_one_minus_alpha_prod = (np.float32(1) - alpha_prod) ** np.float32(0.5)
    return (sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise).astype(np.float32)  # like original


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The config fields shared by diffusers' discrete-time schedulers (defaults are diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], defaults: NoiseScheduleConfig | None = None) -> NoiseScheduleConfig:
        """Read the shared fields from a scheduler_config.json dict; unknown keys are ignored.

        ``defaults`` holds the values of absent keys: diffusers' defaults differ per class (Euler, LMS and
        DPM-Solver space timesteps with "linspace", PNDM and DDIM with "leading").
        """
        defaults = cls() if defaults is None else defaults
        num_train_timesteps = read_int(config, "num_train_timesteps", defaults.num_train_timesteps, minimum=1)
        trained_betas = _read_trained_betas(config, num_train_timesteps)
        return cls(
            num_train_timesteps=num_train_timesteps,
            beta_start=read_float(config, "beta_start", defaults.beta_start),
            beta_end=read_float(config, "beta_end", defaults.beta_end),
            beta_schedule=read_choice(config, "beta_schedule", defaults.beta_schedule, BETA_SCHEDULES),
            trained_betas=trained_betas,
            prediction_type=read_choice(config, "prediction_type", defaults.prediction_type, PREDICTION_TYPES),
            timestep_spacing=read_choice(config, "timestep_spacing", defaults.timestep_spacing, TIMESTEP_SPACINGS),
            steps_offset=read_int(config, "steps_offset", defaults.steps_offset, minimum=0),
        )


# --- reading config values ---------------------------------------------------------------------


def read_int(config: Mapping[str, Any], key: str, default: int, minimum: int | None = None) -> int:
    """``config[key]`` as an int (``default`` when absent); SchedulerConfigError if not an int >= minimum."""
    value = config.get(key, default)
    if not is_int(value):
        raise SchedulerConfigError(f"scheduler config {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SchedulerConfigError(f"scheduler config {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def read_float(config: Mapping[str, Any], key: str, default: float) -> float:
    """``config[key]`` as a finite float (``default`` when absent); SchedulerConfigError otherwise."""
    value = config.get(key, default)
    if not is_finite_number(value):
        raise SchedulerConfigError(f"scheduler config {key!r} must be a finite number, got {value!r}")
    return float(value)


def read_bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """``config[key]`` as a bool (``default`` when absent); SchedulerConfigError if not a JSON boolean."""
    value = config.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise SchedulerConfigError(f"scheduler config {key!r} must be true or false, got {value!r}")
    return bool(value)


def read_optional_float(config: Mapping[str, Any], key: str) -> float | None:
    """``config[key]`` as a finite positive float, or None when absent or JSON null; SchedulerConfigError otherwise."""
    value = config.get(key)
    if value is None:
        return None
    if not is_finite_number(value) or value <= 0:
        raise SchedulerConfigError(f"scheduler config {key!r} must be a positive number or null, got {value!r}")
    return float(value)


def refuse_unsupported(config: Mapping[str, Any], class_name: str, supported: Mapping[str, tuple[Any, ...]]) -> None:
    """SchedulerConfigError if a key of ``supported`` is present with a value outside its tuple: diffusers options
    this engine does not implement (thresholding, zero-SNR rescaling, ...), refused rather than silently ignored."""
    for key, values in supported.items():
        if key in config and not any(config[key] == value and type(config[key]) is type(value) for value in values):
            allowed = ", ".join(repr(value) for value in values)
            raise SchedulerConfigError(
                f"scheduler config {key!r} = {config[key]!r} is not supported by {class_name} here (supported: {allowed})"
            )


def check_step_index(num_calls: int, step_index: int) -> None:
    """ValueError unless ``step_index`` names one of a run's ``num_calls`` U-Net calls."""
    if not 0 <= step_index < num_calls:
        raise ValueError(f"step_index must be in 0..{num_calls - 1} for this run, got {step_index!r}")


def read_only(array: np.ndarray) -> np.ndarray:
    """``array``, made read-only so a state can hold it without copies being taken defensively (host arrays: device
    arrays have no such flag, and a device loop's states are its own)."""
    if is_host_array(array):
        array.setflags(write=False)
    return array


def read_choice(config: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """``config[key]`` as one of ``choices`` (``default`` when absent); SchedulerConfigError otherwise."""
    value = config.get(key, default)
    if value not in choices:
        raise SchedulerConfigError(f"scheduler config {key!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _read_trained_betas(config: Mapping[str, Any], num_train_timesteps: int) -> tuple[float, ...] | None:
    """Explicit betas, one per training timestep, or None (JSON null or absent) to use beta_schedule."""
    value = config.get("trained_betas")
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)):
        raise SchedulerConfigError(f"scheduler config 'trained_betas' must be a list of numbers, got {value!r}")
    try:
        betas = tuple(float(beta) for beta in value)
    except (TypeError, ValueError) as error:
        raise SchedulerConfigError(f"scheduler config 'trained_betas' must be a list of numbers: {error}") from None
    # diffusers would silently index past (or short of) a mismatched list; refuse it instead.
    if len(betas) != num_train_timesteps:
        raise SchedulerConfigError(
            f"scheduler config 'trained_betas' has {len(betas)} values but num_train_timesteps is {num_train_timesteps}"
        )
    return betas


# --- noise schedule ----------------------------------------------------------------------------


def betas_from_config(config: NoiseScheduleConfig | Mapping[str, Any]) -> np.ndarray:
    """The training noise schedule beta_t, t = 0..num_train_timesteps-1, as diffusers builds it (float32).

    Raises SchedulerConfigError unless every beta lies in [0, 1), i.e. every alpha is positive.
    """
    if not isinstance(config, NoiseScheduleConfig):
        config = NoiseScheduleConfig.from_dict(config)
    num = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)  # (T,)
    elif config.beta_schedule == "linear":
        betas = linspace_float32(config.beta_start, config.beta_end, num)  # (T,)
    elif config.beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta); squared in float32 like diffusers.
        sqrt_betas = linspace_float32(config.beta_start**0.5, config.beta_end**0.5, num)  # (T,)
        betas = np.square(sqrt_betas)  # (T,)
    else:
        betas = cosine_betas(num)  # (T,)
    if not np.all((betas >= 0.0) & (betas < 1.0)):
        raise SchedulerConfigError("scheduler config gives betas outside [0, 1); every alpha must be positive")
    return betas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s) as float32, rounded as torch.cumprod rounds it on CPU.

    torch accumulates a float32 cumprod in float64 and rounds each partial product to float32; a
    plain float32 cumprod drifts from it by several ulps over 1000 steps.
    """
    alphas = np.float32(1.0) - np.asarray(betas, dtype=np.float32)  # (T,) float32, as torch's 1.0 - betas
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)  # (T,)


def alphas_cumprod(config: NoiseScheduleConfig | Mapping[str, Any]) -> np.ndarray:
    """alpha-bar_t for every training timestep of ``config`` (float32)."""
    return alphas_cumprod_from_betas(betas_from_config(config))


def linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` as computed by torch's CPU kernel.

    torch works in float32: step = (end - start) / (num - 1); the first half of the points walks up
    from ``start``, the second half walks back from ``end``, and each point is one fused
    multiply-add in its AVX2/AVX-512 kernels. The product of two float32 values is exact in
    float64, so one float64 add and one rounding to float32 reproduce that fused multiply-add.
    Correctly rounded np.linspace values differ from torch's by an ulp in about a third of the
    points, which shifts alpha-bar by a few ulps.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], dtype=np.float32)  # (1,)
    step = (end32 - start32) / np.float32(num - 1)
    index = np.arange(num)  # (num,)
    from_start = index < num // 2  # (num,)
    steps_from_anchor = np.where(from_start, index, num - 1 - index).astype(np.float64)  # (num,)
    offset = np.float64(step) * steps_from_anchor  # (num,) exact
    points = np.where(from_start, np.float64(start32) + offset, np.float64(end32) - offset)  # (num,) float64
    return points.astype(np.float32)  # (num,)


def cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """Glide's "squaredcos_cap_v2" schedule: betas whose alpha-bar follows cos^2 (float32).

    diffusers evaluates it in float64 Python maths and rounds to float32 at the end; so do we.
    """
    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    t = np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps  # (T,)
    t_next = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps  # (T,)
    betas = np.minimum(1.0 - alpha_bar(t_next) / alpha_bar(t), _COSINE_MAX_BETA)  # (T,) float64
    return betas.astype(np.float32)  # (T,)


# --- inference timesteps -----------------------------------------------------------------------


def check_num_inference_steps(num_inference_steps: object, minimum: int, maximum: int) -> int:
    """``num_inference_steps`` as an int in minimum..maximum (a scheduler's min/max_inference_steps); ValueError
    naming it otherwise."""
    in_range = is_int(num_inference_steps) and minimum <= num_inference_steps <= maximum
    if not in_range:
        raise ValueError(f"num_inference_steps must be an integer in {minimum}..{maximum}, got {num_inference_steps!r}")
    return int(num_inference_steps)


def most_spaced_steps(config: NoiseScheduleConfig) -> int:
    """The most steps N such that the runs of 1..N steps all visit training timesteps only. With "leading" spacing
    ``steps_offset`` shifts every timestep up, so the top one passes the last training timestep from some N on
    (SD 1.x's steps_offset 1: 1000 steps would need timestep 1000 of 0..999; diffusers fails with IndexError)."""
    for num_steps in range(1, config.num_train_timesteps + 1):
        if spaced_timesteps(config, num_steps)[-1] >= config.num_train_timesteps:
            return num_steps - 1
    return config.num_train_timesteps


def spaced_timesteps(config: NoiseScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """The ``num_inference_steps`` training timesteps a run visits, ascending (int64).

    "leading", "trailing" and "linspace" are Table 2 of "Common Diffusion Noise Schedules and Sample
    Steps are Flawed" (arXiv 2305.08891), computed with diffusers' exact numpy expressions.
    """
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, num_inference_steps).round().astype(np.int64)  # (N,)
    if config.timestep_spacing == "leading":
        step_ratio = num_train // num_inference_steps
        return np.arange(num_inference_steps, dtype=np.int64) * step_ratio + config.steps_offset  # (N,)
    # trailing: count down from the last training timestep in (fractional) strides.
    step_ratio = num_train / num_inference_steps
    descending = np.round(np.arange(num_train, 0, -step_ratio))  # (N,) or (N+1,)
    # For some N (61, 103, ... of 1000) float rounding in arange yields one extra point ~0, i.e.
    # timestep -1, which diffusers then runs as a wrapped-around alphas_cumprod[-1]; drop it.
    return (descending[:num_inference_steps][::-1] - 1).astype(np.int64)  # (N,)

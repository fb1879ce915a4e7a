"""PNDM / PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

numpy port of diffusers' ``PNDMScheduler`` over explicit state. ``start()`` plans every U-Net call
up front: its timestep, how its output is combined with earlier ones, and the alpha-bar pair the
update moves between. ``step()`` is then a pure function of (state, model output, sample).

Two ways to warm up the 4th-order linear multistep (PLMS) method, which needs 3 earlier outputs:

* ``skip_prk_steps=False`` (F-PNDM): three 4-stage Runge-Kutta steps over the top 4 timesteps
  (12 calls), then one PLMS call per remaining timestep: N + 9 calls for N steps.
* ``skip_prk_steps=True`` (the PLMS sampler Stable Diffusion ships): the first step is taken
  twice, once as Euler and once more averaging the two outputs (Heun), then PLMS with as many
  earlier outputs as there are so far: N + 1 calls for N >= 2, one call for N = 1.

All arithmetic is float32 in diffusers' operation order. alpha-bar is bit-identical to diffusers';
an update differs by at most a few ulps, because torch's float32 sqrt (MKL) is an ulp off on about
a fifth of inputs where numpy's is correctly rounded.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from sdrt.engine.array_namespace import namespace_of
from .base import (
    NoiseScheduleConfig,
    SchedulerConfigError,
    add_noise_at_alpha_prod,
    alphas_cumprod_from_betas,
    betas_from_config,
    check_num_inference_steps,
    check_step_index,
    most_spaced_steps,
    read_bool,
    read_only,
    spaced_timesteps,
)

# PLMS extrapolates from the last 4 model outputs.
_HISTORY_LENGTH = 4
# The Runge-Kutta warm-up covers 3 steps, which leaves the 3 outputs 4th-order PLMS needs.
_RUNGE_KUTTA_STEPS = 3
_RUNGE_KUTTA_STAGES = 4

# float32 constants, so numpy rounds every product exactly as torch does with Python scalars.
_F32 = np.float32
_ONE_SIXTH, _ONE_THIRD = _F32(1 / 6), _F32(1 / 3)


class PNDMUpdate(enum.Enum):
    """How one U-Net call's output becomes the epsilon of its sample update."""

    RK_STAGE_1 = "rk_stage_1"  # starts a Runge-Kutta step: remembers sample and output
    RK_STAGE_2 = "rk_stage_2"
    RK_STAGE_3 = "rk_stage_3"
    RK_STAGE_4 = "rk_stage_4"  # completes it with the 1/6, 1/3, 1/3, 1/6 weighted output
    PLMS_FIRST = "plms_first"  # skip_prk: first Euler step, its sample kept for the Heun redo
    PLMS_HEUN = "plms_heun"  # skip_prk: redo the first step from its sample with the averaged output
    PLMS = "plms"  # Adams-Bashforth over the last (up to 4) outputs


_RK_STAGES = (PNDMUpdate.RK_STAGE_1, PNDMUpdate.RK_STAGE_2, PNDMUpdate.RK_STAGE_3, PNDMUpdate.RK_STAGE_4)


@dataclass(frozen=True)
class PNDMConfig:
    """A PNDMScheduler config: the shared noise-schedule fields plus PNDM's own two switches."""

    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    skip_prk_steps: bool = False
    # True: the last update lands on alpha-bar = 1 (a clean sample); False: on alpha-bar_0.
    set_alpha_to_one: bool = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PNDMConfig:
        """Read a scheduler_config.json dict; unknown keys (clip_sample, _class_name, ...) are ignored."""
        return cls(
            schedule=NoiseScheduleConfig.from_dict(config),
            skip_prk_steps=read_bool(config, "skip_prk_steps", False),
            set_alpha_to_one=read_bool(config, "set_alpha_to_one", False),
        )


@dataclass(frozen=True, eq=False)
class PNDMState:
    """Everything a PNDM run depends on. Arrays are read-only; ``step()`` returns a new state.

    ``timesteps``, ``updates``, ``alpha_prod_from`` and ``alpha_prod_to`` are the plan, one entry per
    U-Net call; the rest is the history the next call's update needs.
    """

    timesteps: np.ndarray  # (num_calls,) int64 — U-Net timestep of each call, in call order
    updates: tuple[PNDMUpdate, ...]  # (num_calls,) how each call's output is combined
    alpha_prod_from: np.ndarray  # (num_calls,) float32 — alpha-bar where each update starts
    alpha_prod_to: np.ndarray  # (num_calls,) float32 — alpha-bar where each update lands
    eps_history: tuple[np.ndarray, ...] = ()  # outputs PLMS extrapolates from, oldest first, <= 4
    start_sample: np.ndarray | None = None  # sample a multi-call update (RK step, Heun redo) starts from
    rk_eps_sum: np.ndarray | None = None  # weighted sum of the current RK step's stage outputs so far
    steps_taken: int = 0  # calls applied so far; the next step() must be for this index

    @property
    def num_calls(self) -> int:
        """Number of U-Net calls in the whole run."""
        return len(self.updates)

    @property
    def init_noise_sigma(self) -> float:
        """PNDM starts from unit-variance noise."""
        return 1.0


class PNDMScheduler:
    """diffusers' PNDMScheduler in numpy over explicit :class:`PNDMState` (implements ``Scheduler``)."""

    order = 1  # diffusers' PNDMScheduler.order, though its warm-up repeats one timestep
    needs_noise = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad values."""
        self.config = PNDMConfig.from_dict(config)
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps
        # The Runge-Kutta warm-up steps between the top 4 timesteps; every call's timestep lies within the spaced ones.
        self.min_inference_steps = 1 if self.config.skip_prk_steps else _RUNGE_KUTTA_STEPS + 1
        self.max_inference_steps = most_spaced_steps(self.config.schedule)
        if self.max_inference_steps < self.min_inference_steps:
            raise SchedulerConfigError(f"scheduler config steps_offset={self.config.schedule.steps_offset} leaves no run "
                                       f"of {self.min_inference_steps} steps within the training timesteps")
        self.alphas_cumprod = read_only(alphas_cumprod_from_betas(betas_from_config(self.config.schedule)))  # (T,)
        # alpha-bar "before" timestep 0, where the last update lands.
        self.final_alpha_cumprod = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def start(self, num_inference_steps: int, begin_index: int = 0) -> PNDMState:
        """Plan a run of ``num_inference_steps`` steps, from U-Net call ``begin_index`` of the full run on.

        Starting part-way (image to image) is diffusers' run over ``timesteps[begin_index:]``: its
        call counter starts again at 0, so the first two of the remaining calls are the Euler step
        and its Heun redo, whatever timesteps they fall on. Only the PLMS warm-up can start part-way
        (diffusers fails with the Runge-Kutta one).

        Raises ValueError if ``num_inference_steps`` is not an int in min_inference_steps..max_inference_steps
        or if ``begin_index`` leaves no call.
        """
        num_steps = check_num_inference_steps(num_inference_steps, self.min_inference_steps, self.max_inference_steps)
        descending = spaced_timesteps(self.config.schedule, num_steps)[::-1]  # (N,)
        # diffusers moves by num_train // N per step whatever the spacing, and so do we.
        stride = self.num_train_timesteps // num_steps
        if self.config.skip_prk_steps:
            # The first step's timestep, then each following one; the second is visited twice (Heun redo, PLMS).
            call_timesteps = [int(t) for t in (*descending[:2], *descending[1:])] if num_steps > 1 else [int(descending[0])]
            if not 0 <= begin_index < len(call_timesteps):
                raise ValueError(f"begin_index must be in 0..{len(call_timesteps) - 1} for {num_steps} steps, got {begin_index!r}")
            calls = _plms_warmup_plan(call_timesteps[begin_index:], stride)
        elif begin_index:
            raise ValueError("PNDM with the Runge-Kutta warm-up (skip_prk_steps false) cannot start part-way (image to "
                             "image, inpainting); use a checkpoint config with skip_prk_steps true or another scheduler")
        else:
            calls = _runge_kutta_warmup_plan(descending, stride)
        timesteps, updates, from_timesteps, to_timesteps = zip(*calls)
        return PNDMState(
            timesteps=read_only(np.array(timesteps, dtype=np.int64)),
            updates=tuple(updates),
            alpha_prod_from=read_only(self._alpha_prod_at(from_timesteps)),
            alpha_prod_to=read_only(self._alpha_prod_at(to_timesteps)),
        )

    def scale_model_input(self, state: PNDMState, sample: np.ndarray, step_index: int) -> np.ndarray:
        """PNDM feeds the U-Net the sample unscaled."""
        check_step_index(state.num_calls, step_index)
        return sample

    def add_noise(self, state: PNDMState, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` noised to alpha-bar at call ``step_index``'s timestep (diffusers' DDPM ``add_noise``)."""
        check_step_index(state.num_calls, step_index)
        return add_noise_at_alpha_prod(original, noise, self.alphas_cumprod[state.timesteps[step_index]])

    def step(
        self,
        state: PNDMState,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, PNDMState]:
        """Apply U-Net call ``step_index``: returns (prev_sample float32, new state); ``state`` is untouched.

        ``model_output`` is epsilon or v as configured by prediction_type, shaped like ``sample``;
        PNDM is deterministic and ignores ``noise``. Calls must come in order: ``step_index`` must equal ``state.steps_taken``.
        """
        check_step_index(state.num_calls, step_index)
        if step_index != state.steps_taken:
            raise ValueError(f"step_index {step_index} out of order: this state expects step {state.steps_taken}")
        model_output = _frozen_float32(model_output)  # (B, C, H, W)
        sample = _frozen_float32(sample)  # (B, C, H, W)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")

        update = state.updates[step_index]
        if update in _RK_STAGES:
            eps, origin, next_state = _runge_kutta_stage(state, update, model_output, sample)
        else:
            eps, origin, next_state = _linear_multistep(state, update, model_output, sample)
        prev_sample = _transfer(
            origin,
            eps,
            state.alpha_prod_from[step_index],
            state.alpha_prod_to[step_index],
            self.config.schedule.prediction_type,
        )  # (B, C, H, W)
        return prev_sample, replace(next_state, steps_taken=step_index + 1)

    def _alpha_prod_at(self, timesteps: tuple[int, ...]) -> np.ndarray:
        """alpha-bar at each timestep; a negative timestep means "past the end": final_alpha_cumprod."""
        index = np.array(timesteps, dtype=np.int64)  # (num_calls,)
        alphas = self.alphas_cumprod[np.maximum(index, 0)]  # (num_calls,)
        return np.where(index >= 0, alphas, self.final_alpha_cumprod).astype(np.float32)  # (num_calls,)


# A planned U-Net call: (timestep, update, alpha-bar index the update starts from, index it lands on).
_Call = tuple[int, PNDMUpdate, int, int]


def _plms_warmup_plan(call_timesteps: list[int], stride: int) -> list[_Call]:
    """skip_prk_steps, over the timestep of each call: Euler at the first, the same step again as
    Heun at the second, then PLMS."""
    first = call_timesteps[0]
    calls: list[_Call] = [(first, PNDMUpdate.PLMS_FIRST, first, first - stride)]
    if len(call_timesteps) == 1:
        return calls
    # The Heun redo is evaluated where the Euler step landed and restarts one stride above it —
    # the first timestep only with "leading" spacing, as in diffusers.
    second = call_timesteps[1]
    calls.append((second, PNDMUpdate.PLMS_HEUN, second + stride, second))
    calls.extend((t, PNDMUpdate.PLMS, t, t - stride) for t in call_timesteps[2:])
    return calls


def _runge_kutta_warmup_plan(descending: np.ndarray, stride: int) -> list[_Call]:
    """F-PNDM: 4-stage Runge-Kutta from each of the top 3 timesteps to the next, then PLMS.

    Each RK step from ``upper`` to ``lower`` evaluates at upper, twice at the midpoint, then at
    lower. As in diffusers, the midpoint is ``lower + half`` and the first stage lands on
    ``upper - half``: the same point when timesteps are ``stride`` apart.
    """
    half = stride // 2
    calls: list[_Call] = []
    for upper, lower in zip(descending[:_RUNGE_KUTTA_STEPS], descending[1 : _RUNGE_KUTTA_STEPS + 1]):
        upper, midpoint, lower = int(upper), int(lower) + half, int(lower)
        calls += [
            (upper, PNDMUpdate.RK_STAGE_1, upper, upper - half),
            (midpoint, PNDMUpdate.RK_STAGE_2, upper, midpoint),
            (midpoint, PNDMUpdate.RK_STAGE_3, upper, lower),
            (lower, PNDMUpdate.RK_STAGE_4, upper, lower),
        ]
    calls.extend((int(t), PNDMUpdate.PLMS, int(t), int(t) - stride) for t in descending[_RUNGE_KUTTA_STEPS:])
    return calls


def _runge_kutta_stage(
    state: PNDMState, update: PNDMUpdate, model_output: np.ndarray, sample: np.ndarray
) -> tuple[np.ndarray, np.ndarray, PNDMState]:
    """(epsilon, sample to update from, state after this call) for one Runge-Kutta stage.

    Every stage moves the step's starting sample; stages 1-3 with their own output (to produce the
    next stage's input), stage 4 with the 1/6, 1/3, 1/3, 1/6 combination of all four.
    """
    if update is PNDMUpdate.RK_STAGE_1:
        history = _append_history(state.eps_history, model_output)
        eps_sum = read_only(_ONE_SIXTH * model_output)  # (B, C, H, W)
        next_state = replace(state, eps_history=history, start_sample=sample, rk_eps_sum=eps_sum)
        return model_output, sample, next_state
    if update is PNDMUpdate.RK_STAGE_4:
        eps = state.rk_eps_sum + _ONE_SIXTH * model_output  # (B, C, H, W)
        return eps, state.start_sample, replace(state, start_sample=None, rk_eps_sum=None)
    eps_sum = read_only(state.rk_eps_sum + _ONE_THIRD * model_output)  # (B, C, H, W)
    return model_output, state.start_sample, replace(state, rk_eps_sum=eps_sum)


def _linear_multistep(
    state: PNDMState, update: PNDMUpdate, model_output: np.ndarray, sample: np.ndarray
) -> tuple[np.ndarray, np.ndarray, PNDMState]:
    """(epsilon, sample to update from, state after this call) for one PLMS call."""
    if update is PNDMUpdate.PLMS_HEUN:
        # Average the Euler step's output with this one; the redo's output is not kept in the history.
        eps = (model_output + state.eps_history[-1]) / _F32(2)  # (B, C, H, W)
        return eps, state.start_sample, replace(state, start_sample=None)
    history = _append_history(state.eps_history, model_output)
    next_state = replace(state, eps_history=history)
    if update is PNDMUpdate.PLMS_FIRST:
        next_state = replace(next_state, start_sample=sample)
    return _adams_bashforth(history), sample, next_state


def _adams_bashforth(history: tuple[np.ndarray, ...]) -> np.ndarray:
    """Adams-Bashforth extrapolation of epsilon, of order len(history) (1..4), newest output last.

    Coefficients and operation order are diffusers', so float32 rounding matches it.
    """
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / _F32(2)  # (B, C, H, W)
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / _F32(12)  # (B, C, H, W)
    weighted = 55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]  # (B, C, H, W)
    return _F32(1 / 24) * weighted  # (B, C, H, W)


def _transfer(
    sample: np.ndarray, eps: np.ndarray, alpha_prod_t: np.float32, alpha_prod_prev: np.float32, prediction_type: str
) -> np.ndarray:
    """Move ``sample`` from alpha-bar ``alpha_prod_t`` to ``alpha_prod_prev`` along ``eps``.

    The PNDM paper's transfer part, eq. (9):

    x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)),
    evaluated in float32 in diffusers' order.
    """
    beta_prod_t = _F32(1) - alpha_prod_t
    beta_prod_prev = _F32(1) - alpha_prod_prev
    if prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1 - a) x  =>  eps = sqrt(a) v + sqrt(1 - a) x
        eps = np.sqrt(alpha_prod_t) * eps + np.sqrt(beta_prod_t) * sample  # (B, C, H, W)
    sample_coeff = np.sqrt(alpha_prod_prev / alpha_prod_t)
    eps_denominator = alpha_prod_t * np.sqrt(beta_prod_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_prev)
    return sample_coeff * sample - (alpha_prod_prev - alpha_prod_t) * eps / eps_denominator  # (B, C, H, W)


def _append_history(history: tuple[np.ndarray, ...], model_output: np.ndarray) -> tuple[np.ndarray, ...]:
    """The last 4 outputs after adding ``model_output``."""
    return (*history, model_output)[-_HISTORY_LENGTH:]


def _frozen_float32(array: np.ndarray) -> np.ndarray:
    """A read-only float32 copy, safe to keep in a state while the caller reuses its buffer (a device loop's U-Net
    output buffer is rewritten every step)."""
    xp = namespace_of(array)
    return read_only(xp.asarray(array, dtype=xp.float32).copy())


"""Exception types of the runtime: callers catch these, the CLI turns them into one-line messages and exit code 2."""
from __future__ import annotations


class SdrtError(Exception):
    """Base of every error sdrt raises on purpose."""


class InvalidArgumentError(SdrtError, ValueError):
    """A request argument is outside what the pipeline accepts; the message names it and the allowed range."""

    def __init__(self, parameter: str, message: str) -> None:
        # Messages passed up from lower layers may already start with the parameter's name.
        super().__init__(message if message.startswith(parameter) else f"{parameter}: {message}")
        self.parameter = parameter


class GenerationCancelled(SdrtError):
    """Raised by a step callback (`callback_on_step_end`) to stop a generation between denoising steps: its client
    left, or its deadline passed. The message says why."""


class BundleError(SdrtError, ValueError):
    """A bundle is missing, incomplete, tampered with, or of a format this runtime does not read."""


class BackendUnavailableError(SdrtError, RuntimeError):
    """The requested inference backend cannot run here; the message says what is missing."""


class EnginesNotBuiltError(BackendUnavailableError):
    """The bundle has no TensorRT engines for this GPU, TensorRT version and bundle content (none built, built for
    another GPU or TensorRT, or built from ONNX that has since changed); the message names `sdrt build-engines`."""


class ProfileMismatchError(InvalidArgumentError):
    """A request's batch, height or width is outside the range its TensorRT engines were built for; the message
    names that range and the `sdrt build-engines` command that rebuilds them to cover the request."""


class GpuError(SdrtError, RuntimeError):
    """A CUDA or TensorRT call failed on the device; the message names the call and its error."""


class LoraError(SdrtError, ValueError):
    """A LoRA file cannot be applied to this bundle: unreadable, malformed, or naming weights the model lacks."""


class UnknownLoraKeysError(LoraError):
    """A LoRA file names modules that match no weight of the bundle's U-Net or text encoders; `.keys` lists them."""

    def __init__(self, path: str, keys: list[str]) -> None:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        super().__init__(
            f"{path}: {len(keys)} LoRA keys match no U-Net or text-encoder weight of this bundle ({shown}); "
            "the LoRA was made for another model architecture, or uses a key format sdrt does not read "
            "(diffusers/PEFT `unet.<module>.lora_A.weight` and kohya `lora_unet_<module>.lora_down.weight` are read)"
        )
        self.keys = keys


class NoRefitMapError(BundleError):
    """The bundle was exported before weight maps were recorded: LoRA cannot find the weights to replace."""


class WeightsNotReplaceableError(SdrtError, RuntimeError):
    """The backend (or its engines) cannot replace model weights after loading; the message names the fix."""

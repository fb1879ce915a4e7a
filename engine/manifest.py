"""The bundle manifest: what a bundle holds and every model constant the runtime needs, written once at export.

The exporter builds a `Manifest` and calls `write`; the runtime calls `read_manifest` and `verify_files`. Every
file of the bundle is listed with its size and sha256, so a missing, truncated or tampered file is caught at load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
from pathlib import Path
from typing import Any

from sdrt.engine.atomic import atomic_file
from sdrt.engine.errors import BundleError
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFIED_STAMPS_FILE = ".cache/verified.json"  # not a bundle file: the manifest never lists .cache
_HASH_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints for axes fixed by the checkpoint, axis names for dynamic ones


@dataclasses.dataclass(frozen=True)
class Fp16Entry:
    """A component's fp16 variant for the GPU backends (`sdrt export --fp16-onnx`): fp16 weights and arithmetic,
    fp32 inputs and outputs, so it is fed exactly like the fp32 model."""

    file: str  # relative to the bundle, like ComponentEntry.file
    max_abs_diff: float  # |fp16 - fp32 model| on the export's probe input (onnxruntime on the CPU)


@dataclasses.dataclass(frozen=True)
class ComponentEntry:
    file: str  # the .onnx file, relative to the bundle; its external data (if any) is listed in Manifest.files
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    opset: int
    export_max_abs_diff: float  # onnxruntime vs torch on a probe input at export time
    fp16: Fp16Entry | None = None  # None: exported without an fp16 variant of this component
    # the refit map (engine/refit_map.py) of the components LoRA patches; None for the others, and in bundles
    # exported before maps were recorded (load_lora then asks for a re-export)
    refit_map: str | None = None


#: Requests run at sides within [trained / SIDE_SPAN, trained * SIDE_SPAN] of the model's trained side (sample_size x
#: VAE scale factor). A quarter of it leaves SD's deepest U-Net level 2 latent pixels (below that its convolutions see
#: mostly padding and images are meaningless tiles); four times it costs 16x the pixels and 256x the attention of the
#: trained size, where the model only repeats its subject in tiles (SD 1.5: 128 to 2048 px; the 64-px default model:
#: 16 to 256 px, where 2048 px took 11 minutes).
SIDE_SPAN = 4


@dataclasses.dataclass(frozen=True)
class SideRange:
    """The heights and widths a model runs: multiples of `multiple` (the VAE scale factor) in minimum..maximum."""

    minimum: int
    maximum: int
    multiple: int

    def contains(self, side: int) -> bool:
        return self.minimum <= side <= self.maximum and side % self.multiple == 0

    def describe(self) -> str:
        return f"a multiple of {self.multiple} in {self.minimum}..{self.maximum}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Constants read from the checkpoint's own configs."""

    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    sample_size: int  # the U-Net's default latent size; default image side = sample_size * vae_scale_factor
    text_hidden_size: int
    max_image_size: int  # largest height or width in pixels the bundle accepts
    # The U-Net's input channels: latent_channels for a standard U-Net, 2 * latent_channels + 1 for an inpainting one
    # (latents, mask, masked-image latents). Absent from bundles exported before inpainting: latent_channels.
    unet_in_channels: int | None = None
    # The sizes a request's working memory grows with (sdrt.engine.memory_estimate), each level full size first.
    # Absent from bundles exported before they were recorded: the estimate then assumes SD 1.x's.
    unet_block_out_channels: tuple[int, ...] | None = None  # the U-Net's channels at each resolution level
    unet_attention_heads: tuple[int, ...] | None = None  # its self-attention heads at each level, 0 where none
    vae_block_out_channels: tuple[int, ...] | None = None  # the VAE's channels at each level
    # what the tiny decoder (specs.Component.TINY_VAE_DECODER) divides latents by; None: the bundle has none
    tiny_vae_scaling_factor: float | None = None

    def __post_init__(self) -> None:
        if self.unet_in_channels is None:
            object.__setattr__(self, "unet_in_channels", self.latent_channels)
        for name in ("unet_block_out_channels", "unet_attention_heads", "vae_block_out_channels"):
            if getattr(self, name) is not None:  # JSON gives lists
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def default_image_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def image_sides(self) -> SideRange:
        """The sides requests may ask for: SIDE_SPAN around the trained side, within the bundle's max_image_size."""
        factor, trained = self.vae_scale_factor, self.default_image_size
        smallest = max(factor, -(-trained // SIDE_SPAN // factor) * factor)  # rounded up to a multiple of factor
        largest = min(trained * SIDE_SPAN, self.max_image_size) // factor * factor
        return SideRange(smallest, largest, factor)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    directory: str
    model_max_length: int
    pad_token: str


@dataclasses.dataclass(frozen=True)
class SdxlConfig:
    """What an SDXL bundle adds: its second text encoder's tokenizer, and the unconditional input without a negative
    prompt (the pipeline's force_zeros_for_empty_prompt: zeros, or the empty prompt's embeddings).

    An SDXL refiner's (diffusers' StableDiffusionXLImg2ImgPipeline layout) has requires_aesthetics_score: its U-Net's
    time_ids end with an aesthetic score in place of the target size, and it runs image to image only. A refiner has
    no first text encoder: its components lack text_encoder, and the manifest's `tokenizer` is tokenizer_2 too."""

    tokenizer_2: TokenizerConfig
    force_zeros_for_empty_prompt: bool
    #: model_index.json's, as diffusers reads it; absent from bundles exported before refiners: False
    requires_aesthetics_score: bool = False


@dataclasses.dataclass(frozen=True)
class SafetyCheckerConfig:
    concepts_file: str  # .npz: concept and special-care embeddings and their thresholds
    preprocessor_config_file: str  # the checkpoint's feature_extractor/preprocessor_config.json


@dataclasses.dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class FusedLoraEntry:
    """A LoRA file fused into the bundle's U-Net and text-encoder weights at export (`sdrt export --lora FILE:SCALE`)."""

    file: str  # the file's name
    sha256: str
    scale: float


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The arguments a model runs with when the caller gives none, derived from its checkpoint at export
    (export/model_defaults.py): few-step models (Turbo, LCM) run other steps, guidance and sampler than SD's.
    The defaults here are diffusers' StableDiffusionPipeline's, what bundles exported before record."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None  # a name of sdrt.engine.schedulers.SCHEDULER_NAMES; None: the checkpoint's own


@dataclasses.dataclass(frozen=True)
class DeepCacheEntry:
    """The DeepCache branch a bundle's DeepCache passes were exported for (`sdrt export --deepcache-branch N`; its
    components: specs.OPTIONAL_COMPONENTS), and how many branches the U-Net has (sdrt.engine.deepcache)."""

    branch: int
    branches: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int
    sdrt_version: str
    source_checkpoint: str
    model: ModelConfig
    tokenizer: TokenizerConfig  # the first text encoder's (an SDXL refiner's only one: tokenizer_2)
    scheduler_config_file: str
    safety_checker: SafetyCheckerConfig | None  # None: exported from a checkpoint without one
    components: dict[Component, ComponentEntry]
    files: dict[str, FileEntry]  # every file of the bundle but the manifest itself
    # sha256 of a single-file checkpoint (.safetensors / .ckpt); None for a diffusers directory, and in bundles
    # exported before single files were read (the same format)
    source_sha256: str | None = None
    loras: tuple[FusedLoraEntry, ...] = ()  # fused at export, in the order given; absent from older bundles: none
    defaults: GenerationDefaults = GenerationDefaults()  # absent from older bundles: diffusers' defaults
    deepcache: DeepCacheEntry | None = None  # None: exported without DeepCache's passes (and in older bundles)
    sdxl: SdxlConfig | None = None  # None: an SD 1.x/2.x bundle (one text encoder)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["components"] = {c.value: entry for c, entry in data["components"].items()}
        return json.dumps(data, indent=2, sort_keys=True)

    def write(self, bundle_dir: Path) -> None:
        (Path(bundle_dir) / MANIFEST_NAME).write_text(self.to_json() + "\n", encoding="utf-8")

    def component_digest(self, component: Component) -> str:
        """A sha256 over the recorded hashes of every file in `component`'s directory: its ONNX and its external
        weights (`model.onnx.data`), since new weights alone can leave the .onnx file byte-identical. Caches derived
        from a model (OpenVINO's converted models, TensorRT engines) are keyed on it."""
        directory = posixpath.dirname(self.components[component].file)
        digest = hashlib.sha256()
        for name in sorted(self.files):
            if posixpath.dirname(name) == directory:
                digest.update(f"{name} {self.files[name].sha256}\n".encode())
        return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(bundle_dir: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under `bundle_dir` except the manifest, keyed by POSIX relative path."""
    bundle_dir = Path(bundle_dir)
    return {
        path.relative_to(bundle_dir).as_posix(): FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
        for path in sorted(bundle_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def _tensor(data: dict[str, Any]) -> TensorEntry:
    return TensorEntry(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


def _component(data: dict[str, Any]) -> ComponentEntry:
    return ComponentEntry(
        file=data["file"],
        inputs=tuple(_tensor(t) for t in data["inputs"]),
        outputs=tuple(_tensor(t) for t in data["outputs"]),
        opset=int(data["opset"]),
        export_max_abs_diff=float(data["export_max_abs_diff"]),
        # absent from bundles exported before fp16 variants existed: the same format, without variants
        fp16=Fp16Entry(**data["fp16"]) if data.get("fp16") is not None else None,
        refit_map=data.get("refit_map"),  # absent from bundles exported before refit maps: the same format
    )


def _sdxl(data: dict[str, Any]) -> SdxlConfig:
    return SdxlConfig(tokenizer_2=TokenizerConfig(**data["tokenizer_2"]),
                      force_zeros_for_empty_prompt=bool(data["force_zeros_for_empty_prompt"]),
                      requires_aesthetics_score=bool(data.get("requires_aesthetics_score", False)))


def read_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Parse `bundle_dir/manifest.json`; raise BundleError if it is absent, malformed or of another format version."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(f"{path} is missing: not an sdrt bundle (create one with `sdrt export CHECKPOINT OUT_DIR`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has manifest format version {version!r}; this sdrt reads version {FORMAT_VERSION}: "
            "re-export the bundle with this version of sdrt"
        )
    try:
        components = {}
        for name, entry in data["components"].items():
            try:
                component = Component(name)
            except ValueError:
                raise BundleError(f"{path} lists an unknown component {name!r}") from None
            components[component] = _component(entry)
        return Manifest(
            format_version=version,
            sdrt_version=data["sdrt_version"],
            source_checkpoint=data["source_checkpoint"],
            model=ModelConfig(**data["model"]),
            tokenizer=TokenizerConfig(**data["tokenizer"]),
            scheduler_config_file=data["scheduler_config_file"],
            safety_checker=SafetyCheckerConfig(**data["safety_checker"]) if data["safety_checker"] is not None else None,
            components=components,
            files={name: FileEntry(**entry) for name, entry in data["files"].items()},
            source_sha256=data.get("source_sha256"),
            loras=tuple(FusedLoraEntry(**entry) for entry in data.get("loras", ())),
            defaults=GenerationDefaults(**data.get("defaults", {})),
            deepcache=DeepCacheEntry(**data["deepcache"]) if data.get("deepcache") is not None else None,
            sdxl=_sdxl(data["sdxl"]) if data.get("sdxl") is not None else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path} is malformed ({type(exc).__name__}: {exc})") from exc


def _stat_stamp(stat: os.stat_result) -> list[int]:
    # Rewriting a file always moves its ctime, which no user call can set back: a matching stamp means unmodified.
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _read_stamps(bundle_dir: Path) -> dict[str, Any]:
    try:
        stamps = json.loads((bundle_dir / VERIFIED_STAMPS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(bundle_dir: Path, stamps: dict[str, Any]) -> None:
    try:
        with atomic_file(bundle_dir / VERIFIED_STAMPS_FILE) as staging:
            staging.write_text(json.dumps(stamps, sort_keys=True), encoding="utf-8")
    except OSError as exc:  # a read-only bundle is verified in full on every load
        logger.debug("cannot record verified hashes in %s: %s", bundle_dir, exc)


def verify_files(bundle_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check every listed file exists with its recorded size and sha256; raise BundleError naming the first that does not.

    Hashing gigabytes of weights dominated load time, so each verified file's stat (size, mtime, ctime, inode) is
    recorded in the bundle's cache with its hash; a later load hashes again only files whose stat changed.
    """
    bundle_dir = Path(bundle_dir)
    stamps = _read_stamps(bundle_dir)
    verified: dict[str, Any] = {}
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing")
        stat = path.stat()
        if stat.st_size != expected.bytes:
            raise BundleError(f"bundle file {path} is {stat.st_size} bytes, the manifest says {expected.bytes}: truncated or replaced")
        stamp = {"stat": _stat_stamp(stat), "sha256": expected.sha256}
        if stamps.get(name) != stamp and sha256_file(path) != expected.sha256:
            raise BundleError(f"bundle file {path} does not match its sha256 in the manifest: it was modified")
        verified[name] = stamp
    if verified != stamps:
        _write_stamps(bundle_dir, verified)
    for component, entry in manifest.components.items():
        named = (entry.file, *([entry.fp16.file] if entry.fp16 is not None else []), *([entry.refit_map] if entry.refit_map else []))
        for name in named:
            if name not in manifest.files:
                raise BundleError(f"manifest names {name} for {component.value} but does not list it among its files")

"""DeepCache (Ma et al. 2023): reuse the U-Net's deep features between neighbouring denoising steps, training-free.

A U-Net's up-blocks change slowly from step to step. Every `cache_interval`-th U-Net call is a full pass that also
returns the hidden state entering one up-block layer (the cache branch); the calls between are shallow passes that
run only the blocks above that branch (the first down-blocks, the last up-blocks) and take the cached feature in
place of everything deeper. The bundle holds both passes (`sdrt export --deepcache-branch N`: specs.Component
UNET_DEEPCACHE_FULL and UNET_DEEPCACHE_SHALLOW).

Branches are numbered as DeepCache's `cache_branch_id`: branch = block * L + layer, where block counts the U-Net's
resolution levels from the top (0: the full-size level) and layer the skip connections of that level's last
up-block from its end (L = layers_per_block + 1; 3 in SD 1.x/2.x, as DeepCache's `% 3` assumes). Branch 0 caches
the most and runs least (its shallow pass is the conv_in, the last up-block's last layer and conv_out).

The schedule is DeepCache's uniform one, decided per U-Net call: call i is a full pass when i % cache_interval == 0
(the first call always is). PNDM's first step makes one U-Net call more than the steps asked (its PLMS warm-up), and
counting calls, as DeepCache's own pipeline counts its loop over the scheduler's timesteps, keeps the pattern
regular. DeepCache's diffusers helper (`DeepCacheSDHelper`) instead finds each call's index by its timestep, so for
PNDM it counts the repeated second timestep twice; with other samplers both agree.
"""
from __future__ import annotations

import dataclasses

from sdrt.engine.checks import is_int
from sdrt.engine.errors import InvalidArgumentError

#: the export flag that adds DeepCache's passes to a bundle
EXPORT_FLAG = "--deepcache-branch"


@dataclasses.dataclass(frozen=True)
class DeepCache:
    """DeepCache's settings (`pipe(..., deepcache=DeepCache(cache_interval=3))`): a full U-Net pass every
    `cache_interval` calls (1: every call, the same images as without DeepCache), shallow passes between, reusing
    the feature at `cache_branch` (0: the shallowest pass, fastest; higher: more blocks run, closer to exact)."""

    cache_interval: int = 3
    cache_branch: int = 0

    def is_full_pass(self, call_index: int) -> bool:
        """Whether the U-Net call `call_index` (from 0, counting every call of the request) is a full pass."""
        return call_index % self.cache_interval == 0


@dataclasses.dataclass(frozen=True)
class DeepCacheSupport:
    """What a loaded pipeline can run: the branch its bundle's passes were exported for (None: the bundle has none)
    out of `branches`, and why its backend cannot run them (None: it can)."""

    branch: int | None = None
    branches: int = 0
    backend_refusal: str | None = None

    def check(self, value: object, bundle: str) -> DeepCache | None:
        """`value` (a DeepCache or None) checked against this support; InvalidArgumentError naming the bad field."""
        if value is None:
            return None
        if not isinstance(value, DeepCache):
            raise InvalidArgumentError("deepcache", f"must be a sdrt.engine.DeepCache or None, got {value!r:.80}")
        if not is_int(value.cache_interval) or value.cache_interval < 1:
            raise InvalidArgumentError("deepcache.cache_interval", f"must be an integer >= 1, got {value.cache_interval!r}")
        if not is_int(value.cache_branch) or value.cache_branch < 0:
            raise InvalidArgumentError("deepcache.cache_branch", f"must be a non-negative integer, got {value.cache_branch!r}")
        if self.branch is None:
            raise InvalidArgumentError("deepcache", f"the bundle {bundle} has no DeepCache passes: export it with "
                                       f"`sdrt export CHECKPOINT OUT_DIR {EXPORT_FLAG} N`")
        if value.cache_branch != self.branch:
            raise InvalidArgumentError(
                "deepcache.cache_branch", f"must be {self.branch}, the branch the bundle {bundle} was exported for (this "
                f"U-Net has branches 0..{self.branches - 1}: re-export with `{EXPORT_FLAG} {value.cache_branch}` for "
                f"another), got {value.cache_branch!r}")
        if self.backend_refusal is not None:
            raise InvalidArgumentError("deepcache", self.backend_refusal)
        return value

"""The model fingerprint that every cache block written outside the pool carries.

A block's chained prefix hash names its tokens (and tenant); what its rows *mean* depends on the
model that computed them and on how they are laid out. The fingerprint covers both:
- the architecture: the family and every field of its config (layers, widths, heads, RoPE...);
- the weights: a digest of every parameter, each by name, dtype, shape and the CRC-32 of all its
  bytes (in the serving dtype, in logical order, whatever the memory layout). That reads the weights
  once at start-up (about 0.1 s for the built-in model's 538 MB on a CPU) and changes whenever any
  value changes; it depends on the values only, not on file names or mtimes, so two replicas that load
  the same checkpoint agree;
- the layout: cache dtype, block size, row width, layer count, and the block file format version.

Two processes whose fingerprints differ never read each other's blocks: the fingerprint names the
directory they are written to and is checked again in every file's header.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import torch
from torch import nn

FORMAT_VERSION = 1            # of the block file format (model/cache/block_file.py)


def weights_digest(model: nn.Module) -> str:
    """Hex digest of the model's parameters and buffers (a quantized layer's packed weights and scales
    are buffers): name, dtype, shape and CRC-32 of the bytes of each."""
    digest = hashlib.blake2b(digest_size=16, person=b"customllm-wts")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, param in sorted(tensors, key=lambda item: item[0]):
        flat = param.detach().to("cpu").contiguous().reshape(-1)         # [numel], logical order
        raw = flat.view(torch.uint8).numpy() if flat.numel() else b""   # [numel * element_size]
        entry = f"{name}|{flat.dtype}|{tuple(param.shape)}|{zlib.crc32(raw):08x}\n"
        digest.update(entry.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """What a cache block's rows depend on besides its tokens."""

    architecture: str        # family and config, as canonical JSON
    weights: str             # weights_digest
    dtype: str               # cache dtype, e.g. "torch.float32"
    block_size: int
    row_width: int
    num_layers: int
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype, block_size: int) -> "ModelFingerprint":
        config = model.config
        architecture = json.dumps(config.to_dict(), sort_keys=True, default=str)
        return cls(architecture, weights_digest(model), str(dtype), block_size, config.cache_row_width,
                   config.num_layers)

    @property
    def digest(self) -> bytes:
        """32 bytes naming all of the above."""
        fields = json.dumps([self.architecture, self.weights, self.dtype, self.block_size, self.row_width,
                             self.num_layers, self.format_version]).encode()
        return hashlib.blake2b(fields, digest_size=32, person=b"customllm-fp").digest()

    @property
    def name(self) -> str:
        """A short hex name (the directory the blocks of this fingerprint live in)."""
        return self.digest.hex()[:24]

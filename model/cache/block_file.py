"""One cache block as a file: a fixed header, the rows, a CRC-32 trailer.

    header  (88 bytes, little-endian)
      magic        8s   b"CLLMKVB\\0"
      version      u32  FORMAT_VERSION
      flags        u32  0
      fingerprint  32s  ModelFingerprint.digest of the model that computed the rows
      block hash   16s  the block's chained prefix hash (tenant-salted), also its file name
      num_layers   u32
      block_size   u32
      row_width    u32
      elem_size    u32  bytes per value
      payload_len  u64  = num_layers * block_size * row_width * elem_size
    payload  the rows, [num_layers, block_size, row_width] in the cache dtype, C order
    trailer  u32 CRC-32 of header and payload

`decode` refuses anything that is not exactly such a file for this model, this layout and this
hash, and says why (`InvalidBlockFile.reason`): foreign-format (magic or version), foreign-model
(fingerprint or dimensions), truncated or oversized (the size the header announces is not the
file's), wrong-checksum, misplaced (the hash is another block's); a reader that cannot read a file
at all calls it unreadable.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from model.cache.fingerprint import FORMAT_VERSION

MAGIC = b"CLLMKVB\0"
HEADER = struct.Struct("<8sII32s16sIIIIQ")
TRAILER = struct.Struct("<I")
REASONS = ("truncated", "oversized", "foreign-format", "foreign-model", "wrong-checksum", "misplaced", "unreadable")


class InvalidBlockFile(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def file_size(num_layers: int, block_size: int, row_width: int, elem_size: int) -> int:
    return HEADER.size + num_layers * block_size * row_width * elem_size + TRAILER.size


def encode(rows: torch.Tensor, fingerprint: bytes, block_hash: bytes) -> tuple[bytes, memoryview, bytes]:
    """(header, payload, trailer) of a block file for `rows` [num_layers, block_size, row_width] (CPU).
    The payload is a view of the rows' memory: keep `rows` alive until it is written."""
    num_layers, block_size, row_width = rows.shape
    # the bytes of each row are contiguous ([..., W] with stride 1), the block as a whole may not be: numpy
    # makes it contiguous, because a torch copy here, on the writer thread, would start an OpenMP team of
    # its own that spins against the engine thread's on the same cores
    raw = rows.view(torch.uint8).numpy()                                      # [L, B, W * elem], strided
    payload = memoryview(np.ascontiguousarray(raw).reshape(-1))              # [L * B * W * elem]
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, fingerprint, block_hash, num_layers, block_size, row_width,
                         rows.element_size(), payload.nbytes)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return header, payload, TRAILER.pack(crc)


def decode(data: bytearray, fingerprint: bytes, block_hash: bytes, shape: tuple[int, int, int],
           dtype: torch.dtype, total_size: int | None = None) -> torch.Tensor:
    """The rows [num_layers, block_size, row_width] of a block file (a view of `data`, no copy), or
    InvalidBlockFile. `data` may hold only the start of a file of `total_size` bytes whose size is
    wrong (its header still tells a foreign file from a truncated one)."""
    total_size = len(data) if total_size is None else total_size
    if len(data) < HEADER.size:
        raise InvalidBlockFile("truncated", f"{total_size} bytes, shorter than the header")
    magic, version, _flags, file_fp, file_hash, layers, bs, width, elem, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidBlockFile("foreign-format", "not a cache block file")
    if version != FORMAT_VERSION:
        raise InvalidBlockFile("foreign-format", f"format version {version}, this server reads {FORMAT_VERSION}")
    elem_size = torch.empty((), dtype=dtype).element_size()
    if file_fp != fingerprint or (layers, bs, width) != tuple(shape) or elem != elem_size:
        raise InvalidBlockFile("foreign-model", "written by another model or with another cache layout")
    expected = HEADER.size + payload_len + TRAILER.size
    if payload_len != layers * bs * width * elem or total_size != expected or len(data) != expected:
        raise InvalidBlockFile("truncated" if total_size < expected else "oversized",
                               f"{total_size} bytes where the header announces {expected}")
    end = HEADER.size + payload_len
    (stored_crc,) = TRAILER.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[:end]) != stored_crc:
        raise InvalidBlockFile("wrong-checksum", "the CRC-32 does not match the contents")
    if file_hash != block_hash:
        raise InvalidBlockFile("misplaced", "the file holds another block")
    raw = torch.frombuffer(data, dtype=torch.uint8, offset=HEADER.size, count=payload_len)
    return raw.view(dtype).reshape(shape)                                      # [L, B, W]

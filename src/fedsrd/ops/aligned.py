"""Tensors in memory that PyTorch allocated, so that the same values give the same bits.

MKL, PyTorch's CPU BLAS and LAPACK, picks its kernel by the address alignment of the operands: the same float32
matrices at a 64-byte boundary and at an 8-byte offset can give products and solves that differ in the last bit
(measured here: four different results for one 4 x 64 Gram matrix over 16 offsets). Tensors that safetensors
loads point into a file's or a message's buffer at whatever offset the header left, while PyTorch's allocator always
aligns to 64 bytes, so a resumed run (state read from a checkpoint) or a decoded update could drift from the
uninterrupted run by rounding. Every tensor read from bytes goes through `aligned` (a copy only when misaligned).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ALIGNMENT = 64  # bytes: c10's CPU allocator alignment


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a contiguous copy in freshly allocated (64-byte aligned) memory if its data is not aligned."""
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def aligned_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`aligned` for every tensor of a named state."""
    return {name: aligned(tensor) for name, tensor in state.items()}

"""Initial weights that do not depend on the mesh: each rank fills only its own shard, with the
values that shard would hold had one process drawn the whole tensor.

Why per-parameter generation. A run's initial weights must be the same whether it runs on one
process, dp_shard=2, tp=2 or both; otherwise the sharded-vs-reference tests, resuming on another
mesh and comparing hardware all lose their meaning. The alternatives each fail one requirement:
- drawing from torch's global RNG on each rank's local shard gives values that depend on the
  shard's shape and on how many draws came before;
- DTensor's own RNG (`torch.distributed.tensor.random`) keeps sharded draws consistent only on
  devices with a Philox generator (CUDA), not on CPU or Neuron, and not against an unsharded run;
- a seed checkpoint (torchtitan's) needs one process to build the whole model first, which is
  what a 405B model on one host cannot do.
Here each tensor is cut into blocks of rows, and block b of parameter `name` is drawn from a
generator seeded with hash(seed, name, b). A rank works out which global rows and columns its
shard holds (DTensor's own placement arithmetic, `distribute_tensor` with no data movement) and
draws only the blocks those rows fall in: memory is its shard plus one block, and the values equal
the one-process tensor's exactly.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

BLOCK_ELEMENTS = 1 << 20  # elements drawn at once: bounds the memory beyond the local shard


def fill_normal_(param: Tensor, key: str, seed: int, std: float) -> None:
    """Fill `param` (a plain tensor or this rank's DTensor shard) with N(0, std^2) values that
    depend on `key` and `seed` only, never on how `param` is sharded. A 3-D tensor is a stack of
    matrices (experts): matrix i is drawn as the 2-D parameter `key.i` would be, so splitting
    the stack (expert parallel) or each matrix (tensor parallel) changes no value."""
    local = param.to_local() if isinstance(param, DTensor) else param
    if _carries_no_data(local):
        return
    if param.ndim not in (1, 2, 3):
        raise ValueError(f"{key}: only 1-D to 3-D parameters are supported, got {param.ndim}-D")
    if param.ndim == 3:
        rows, cols = global_indices(param, 1), global_indices(param, 2)
        values = torch.stack([_matrix_values(f"{key}.{i}", seed, param.shape[1:], rows, cols)
                              for i in global_indices(param, 0).tolist()])
    else:
        rows = global_indices(param, 0)
        cols = global_indices(param, 1) if param.ndim == 2 else torch.zeros(1, dtype=torch.long)
        values = _matrix_values(key, seed, param.shape, rows, cols)
    with torch.no_grad():
        local.copy_(values.mul_(std).view(local.shape))


def _matrix_values(key: str, seed: int, shape: tuple[int, ...], rows: Tensor,
                   cols: Tensor) -> Tensor:
    """The values at `rows` x `cols` of the matrix (or vector) `key` of `shape`, drawn block of
    rows by block of rows: only the blocks these rows fall in are drawn."""
    row_width = shape[1] if len(shape) == 2 else 1
    block_rows = max(1, BLOCK_ELEMENTS // row_width)
    values = torch.empty(len(rows), len(cols))
    blocks = rows // block_rows
    for block in blocks.unique().tolist():
        first = block * block_rows
        count = min(block_rows, shape[0] - first)
        generator = torch.Generator().manual_seed(_block_seed(seed, key, block))
        drawn = torch.randn(count, row_width, generator=generator)
        mine = blocks == block
        values[mine] = drawn[rows[mine] - first][:, cols]
    return values


def fill_ones_(param: Tensor) -> None:
    local = param.to_local() if isinstance(param, DTensor) else param
    if not _carries_no_data(local):
        with torch.no_grad():
            local.fill_(1.0)


def global_indices(param: Tensor, dim: int) -> Tensor:
    """The global indices along `dim` of the elements this rank's shard holds, in order."""
    size = param.shape[dim]
    if not isinstance(param, DTensor):
        return torch.arange(size)
    # Shard only along `dim`: placements that shard another tensor dim become Replicate, so a
    # 1-wide tensor along the others is never split. No data moves with src_data_rank=None.
    placements = [p if getattr(p, "dim", None) == dim else Replicate() for p in param.placements]
    shape = [1] * param.ndim
    shape[dim] = size
    with torch.device("cpu"):
        index = torch.arange(size).view(shape)
    local = distribute_tensor(index, param.device_mesh, placements, src_data_rank=None)
    return local.to_local().reshape(-1).cpu()


def _carries_no_data(local: Tensor) -> bool:
    return local.numel() == 0 or local.is_meta or is_fake(local)


def _block_seed(seed: int, key: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model: wrappers (activation checkpointing, torch.compile)
    add prefixes that must not change the values it is drawn with."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def output_std(base_std: float, n_layers: int) -> float:
    """Projections that write into the residual stream, which sums 2 x n_layers of them: their std
    shrinks by sqrt(2 x n_layers) to keep its variance flat with depth (Radford et al. 2019,
    GPT-2, section 2.3)."""
    return base_std / math.sqrt(2 * n_layers)

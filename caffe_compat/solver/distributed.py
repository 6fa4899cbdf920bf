"""Several processes (`torchrun --nproc-per-node K -m caffe_compat train ...`): each reads
its block of every global batch (caffe_compat.data shards the readers), the lifted loss
is computed over the gathered global batch, and gradients are all-reduced so that K
processes with batch b update exactly as one process with batch K*b.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..net import CaffeNet
from .rules import LearnableParam

LIFTED_LOSS_TYPE = "LiftedStructSimilaritySoftmaxLoss"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast_module(self, module: nn.Module) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, 0)

    def reduce_gradients(self, params: Sequence[LearnableParam], scale: float) -> None:
        """All-reduce (sum) the grads in one flat buffer, then multiply by `scale`."""
        import torch.distributed as dist

        grads = [p.tensor.grad if p.tensor.grad is not None else torch.zeros_like(p.tensor) for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.mul_(scale)
        offset = 0
        for p, g in zip(params, grads):
            p.tensor.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, value: float, device: torch.device) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def gather(self, obj) -> list:
        import torch.distributed as dist

        result = [None] * self.world_size
        dist.all_gather_object(result, obj)
        return result

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def distribute_lifted_losses(net: CaffeNet) -> int:
    """Swap every lifted loss for the variant over the all-gathered global batch. Its
    backward scales each rank's share by the world size, so averaging the ranks'
    gradients (as for every other loss) gives the single-process gradient."""
    from ..losses.distributed import DistributedLiftedStructSimilaritySoftmaxLoss

    swapped = 0
    for node in net.graph.layers:
        if node.type != LIFTED_LOSS_TYPE:
            continue
        module_name = net.module_names[node.name]
        local = net.layers[module_name]
        net.layers[module_name] = DistributedLiftedStructSimilaritySoftmaxLoss(
            margin=local.margin, caffe_exact=local.caffe_exact, ddp_average=True)
        swapped += 1
    return swapped

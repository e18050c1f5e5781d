"""Process-group helpers. A single process never creates a process group.

Launch many processes with `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
`--dist-url env://` then reads them. NCCL on GPU, gloo on CPU unless `--dist-backend` says otherwise.
"""
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cocord_common.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device_arg, local_rank):
    if device_arg in (None, "", "auto"):
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device_arg}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(dist_url="env://", backend=None, device_arg=None):
    """DistInfo from the environment; joins a process group only when WORLD_SIZE > 1."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_arg, local_rank)
    if world_size > 1:
        if backend in (None, "", "auto"):
            backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=dist_url,
                                    world_size=world_size, rank=rank)
    return DistInfo(rank, world_size, local_rank, device)


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def gather(t):
    """torch.cat of `t` over all ranks along dim 0, in rank order (no grad). Identity alone."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(t):
    """Sum of `t` over ranks (in place on a copy); identity alone."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst=0):
    """Every rank's `obj` in rank order on rank `dst` (None elsewhere): results only `dst` uses need
    not be copied to every rank."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


@torch.no_grad()
def average_batchnorm_buffers(module):
    """Average BatchNorm running statistics over ranks (called at epoch ends). Forward passes do
    not broadcast buffers (see wrap_ddp), so each rank's running stats drift apart from its own
    batches; averaging makes validation and the saved checkpoint use one set for all ranks."""
    if not is_dist():
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(dist.get_world_size())


def barrier():
    if is_dist():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch, world_size):
    if global_batch < 1 or global_batch % world_size:
        raise UserError(
            f"-b/--batch-size {global_batch} is the global batch and must be a positive multiple "
            f"of the number of processes ({world_size})")
    return global_batch // world_size


def wrap_ddp(model, device):
    """DDP without buffer broadcasts in forward: queues/banks stay identical because every rank
    enqueues the same gathered keys, and each rank keeps its own BN running statistics until
    `average_batchnorm_buffers` at the epoch end. Buffers are synced once at construction, so
    every rank starts from rank 0's state."""
    if not is_dist():
        return model
    kwargs = {}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        kwargs["forward_sync_buffers"] = False  # torch >= 2.13: init sync kept, forward sync off
    else:
        kwargs["broadcast_buffers"] = False  # older torch: also skips the init sync (seeds agree)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)

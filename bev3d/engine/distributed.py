"""torch.distributed helpers. A single process (no torchrun) is world size 1 and every helper is a no-op.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_distributed` reads them,
picks NCCL when CUDA is available and gloo otherwise (see docs/distributed.md).
"""

import os

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def init_distributed():
    """Join the process group torchrun describes; returns the device this process computes on."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return device


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_max(values, device):
    """Element-wise max over ranks of a list of floats (used to agree on skip/stop flags)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def reduce_mean(scalars, device):
    """Mean over ranks of a dict of python floats."""
    if not is_distributed() or not scalars:
        return dict(scalars)
    keys = list(scalars)  # same insertion order on every rank (same model, same code)
    t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / get_world_size()).tolist()))


def gather_to_main(obj):
    """List of every rank's `obj` on rank 0, None elsewhere."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

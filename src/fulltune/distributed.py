"""Many devices: the same loop with the model sharded by PyTorch FSDP2 (ZeRO-3) under torchrun.

    torchrun --nproc_per_node=G -m fulltune train CONFIG      (or: fulltune train CONFIG --nproc G)

Each decoder layer is one `fully_shard` unit and the root (embeddings, final norm, LM head) one
more, so weights, gradients and optimiser state are split over the G ranks (~16N/G bytes each);
a layer's weights are gathered just before its forward and backward and freed after.

The global batch does not depend on G: an optimiser step is still micro_batch_size × grad_accum_steps
sequences, drawn by the same sampler as on one device; each rank takes 1/G of them in micro-batches
of at most micro_batch_size. Every rank knows the whole step, so the loss is normalised by the
step's target tokens over all ranks without communication. FSDP averages gradients over ranks;
each rank's loss is multiplied by G so the result is Σ CE / N, exactly as on one device. A rank
with fewer sequences runs "null" micro-batches (no target tokens: zero loss, zero gradient), since
every rank must take part in every gather.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from fulltune.errors import UserError


def sharded() -> bool:
    """Under torchrun (any number of ranks, one included): the model is sharded by FSDP2 and every
    reduction is a collective, so one GPU runs the same path as G."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if sharded() else 1


def rank() -> int:
    return dist.get_rank() if sharded() else 0


def is_main() -> bool:
    return rank() == 0


def backend(cuda: bool) -> str:
    """The process group's backends. NCCL serves only CUDA tensors; the loop's scalar sums, object
    broadcasts and barriers are CPU tensors, which gloo serves in the same group."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device_name: str) -> torch.device | None:
    """Under torchrun (one rank included): join the process group (CPU tensors over gloo, CUDA ones
    over NCCL) and return this rank's device. Otherwise None: a single process, nothing to set up."""
    if not under_torchrun() or dist.is_initialized():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    index = gpu_index(local, torch.cuda.device_count()) if cuda else 0
    if cuda:
        torch.cuda.set_device(index)
    dist.init_process_group(backend(cuda), timeout=timedelta(minutes=30))
    if rank() != 0:  # one rank reports; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces stdout for the rest of the process
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return torch.device("cuda", index) if cuda else torch.device("cpu")


def gpu_index(local: int, visible: int) -> int:
    """This rank's GPU: its local rank; or GPU 0 where a scheduler shows each process only its own
    (one visible); a local rank past several visible GPUs has none (one line, said by that rank)."""
    if local < visible:
        return local
    if visible == 1:
        return 0
    exc = UserError(
        f"local rank {local} has no GPU: {visible} visible on this node; "
        "launch at most that many processes per node (--nproc / --nproc-per-node)"
    )
    exc.every_rank = True  # rank 0 may not hit it: this rank reports it itself
    raise exc


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision_policy(precision: str = "bf16-mixed"):
    """One numerics policy for 1 and G devices, on CPU and CUDA alike: FSDP2 gathers the shards in
    their own dtype (fp32 master weights for fp32 and bf16-mixed, bf16 for pure bf16); bf16-mixed
    computes through the same autocast as one process (runtime.autocast_factory), so norms and the
    residual stream stay fp32 on any number of ranks. Gradients are reduced in fp32: the shards' own
    dtype, and for pure bf16 an fp32 reduce-scatter whose sum is rounded to bf16 once, not at every hop
    of the ring (twice the bytes on the wire for those gradients)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32 if precision == "bf16" else None)


def shard(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """FSDP2: fully_shard every decoder layer, then the root, under `mixed_precision_policy(precision)`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fulltune.model import decoder_layers

    mesh = init_device_mesh(device.type, (world_size(),))  # CPU ranks stay on CPU on a GPU machine too
    mp = mixed_precision_policy(precision)
    for layer in decoder_layers(model):  # each unit moves to the device as it is sharded: 1/G of it stays
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    assert all(_is_dtensor(p) for p in model.parameters()), "a parameter escaped sharding"


def reshard(model: torch.nn.Module) -> None:
    """Back to shards after a forward outside a training step: FSDP2 keeps the root's weights gathered
    for the backward it expects, and an optimizer built then would hold the gathered copies."""
    if not sharded():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    assert all(_is_dtensor(p) for p in model.parameters()), "a parameter is still gathered"


def load_sharded(model_cfg, precision: str, device: torch.device):
    """(model, tokenizer): θ0 sharded over the ranks, read from disk by rank 0 only.

    The other ranks build the architecture on the meta device, shard it, allocate their shards and
    receive them from rank 0 (set_model_state_dict, broadcast_from_rank0). Host memory: one full
    copy, on rank 0's host, while loading. A .gguf file is read by every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from fulltune.model import cast_weights, load_theta0

    model, tokenizer, _ = load_theta0(model_cfg, weights=is_main())
    if precision == "bf16":
        cast_weights(model, torch.bfloat16)  # pure bf16: bf16 shards (meta ones too); RoPE's inv_freq stays fp32
    on_meta = any(p.is_meta for p in model.parameters())
    full = model.state_dict() if is_main() else {}  # references to rank 0's full tensors, taken before sharding
    shard(model, device, precision)
    if any_rank(on_meta):  # otherwise every rank read the weights (.gguf): nothing to send
        if on_meta:
            model.to_empty(device=device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # non-persistent ones too (e.g. rotary frequencies): rank 0's values
            dist.broadcast(buffer, src=0)
    return model, tokenizer


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself when not sharded)."""
    return t.to_local() if _is_dtensor(t) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A scalar or tensor reduced over the shards (e.g. clip_grad_norm_'s total norm)."""
    return t.full_tensor() if _is_dtensor(t) else t


def all_sum(values: list[float]) -> list[float]:
    """Sums over ranks, in float64, as a CPU tensor (gloo's half of the group), on one rank too
    under torchrun; the values themselves in a single process."""
    if not sharded():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop request that reached one rank first)."""
    return bool(all_sum([float(flag)])[0]) if sharded() else flag


def barrier() -> None:
    if sharded():
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not sharded():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not sharded():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def my_share(step: list[list[int]], micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of a step (the sampler's micro-batches when there is one rank).

    The step's sequences are split into G contiguous, near-equal parts; each part into as few
    micro-batches of at most `micro_batch` as it allows, split evenly. Every rank gets the same
    number of micro-batches: a shorter share is padded with empty ones (null micro-batches).
    """
    g = world_size()
    if g == 1:
        return step
    flat = [i for b in step for i in b]
    bounds = [len(flat) * r // g for r in range(g + 1)]
    parts = [flat[bounds[r] : bounds[r + 1]] for r in range(g)]
    count = max(1, max(-(-len(p) // micro_batch) for p in parts))
    mine = parts[rank()]
    n = max(1, -(-len(mine) // micro_batch)) if mine else 0
    size, extra = divmod(len(mine), n) if n else (0, 0)
    out, start = [], 0
    for m in range(n):
        end = start + size + (m < extra)
        out.append(mine[start:end])
        start = end
    return out + [[] for _ in range(count - n)]


def launch(nproc: int, argv: list[str]) -> int:
    """`fulltune train CONFIG --nproc G`: torchrun's launcher on this host with G processes running
    `python -m fulltune ARGV`; returns their exit status (the first failure's).

    Ctrl-C / SIGTERM reach the launcher, which passes the signal on to the workers (they run in
    sessions of their own) and waits for them: they finish the step, checkpoint and exit."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the workers report, not the launcher
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        shutdown_timeout=900,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "fulltune", *argv)
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0

"""Host memory while θ0 loads under FSDP2: rank 0 reads the weights, the other ranks build on meta.

Prints each rank's peak RSS after `distributed.load_sharded` of the default model (SmolLM2-135M,
fp32) and its local shard bytes.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node=2 bench/fsdp_load_memory.py
"""

import resource
import sys

from fulltune import distributed as D
from fulltune.config import ModelConfig

dev = D.init("cpu")
model, tok = D.load_sharded(ModelConfig(), "fp32", dev)
sys.stderr.write(
    f"rank {D.rank()}: peak RSS after loading {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, "
    f"local shard bytes {sum(D.local(p).numel() * 4 for p in model.parameters()) / 1e9:.3f} GB\n"
)
D.shutdown()

"""The GPU catalogue the planner, the memory command and the plots fit setups into."""

# Marketed capacities in GB (1e9 bytes): a conservative reading (an "80 GB" A100 holds 80 GiB).
GPUS = {
    "rtx4090": ("RTX 4090 24GB", 24),
    "l4": ("L4 24GB", 24),
    "a10g": ("A10G 24GB", 24),
    "a6000": ("A6000 48GB", 48),
    "a100-40gb": ("A100-40GB", 40),
    "a100-80gb": ("A100-80GB", 80),
    "h100": ("H100 80GB", 80),
    "h200": ("H200 141GB", 141),
    "b200": ("B200 180GB", 180),
}

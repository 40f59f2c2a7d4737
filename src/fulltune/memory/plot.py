"""The seed's picture: stacked memory bars per setup, with a line per GPU capacity."""

from __future__ import annotations

from pathlib import Path

from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.gpus import GPUS
from fulltune.memory.spec import load_spec

DEFAULT_SETUPS = (
    ("Full FT 7B", "llama-7b", TrainSetup(precision="bf16-master")),
    ("LoRA 7B", "llama-7b", TrainSetup(method="lora")),
    ("QLoRA 7B", "llama-7b", TrainSetup(method="qlora", activation_checkpointing=True)),
    ("QLoRA 70B", "llama-70b", TrainSetup(method="qlora", activation_checkpointing=True)),
)
ORDER = (
    "weights",
    "gradients",
    "master weights",
    "optimizer state",
    "θ0 anchor",
    "θ0 model (KL)",
    "bf16 weight copies",
    "gathered layer",
    "activations",
    "logits + loss",
    "CUDA context",
)


def plot_setups(out: Path, setups=DEFAULT_SETUPS, gpus=("rtx4090", "a100-40gb", "a100-80gb", "h200")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimates = [(label, estimate(load_spec(model), setup)) for label, model, setup in setups]
    fig, ax = plt.subplots(figsize=(9, 5))
    bottoms = [0.0] * len(estimates)
    for component in ORDER:
        heights = [est.get(component) / GB for _, est in estimates]
        if any(heights):
            ax.bar([label for label, _ in estimates], heights, bottom=bottoms, label=component)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, (_label, _est) in enumerate(estimates):
        ax.text(i, bottoms[i], f"{bottoms[i]:.0f} GB", ha="center", va="bottom", fontsize=9)
    for gpu in gpus:
        name, cap = GPUS[gpu]
        ax.axhline(cap, ls="--", lw=0.9, color="grey")
        ax.text(
            1.005, cap, name, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8, color="dimgrey"
        )
    ax.set_ylabel("GB (sum of components, micro-batch 1 × 2048 tokens)")
    ax.set_title("Training memory by component")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

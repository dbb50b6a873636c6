"""Time training steps of the ORIGINAL Zoology PyTorch model (for mqar_throughput).

Runs in a separate Python that has PyTorch (and einops, pydantic) installed and
a checkout of HazyResearch/zoology at a commit whose LanguageModel returns logits (dbcb60d);
it imports nothing from this project. It builds the figure-2 model through the original's
own config classes, feeds one batch of random tokens with ``num_kv_pairs`` labelled
positions per row (-100 elsewhere; the cost does not depend on the token values), and times
forward + cross-entropy + backward + AdamW step as the original's training loop does:

    PYTHON original_zoology_step.py ZOOLOGY_DIR '{"mixer": "attention", "d_model": 64, ...}'

Prints one JSON line: the median seconds per step, the timed steps, torch's thread count.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _stochastic_depth_without_torchvision(torch) -> None:
    """The original imports torchvision only for StochasticDepth, the identity at its
    drop_path=0; a CPU-only PyTorch may lack a matching torchvision, so stand in for it."""
    try:
        import torchvision.ops  # noqa: F401
        return
    except (ImportError, RuntimeError):
        import types

    class StochasticDepth(torch.nn.Module):
        def __init__(self, p: float, mode: str):
            super().__init__()
            if p != 0.0:
                raise NotImplementedError("only drop_path=0 (the figure-2 setting)")

        def forward(self, x):
            return x

    ops = types.ModuleType("torchvision.ops")
    ops.StochasticDepth = StochasticDepth
    sys.modules["torchvision"] = types.ModuleType("torchvision")
    sys.modules["torchvision.ops"] = ops


def main() -> None:
    zoology_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, zoology_dir)
    import torch

    _stochastic_depth_without_torchvision(torch)
    from zoology.config import ModelConfig, ModuleConfig
    from zoology.model import LanguageModel

    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(0)
    L, V, d = spec["seq_len"], spec["vocab_size"], spec["d_model"]
    mixers = {
        "attention": ModuleConfig(name="zoology.mixers.attention.MHA",
                                  kwargs={"dropout": 0.1, "num_heads": 1}),
        "base_conv": ModuleConfig(name="zoology.mixers.base_conv.BaseConv",
                                  kwargs={"l_max": L, "kernel_size": [3, -1, 3, -1]}),
    }
    model = LanguageModel(ModelConfig(
        d_model=d, n_layers=2, vocab_size=V, sequence_mixer=mixers[spec["mixer"]],
        max_position_embeddings=L if spec["mixer"] == "attention" else 0,
        state_mixer=ModuleConfig(name="torch.nn.Identity", kwargs={})))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    B = spec["batch_size"]
    inputs = torch.randint(0, V, (B, L))
    labels = torch.full((B, L), -100)
    positions = torch.rand(B, L).argsort(dim=1)[:, :spec["num_kv_pairs"]]
    labels.scatter_(1, positions, torch.randint(V // 2, V, positions.shape))

    positions_ids = torch.arange(L)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        # Explicit position ids: the original's default puts them on "cuda" (dbcb60d).
        logits = model(inputs, position_ids=positions_ids)
        loss = loss_fn(logits.view(-1, logits.shape[-1]), labels.view(-1))
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["repeats"])]
    print(json.dumps({"seconds_per_step": statistics.median(times), "runs": len(times),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

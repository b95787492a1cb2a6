"""Why folded W2A2 runs diverge on the claims benchmark: the first steps of a folded LSQ run
from the study's seed-0 FP run, with one folded layer's BatchNorm scale, running variance
and the share of its channels whose quantized weights are all zero.

    python experiments/deploy/fold_probe.py [BITS] [STEPS] [LAYER] [overrides ...]

Needs the deploy study's FP run (`make deploy`, multirun/deploy/fp/...-s0).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from oscbench.launch.build import build
from oscbench.launch.compose import compose
from oscbench.launch.config import validate
from oscbench.quant.fold import QConvBn2d

FP_RUN = "multirun/deploy/fp/fp32-mobilenetv2_small-glyphs-s0"


def main(bits: int, steps: int, name: str, overrides: list[str]) -> None:
    base = ["experiment=claims", "method=lsq", f"bits={bits}", "bn_fold.enabled=true", "seed=0"]
    spec = validate(compose([*base, "device=cpu", f"init_from={FP_RUN}", *overrides]))
    built = build(spec)
    model = built.model.train()
    layer = model.get_submodule(name)
    if not isinstance(layer, QConvBn2d):
        raise SystemExit(f"{name} is not a folded conv; name one of the model's QConvBn2d")
    t = spec.trainer
    opt = torch.optim.SGD(
        model.parameters(), lr=t.finetune_lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    batches = built.data.train_batches(0, t.batch_size)
    for step in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            codes = layer.weight_quantizer.to_int(layer.quantizer_input())
            dead = (codes.flatten(1) == 0).all(dim=1).float().mean().item()
        print(
            f"step {step:3d}  loss {loss.item():.3f}  |gamma| max {layer.bn.weight.abs().max():.3g}"
            f"  running var max {layer.bn.running_var.max():.3g}  all-zero channels {dead:.0%}"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    bits = int(args.pop(0)) if args else 2
    steps = int(args.pop(0)) if args else 10
    name = args.pop(0) if args else "blocks.2.0.conv_pw"
    main(bits, steps, name, args)

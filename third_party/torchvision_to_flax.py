"""A torchvision-layout ResNet `state_dict` -> Flax variables of `debkd_jax.models.imagenet_resnet*`.

    python -m third_party.torchvision_to_flax --state_dict=resnet34-b627a593.pth --out=resnet34.msgpack

prints the model to name beside it, e.g. `--config.teacher.model=imagenet_resnet34
--config.teacher.variables=resnet34.msgpack`. Any `state_dict` with torchvision's keys (`conv1`, `bn1`,
`layer{s}.{j}.conv1 ...`, `layer{s}.0.downsample.{0,1}`, `fc`) converts: torchvision's own checkpoints, timm's
`resnet*` (same keys), or `third_party/torch_peer/torchvision_resnet.py`. A checkpoint that wraps it
(`{"state_dict":
...}`, `{"model": ...}`) or prefixes it (`module.` from DataParallel) is unwrapped.

Mapping (conv OIHW -> HWIO, linear (out, in) -> (in, out), BatchNorm weight/bias/running_mean/running_var ->
params scale/bias + batch_stats mean/var):

    conv1, bn1                      -> stem_conv, stem_bn
    layer{s}.{j}.convK / bnK        -> block_{i}/convK / bnK, i counting blocks over all stages in order
    layer{s}.{j}.downsample.0 / .1  -> block_{i}/proj_conv / proj_bn
    fc                              -> head

Inputs: pretrained torchvision weights expect `(x / 255 - mean) / std` with ImageNet's mean and std, while
debkd_jax feeds every model `(x / 255 - 0.5) / 0.5`. The `torchvision_resnet*` presets (what the command line
prints by default) map the one to the other inside the model, so a converted pretrained teacher sees the
inputs it was trained on; `--inputs=project` names the `imagenet_resnet*` preset instead, for weights trained
on the project's inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_RENAME = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}


def _numpy(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)


def unwrap(state_dict: Mapping) -> dict:
    """The plain `state_dict` inside a checkpoint: `{"state_dict": sd}` / `{"model": sd}` unwrapped, a
    `module.` prefix removed."""
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def architecture(state_dict: Mapping) -> dict:
    """What the keys and shapes say: {'stage_sizes', 'bottleneck', 'widths', 'stem_width', 'num_classes'}."""
    sd = unwrap(state_dict)
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError(
            "not a torchvision-layout ResNet state_dict: it needs conv1.weight and fc.weight keys "
            f"(found e.g. {sorted(sd)[:5]})"
        )
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := _BLOCK.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)) or not stages:
        raise ValueError(f"torchvision ResNet stages must be layer1..layerN, found {stages}")
    bottleneck = "layer1.0.conv3.weight" in sd
    return {
        "stage_sizes": tuple(len(blocks[s]) for s in stages),
        "bottleneck": bottleneck,
        "widths": tuple(
            int(sd[f"layer{s}.0.conv1.weight" if not bottleneck else f"layer{s}.0.conv2.weight"].shape[0])
            for s in stages
        ),
        "stem_width": int(sd["conv1.weight"].shape[0]),
        "num_classes": int(sd["fc.weight"].shape[0]),
    }


def model_name(arch: dict) -> str | None:
    """The `debkd_jax.models` preset with this architecture, or None."""
    presets = {
        ((2, 2, 2, 2), False, (64, 128, 256, 512), 64): "imagenet_resnet18",
        ((3, 4, 6, 3), False, (64, 128, 256, 512), 64): "imagenet_resnet34",
        ((3, 4, 6, 3), True, (64, 128, 256, 512), 64): "imagenet_resnet50",
        ((1, 1), False, (8, 16), 8): "imagenet_resnet_tiny",
    }
    return presets.get((arch["stage_sizes"], arch["bottleneck"], arch["widths"], arch["stem_width"]))


def with_torchvision_inputs(name: str | None) -> str | None:
    """The preset of the same network on torchvision's input normalization (`imagenet_resnet18` ->
    `torchvision_resnet18`)."""
    return None if name is None else name.replace("imagenet_", "torchvision_", 1)


def convert(state_dict: Mapping) -> dict:
    """{'params': ..., 'batch_stats': ...} for the Flax ResNet with the ImageNet stem of the same architecture
    (`architecture`); every tensor of the `state_dict` is used once (`num_batches_tracked` is dropped), else
    ValueError naming the ones left over."""
    sd = {k: _numpy(v) for k, v in unwrap(state_dict).items() if not k.endswith("num_batches_tracked")}
    arch = architecture(sd)
    params: dict = {}
    stats: dict = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"the state_dict lacks {key!r}")
        used.add(key)
        return sd[key]

    def conv(src: str, dst: tuple[str, ...]) -> None:
        _put(params, dst, {"kernel": np.transpose(take(f"{src}.weight"), (2, 3, 1, 0))})

    def bn(src: str, dst: tuple[str, ...]) -> None:
        _put(params, dst, {"scale": take(f"{src}.weight"), "bias": take(f"{src}.bias")})
        _put(stats, dst, {"mean": take(f"{src}.running_mean"), "var": take(f"{src}.running_var")})

    conv("conv1", ("stem_conv",))
    bn("bn1", ("stem_bn",))
    i = 0
    for s, size in enumerate(arch["stage_sizes"], start=1):
        for j in range(size):
            src, dst = f"layer{s}.{j}", f"block_{i}"
            for k in (1, 2, 3) if arch["bottleneck"] else (1, 2):
                conv(f"{src}.conv{k}", (dst, f"conv{k}"))
                bn(f"{src}.bn{k}", (dst, f"bn{k}"))
            if f"{src}.downsample.0.weight" in sd:
                conv(f"{src}.downsample.0", (dst, _RENAME["downsample.0"]))
                bn(f"{src}.downsample.1", (dst, _RENAME["downsample.1"]))
            i += 1
    params["head"] = {"kernel": take("fc.weight").T.copy(), "bias": take("fc.bias")}
    if left := sorted(set(sd) - used):
        raise ValueError(f"state_dict tensors with no place in the Flax ResNet: {left[:10]}")
    return {"params": params, "batch_stats": stats}


def _put(tree: dict, path: tuple[str, ...], leaves: dict) -> None:
    for name in path:
        tree = tree.setdefault(name, {})
    tree.update(leaves)


def main(argv=None) -> None:
    import argparse

    import torch
    from flax import serialization

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state_dict", required=True, help="a file saved with torch.save")
    parser.add_argument("--out", required=True, help="the Flax msgpack file to write (teacher.variables)")
    parser.add_argument(
        "--inputs",
        choices=("torchvision", "project"),
        default="torchvision",
        help="the input normalization the weights were trained on: torchvision's ImageNet mean/std "
        "(pretrained weights) or the project's (x / 255 - 0.5) / 0.5",
    )
    args = parser.parse_args(argv)
    state_dict = torch.load(args.state_dict, map_location="cpu", weights_only=True)
    arch = architecture(state_dict)
    variables = convert(state_dict)
    with open(args.out, "wb") as f:
        f.write(serialization.msgpack_serialize(variables))
    name = model_name(arch)
    if args.inputs == "torchvision":
        name = with_torchvision_inputs(name)
    model = name or f"(no preset: stages {arch['stage_sizes']}, widths {arch['widths']})"
    print(
        f"wrote {args.out}: --config.teacher.model={model} --config.teacher.variables={args.out} "
        f"({arch['num_classes']} classes)"
    )


if __name__ == "__main__":
    main()

"""A timm model by name, sized for the notebook's images, with pretrained weights read offline from a file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def timm_model(
    name: str,
    *,
    num_classes: int,
    img_size: int | None = None,  # the side of the training images; passed where the architecture fixes it
    pretrained: str | os.PathLike | None = None,  # a weights file (e.g. from find_file); None: random init
    **options,  # more of timm.create_model's keywords: in_chans, drop_rate, drop_path_rate, ...
) -> nn.Module:
    """``timm.create_model(name, num_classes=...)`` for any architecture, CNN or ViT, with no download.

    ``img_size`` reaches the architectures whose input size is fixed (timm's ``fixed_input_size``: ViTs,
    Swin, DeiT, ...), so a ViT trains on 32-pixel images as it would on 224; CNNs take any size and do not
    get it. ``pretrained`` is a weights file (a state dict: ``model.safetensors`` or ``pytorch_model.bin``
    from timm's Hugging Face pages, a ``.pth``; or Google's ``.npz`` for ViTs), loaded the way timm loads
    its own downloads (``pretrained_cfg_overlay=dict(file=...)``): the classifier starts afresh when
    ``num_classes`` differs from the weights' (1000 for ImageNet), the first convolution is adapted to
    ``in_chans``, a ViT's position embeddings are resized to ``img_size``. Every other weight must come
    from the file: a file for another architecture, or one timm reads none of, is an error naming the
    weights left at random, never a model trained from a partly random start. To check that, the model is
    built twice from the file, and a weight that differs between the two came from its random start.
    Weights you trained yourself (``model_ema.pth``) load with ``load_weights`` into a model built with
    ``pretrained=None``, classifier included.

    Example:
        >>> model = timm_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 5])
        >>> torch.save(model.state_dict(), "vit.pth")  # as if downloaded from the model's timm page
        >>> tuned = timm_model("vit_tiny_patch16_224", num_classes=5, img_size=64, pretrained="vit.pth")
        >>> torch.equal(tuned.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)
        True
    """
    import timm  # imported here: the rest of ema_kit needs neither timm nor torchvision

    config = timm.models.get_pretrained_cfg(name)
    if img_size is not None and config is not None and config.fixed_input_size:
        options["img_size"] = img_size
    if isinstance(pretrained, bool):
        raise TypeError(
            f"pretrained must be the path of a weights file, or None for a random init; got {pretrained!r} "
            "(timm's pretrained=True downloads, which a Kaggle kernel with the internet off cannot). Attach "
            "the weights and pass their path: find_file('model.safetensors', inputs=['<input slug>'])."
        )
    if pretrained is None:
        return timm.create_model(name, num_classes=num_classes, **options)
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={str(pretrained)!r} is not a file: pass the weights file's path")
    from_file = dict(
        pretrained=True,
        # timm's "custom_load" reads Google's .npz checkpoints; any other file is a state dict.
        pretrained_cfg_overlay=dict(file=str(path), custom_load=path.suffix == ".npz"),
    )
    model = timm.create_model(name, num_classes=num_classes, **from_file, **options)
    # A twin from other random numbers (torch's generator is left as it was): a weight read from the file
    # is the same in both, one left at its random start is not.
    with torch.random.fork_rng(devices=[]):
        twin = timm.create_model(name, num_classes=num_classes, **from_file, **options)
    # timm starts the classifier afresh when num_classes differs from the weights' (its config's) count.
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifiers = {classifier} if isinstance(classifier, str) else set(classifier)
    fresh = classifiers if num_classes != model.pretrained_cfg.get("num_classes") else set()
    untouched = [
        parameter_name
        for (parameter_name, parameter), other in zip(model.named_parameters(), twin.parameters())
        if not torch.equal(parameter, other) and parameter_name.rsplit(".", 1)[0] not in fresh
    ]
    if untouched:
        raise ValueError(
            f"{path} left {len(untouched)} of {name}'s weights at their random start (e.g. "
            f"{', '.join(untouched[:3])}): it holds weights for another architecture, or under other names. "
            f"Attach the weights published for {name!r} (its timm page's model.safetensors), or pass "
            "pretrained=None to train from scratch."
        )
    return model

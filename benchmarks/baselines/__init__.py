"""Baselines in PyTorch for the occlusion sweep: the same networks, the paper's procedure, Captum.

`vgg` defines a VGG-16-sized network in Flax NNX (random weights, the paper's model size); `torch_models`
rebuilds the three ported face networks and that VGG in PyTorch from the very same weight arrays;
`reference` runs occlusion as the paper describes it (one cloned image per patch through a DataLoader) and with
Captum's `Occlusion`. PyTorch and Captum are optional (the ``baseline`` extra); only `vgg` imports without them.
"""

__all__: list[str] = []

"""Tickets out of and into the library: PyTorch state dicts of numpy arrays.

`to_state_dict(model, params, model_state, mask)` gives {PyTorch name: numpy array} with
PyTorch's layouts, which `safetensors.numpy.save_file` writes; `from_state_dict(model,
state_dict, sample_input)` reads one back (ours, or a PyTorch checkpoint of the matching
definition) with a one-line error for the first missing, unexpected or mis-shaped key. The names
are in `naming` (the Adversarial Pruning Benchmark's for resnet-18 and vgg-16-hydra); PyTorch
definitions of every exported architecture are in `torch_models` (needs torch, the `interop`
extra). No torch is needed here.
"""

from sparse_robust.interop.convert import (MASK_SUFFIX, Imported, expected_keys, from_state_dict,
                                           to_state_dict)
from sparse_robust.interop.naming import Layer, layer_table

__all__ = ["MASK_SUFFIX", "Imported", "Layer", "expected_keys", "from_state_dict", "layer_table",
           "to_state_dict"]

"""SecureMark-DL privacy partitioning (Xu, Han, Zhang & Zhang, paper 002, sections III and VI-A).

Data owners train a shared model without showing their images to the server: each runs the
local part of the model, passes its images through a private adversarial defender, and uploads
only hidden states; the server trains the rest. The attacks test how much of the images the
uploaded states still reveal.

* ``split``: a ``models.MLP`` split at a named layer into local and remote parts whose
  composition is the unsplit model bit for bit (the paper's 5-layer, 900-unit MNIST network).
* ``networks``: the dense decoders: the defender designs and the inverse-network attacks.
* ``defense``: Algorithm 1 with per-owner defenders (our reading of Eq. 3, with the defender
  weight lambda), each design's owners one stacked ensemble; accuracy of the deployed pipeline.
* ``attacks``: the inverse-network attack (one design's attackers one ensemble), the
  optimisation attack, and MSE / SSIM / reprint accuracy.
* ``study``: the Table I / II study (no / single / multiple defenders, a defender-weight sweep);
  ``cli``: ``jipguard partition``.

Shape suffixes (``h_MxNxD``):

| letter | meaning |
|---|---|
| N | images |
| B | images of one owner's batch |
| O | data owners |
| S | images of one owner's share |
| T | rounds (steps) of an epoch |
| M | stacked members: owners of one defender design, or targets of one attack design |
| D | the hidden state's width (the local part's output) |
| H, W, C | image height, width, channels |
| K | classes (logits) |
"""

from jipguard.partition.attacks import InverseConfig, invert, optimisation_attack, reconstruction_metrics, train_inverse
from jipguard.partition.defense import DefenseConfig, Trained, accuracy, obfuscate, train, uploaded_states
from jipguard.partition.networks import ATTACKS, DEFENDERS, MULTIPLE, Decoder
from jipguard.partition.split import Split, compose, merge_params, paper_mlp, split_model, split_params

__all__ = [
  "ATTACKS",
  "DEFENDERS",
  "MULTIPLE",
  "Decoder",
  "DefenseConfig",
  "InverseConfig",
  "Split",
  "Trained",
  "accuracy",
  "compose",
  "invert",
  "merge_params",
  "obfuscate",
  "optimisation_attack",
  "paper_mlp",
  "reconstruction_metrics",
  "split_model",
  "split_params",
  "train",
  "train_inverse",
  "uploaded_states",
]

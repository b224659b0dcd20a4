"""SecureMark-DL privacy partitioning (Xu, Han, Zhang & Zhang, paper 002, sections III and VI-A).

Data owners train a shared model without showing their images to the server: each runs the
local part of the model, passes its images through a private adversarial defender, and uploads
only hidden states; the server trains the rest. The attacks test how much of the images the
uploaded states still reveal.

* ``split``: a ``models.MLP`` (the paper's 5-layer, 900-unit MNIST network) or a staged
  :class:`ConvNet` (the LFW CNN, VGG-19-BN) split at a named layer / pool into local and remote
  parts whose composition is the unsplit model bit for bit.
* ``networks``: the decoders: the defender designs and the inverse-network attacks (dense,
  Attack_7's 1-D deconvolution, and the conv mirrors of a local part).
* ``defense``: Algorithm 1 with per-owner defenders (our reading of Eq. 3, with the defender
  weight lambda), each design's owners one stacked ensemble; accuracy of the deployed pipeline.
* ``attacks``: the inverse-network attack (one design's attackers one ensemble, on the local
  part's states or on any states the attacker holds), the optimisation attack, and MSE / SSIM /
  reprint accuracy / DPD_aux.
* ``perceptual``: DPD_aux, the stand-in for the paper's DPD (features of a CNN trained on the
  auxiliary images: no pretrained perceptual network exists offline).
* ``study``: the Table I / II study (no / single / multiple defenders, a defender-weight sweep,
  a fingerprinted setting) and Table III (the server colluding with one owner);
  ``convstudy``: the conv settings (a conv net split at pool1 / pool2 / pool3, with a
  fingerprinted setting); ``cli``: ``jipguard partition``.

Shape suffixes (``h_MxNxD``):

| letter | meaning |
|---|---|
| N | images |
| B | images of one owner's batch |
| O | data owners |
| S | images of one owner's share |
| T | rounds (steps) of an epoch |
| M | stacked members: owners of one defender design, or targets of one attack design |
| D | the hidden state's width (the local part's output; a conv part's is H x W x C) |
| H, W, C | image height, width, channels |
| K | classes (logits) |
"""

from jipguard.partition.attacks import (
  InverseConfig,
  fit_inverse,
  invert,
  optimisation_attack,
  reconstruction_metrics,
  train_inverse,
)
from jipguard.partition.defense import (
  DefenseConfig,
  Trained,
  accuracy,
  fingerprint_bit_errors,
  fingerprint_penalty,
  fingerprint_secret,
  obfuscate,
  train,
  uploaded_states,
)
from jipguard.partition.networks import ATTACKS, CONV_ATTACKS, CONV_DEFENDERS, DEFENDERS, MULTIPLE, ConvDecoder, Decoder
from jipguard.partition.perceptual import PerceptualConfig, PerceptualDistance
from jipguard.partition.split import (
  ConvNet,
  Split,
  build,
  compose,
  lfw_cnn,
  merge_params,
  merge_variables,
  paper_mlp,
  split_model,
  split_params,
  split_variables,
  vgg19_bn,
)

__all__ = [
  "ATTACKS",
  "CONV_ATTACKS",
  "CONV_DEFENDERS",
  "ConvDecoder",
  "ConvNet",
  "DEFENDERS",
  "Decoder",
  "DefenseConfig",
  "InverseConfig",
  "MULTIPLE",
  "PerceptualConfig",
  "PerceptualDistance",
  "Split",
  "Trained",
  "accuracy",
  "build",
  "compose",
  "fingerprint_bit_errors",
  "fingerprint_penalty",
  "fingerprint_secret",
  "fit_inverse",
  "invert",
  "lfw_cnn",
  "merge_params",
  "merge_variables",
  "obfuscate",
  "optimisation_attack",
  "paper_mlp",
  "reconstruction_metrics",
  "split_model",
  "split_params",
  "split_variables",
  "train",
  "train_inverse",
  "uploaded_states",
  "vgg19_bn",
]

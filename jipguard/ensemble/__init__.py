"""Stacked ensembles: M models of one architecture as one pytree, trained and applied as one program.

Every jipguard method that needs "M models of one architecture" uses this package: IPProtect's
bootstrapped Omega_Tr / Omega_V models and its label-noised sellers, the watermark learners and
shadow models, SecureMark's per-customer models. An ensemble's leaves carry a leading member
axis: ``params = jax.vmap(model.init)(keys, x)``.

* ``members``: :class:`EnsembleState`, :func:`apply` / :func:`apply_each` / :func:`predict` /
  :func:`accuracy`, and the calls of methods that optimise inputs against members:
  :func:`prepare`, :func:`value_and_input_grad`, :func:`jit`.
* ``training``: :class:`EnsembleTrainer` (one jitted program per epoch; sharded over a mesh).
* ``checkpoints``: :class:`Checkpointing`, resume, :func:`load_checkpoint`.
* ``projection``: a secret linear read-out of chosen kernels and the ``penalty`` that writes a
  vector into them (SecureMark-DL's fingerprints, in ``fingerprint`` and ``partition``).
* ``_cpu``: the CPU fast paths, chosen inside the package (unrolled conv members, Eigen
  convolutions, cache-sized member groups, a shared input layer).

Shape suffixes (``logits_MxBxK``):

| letter | meaning |
|---|---|
| M | members |
| G | members per group (pass) |
| S | samples of the pool per member |
| N | images of the pool, or of a call |
| B | images of one batch (per member in training) |
| H, W, C | image height, width, channels |
| K | classes (logits) |
| T | steps of an epoch |
| D, O, F | shared input: flattened input size, input layer width, a group's G * O outputs side by side |
"""

from jipguard.ensemble._cpu import cpu_pass_bytes
from jipguard.ensemble.checkpoints import CHECKPOINT_INTERVAL_S, Checkpointing, load_checkpoint
from jipguard.ensemble.members import (
  LAYOUTS,
  EnsembleState,
  Members,
  accuracy,
  apply,
  apply_each,
  digest,
  jit,
  map_members,
  predict,
  prepare,
  value_and_input_grad,
)
from jipguard.ensemble.training import EnsembleTrainer, FitResult

__all__ = [
  "CHECKPOINT_INTERVAL_S",
  "LAYOUTS",
  "Checkpointing",
  "EnsembleState",
  "EnsembleTrainer",
  "FitResult",
  "Members",
  "accuracy",
  "apply",
  "apply_each",
  "cpu_pass_bytes",
  "digest",
  "jit",
  "load_checkpoint",
  "map_members",
  "predict",
  "prepare",
  "value_and_input_grad",
]

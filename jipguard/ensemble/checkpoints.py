"""Checkpoints of an ensemble's training (orbax): save, resume, refuse another configuration.

A training saves ``(state, history, meta)`` per epoch step of an orbax ``CheckpointManager``.
``meta`` describes the configuration (model, batch size, members, a digest of the data and
keys, and what the caller adds); a run resumes only from a checkpoint of the same ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from jipguard import rundir
from jipguard.ensemble.members import EnsembleState

PyTree = Any

# Seconds between the checkpoints of the experiments' trainings (IPProtect's sellers and
# sample_models, the watermark learners); the last epoch and the one an exception stops at are
# always saved (``EnsembleTrainer.fit``). Saving every epoch doubled ``sample_models`` in the main
# job: 110 MLPs' state is 355 MB, ~1 s to save on 2 cores, and one of their epochs (300 images,
# batch 32) takes ~1 s (fit of 10 epochs: 11.4 s without checkpoints, 21.9 s saving each epoch,
# 12.9 s saving every 10th).
CHECKPOINT_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  """Where and how often :meth:`EnsembleTrainer.fit` saves.

  Attributes:
    directory: Orbax checkpoint directory; training resumes from its latest epoch and refuses
      a checkpoint of a different configuration.
    every: Save every this many epochs (and always after the last).
    interval_s: Skip a due save when the last one (or the start) is less than this many
      seconds ago. A save is a device-to-host copy of every member's parameters and optimiser
      state (110 MLPs: 355 MB, ~1 s on 2 cores, as long as one of ``sample_models``' epochs).
      An exception that stops training first saves the finished epochs (see ``fit``). Single
      process only: with several (``jax.distributed``) every due epoch is saved, as the
      processes' clocks and exceptions are their own and a save is collective.
    fingerprint: Extra configuration that must match on resume (e.g. optimiser settings,
      which optax cannot describe).
  """

  directory: str | os.PathLike
  every: int = 1
  interval_s: float = 0.0
  fingerprint: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.every < 1 or self.interval_s < 0:
      raise ValueError(f"checkpoint every must be >= 1 and interval_s >= 0, got {self.every}, {self.interval_s}")


def _deleted(tree: PyTree) -> bool:
  """Whether any array of ``tree`` was deleted (donated to a later computation)."""
  return any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(tree))


class EpochCheckpoints:
  """The checkpoints of one ``fit`` call: resume, periodic saves, the save on the way out.

  Args:
    cfg: Where and how often.
    meta: The configuration a checkpoint must match (JSON-able).
    num_members: M, the real members (state beyond them is mesh padding, never saved).
    desc: The training's name, for log messages.
  """

  def __init__(self, cfg: Checkpointing, meta: Mapping[str, Any], num_members: int, desc: str):
    self.cfg, self.meta, self.m, self.desc = cfg, {**meta, **dict(cfg.fingerprint)}, num_members, desc
    self.manager = ocp.CheckpointManager(
      os.path.abspath(cfg.directory), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    self.saved = 0
    self.last_save = time.monotonic()
    # Saves are collective across processes: each process's clock and exceptions are its own,
    # so with several processes every due epoch is saved and nothing is saved on the way out.
    self.single_process = jax.process_count() == 1

  def restore(self, state: EnsembleState) -> tuple[EnsembleState, list[dict[str, Any]], int]:
    """The latest checkpoint, or ``state`` unchanged at epoch 0; ConfigMismatch if it is of another run."""
    epoch = self.manager.latest_step()
    if epoch is None:
      return state, [], 0
    saved_meta = self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    rundir.check_same_config(saved_meta, self.meta, f"checkpoint {self.manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.manager.restore(
      epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore())
    )
    self.saved = int(epoch)
    return restored["state"], list(restored["history"]), int(epoch)

  def save(self, epoch: int, state: EnsembleState, history: list[dict[str, Any]]) -> None:
    """Saves the real members' ``state`` after ``epoch`` (1-based) epochs."""
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.member(slice(0, self.m))),
        history=ocp.args.JsonSave(history),
        meta=ocp.args.JsonSave(self.meta),
      ),
    )
    self.saved, self.last_save = epoch, time.monotonic()

  def after_epoch(self, epoch: int, epochs: int, state: EnsembleState, history: list[dict[str, Any]]) -> None:
    """Saves after ``epoch`` of ``epochs`` when due (every ``cfg.every``, at most every
    ``cfg.interval_s`` seconds on one process) and always after the last."""
    due = epoch % self.cfg.every == 0 and (
      not self.single_process or time.monotonic() - self.last_save >= self.cfg.interval_s
    )
    if due or epoch == epochs:
      self.save(epoch, state, history)

  def on_exit(
    self,
    finished: tuple[int, EnsembleState],
    in_flight: tuple[int, EnsembleState, Any] | None,
    history: list[dict[str, Any]],
    record: Callable[..., dict[str, Any]],
  ) -> None:
    """Keeps the finished epochs when an exception stops training (single process only).

    Args:
      finished: ``(epochs done, their state)``.
      in_flight: The epoch dispatched after them and not yet checked, ``(epoch, state,
        metrics)``, or None. When ``finished``'s state was donated to it, that epoch is
        completed instead and kept if its losses are finite.
      history: The finished epochs' records.
      record: ``record(epoch, state, metrics)``, an epoch's history record
        (FloatingPointError when a loss is not finite).
    """
    if not self.single_process:
      return
    try:
      if not _deleted(finished[1]):
        if finished[0] > self.saved:
          self.save(finished[0], finished[1], history)
      elif in_flight is not None:
        epoch, state, epoch_metrics = in_flight
        self.save(epoch + 1, state, [*history, record(epoch, state, epoch_metrics)])
    except FloatingPointError:
      pass  # The interrupted epoch diverged: nothing sound to keep.
    except Exception as e:  # noqa: BLE001 (best effort: the original exception goes on)
      logging.warning("%s: could not save the finished epochs on the way out: %r", self.desc, e)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_checkpoint(checkpoint_dir: str | os.PathLike, template: EnsembleState) -> EnsembleState:
  """Restores the latest ensemble saved by :meth:`EnsembleTrainer.fit` in ``checkpoint_dir``.

  Args:
    checkpoint_dir: The directory given to ``fit``.
    template: A state of the same structure (e.g. ``trainer.init(keys, x)``).

  Raises:
    FileNotFoundError: No checkpoint there.
  """
  with ocp.CheckpointManager(os.path.abspath(checkpoint_dir)) as manager:
    epoch = manager.latest_step()
    if epoch is None:
      raise FileNotFoundError(f"no ensemble checkpoint in {checkpoint_dir}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

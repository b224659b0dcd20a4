"""The model-level study (section VI-B, Figs. 6-9, Table III) and the vendor's trace tool.

:func:`run_collusion` trains a base model, fine-tunes one fingerprinted copy per customer as one
ensemble, and measures detection and false alarm against the number of colluders under
averaging, fine-tuning (10% of the base's batches) and magnitude pruning with sparse
fine-tuning; the accuracy with and without the fingerprint; and the costs of embedding and
extraction relative to training. :func:`trace` names the colluders behind saved models.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import data, ensemble, models, rundir
from jipguard.fingerprint import bibd, codes, crc, embedding, studies, tracing, vendor

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CollusionConfig:
  """The model-level study: fingerprinted MLP copies under attack."""

  dataset: str = "fashion_mnist_subset"  # A jipguard dataset name or path (data.load).
  data_dir: str = ""  # Local copy / tfds data_dir of a named dataset.
  hidden: int = 256  # Width of the MLP's two hidden layers.
  design: str = "121,11,1"  # The identity codebooks' (v,k,1) design (or pg<q> / ag<q>).
  books: int = 2  # Codebooks side by side.
  crc_bits: int = 60  # Community code bits (0: none); 60 + 2 x 121 = the paper's 302.
  customers: int = 16  # Fingerprinted copies (ensemble members).
  base_epochs: int = 10  # Training of the base model.
  embed_epochs: int = 15  # Fine-tuning of each copy with the fingerprint regulariser.
  batch_size: int = 128  # Minibatch of every training.
  lr: float = 1e-3  # Adam's learning rate (base, embedding and the attacker's fine-tuning).
  mu: float = embedding.PAPER_MU  # Embedding weight of Eq. 27.
  tau: float = embedding.PAPER_TAU  # Eq. 30's threshold.
  projection_std: float = embedding.PROJECTION_STD  # Std of X's entries (the paper gives none).
  layers: str = "Dense_0,Dense_1"  # The fingerprinted layers (their kernels' paths).
  max_colluders: int = 15  # Averaging coalitions of 1..max_colluders customers.
  coalitions: int = 50  # Random coalitions per size (averaging).
  attack_sizes: str = "1,2,4,6,8,10,12,15"  # Coalition sizes under fine-tuning and pruning.
  attack_coalitions: int = 4  # Coalitions per size under fine-tuning and pruning (each a model).
  finetune_fraction: float = 0.1  # The attacker fine-tunes for this share of the base's batches.
  prune_alphas: str = "0.1,0.3,0.5,0.7,0.9"  # Pruning rates (each then sparse fine-tuned).
  independent: bool = True  # Also train copies independently from scratch and average them.
  measure_costs: bool = True  # Time an epoch with and without the regulariser, and extraction (Table III).
  seed: int = 0  # Data order, customers, coalitions (the secret is drawn with `secrets`).

  def __post_init__(self):
    try:
      design = bibd.design(self.design)
    except ValueError as err:
      raise ValueError(f"--design: {err}") from None
    checks = [
      (self.hidden >= 1, "hidden must be >= 1"),
      (self.books >= 1 and self.crc_bits >= 0, "books must be >= 1 and crc_bits >= 0"),
      (2 <= self.customers <= design.b**self.books, f"customers must be in [2, {design.b**self.books}]"),
      (min(self.base_epochs, self.embed_epochs, self.batch_size) >= 1, "epochs and batch_size must be >= 1"),
      (self.lr > 0 and self.mu > 0 and self.projection_std > 0, "lr, mu and projection_std must be > 0"),
      (0 < self.tau < 1, "tau must be in (0, 1)"),
      (1 <= self.max_colluders <= self.customers, "max_colluders must be in [1, customers]"),
      (self.coalitions >= 1 and self.attack_coalitions >= 1, "coalitions must be >= 1"),
      (
        all(1 <= k <= self.customers for k in studies._ints(self.attack_sizes)),
        "attack_sizes must be in [1, customers]",
      ),
      (0 < self.finetune_fraction <= 1, "finetune_fraction must be in (0, 1]"),
      (all(0 <= a < 1 for a in studies._floats(self.prune_alphas)), "prune_alphas must be in [0, 1)"),
      (bool(self.layers.strip()), "layers must name at least one layer"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"{message} (--{message.split()[0]})")

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(x.strip() for x in self.layers.split(",") if x.strip())

  def codebook(self) -> codes.CombinedCodebook:
    return codes.CombinedCodebook(books=(codes.Codebook.of(bibd.design(self.design)),) * self.books)

  def layout(self) -> embedding.Layout:
    v = bibd.design(self.design).v
    return embedding.Layout(crc_bits=self.crc_bits, code_lengths=(v,) * self.books)


# ------------------------------------------------------------------------ model files


def save_params(path: str, params: PyTree, **meta: Any) -> None:
  """One model's parameters as an npz of ``"Dense_0/kernel"``-named arrays (+ ``__meta__`` JSON)."""
  flat = {embedding.path_name(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
  rundir.write_npz(path, **flat, __meta__=np.array(rundir.dumps(meta)))


def load_params(path: str) -> PyTree:
  """The parameters of :func:`save_params` (nested dicts).

  Raises:
    OSError: Missing file. ValueError: Not a model file.
  """
  with np.load(path) as z:
    if "__meta__" not in z.files:
      raise ValueError(f"{path} is not a jipguard fingerprint model file")
    out: dict[str, Any] = {}
    for name in z.files:
      if name == "__meta__":
        continue
      node = out
      *parents, leaf = name.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = z[name]
  return out


# ------------------------------------------------------------------------------ study


class _Run:
  """The study's state between stages (data, model, secret, trainers)."""

  def __init__(self, cfg: CollusionConfig, workdir: str, progress: bool):
    self.cfg, self.workdir, self.progress = cfg, workdir, progress
    kwargs = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    self.train = data.load(cfg.dataset, "train", **kwargs)
    self.test = data.load(cfg.dataset, "test", **kwargs)
    self.model = models.MLP(num_classes=self.train.num_classes, hidden=(cfg.hidden, cfg.hidden))
    self.tx = optax.adam(cfg.lr)
    self.book, self.layout = cfg.codebook(), cfg.layout()
    secret_path = os.path.join(workdir, "secret.json")
    if not os.path.exists(secret_path):
      rundir.write_secret(secret_path, {"seed": secrets.randbits(128)})
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, *self.train.image_shape)))["params"]
    size = embedding.theta_size(shapes, embedding.layer_predicate(cfg.layer_names))
    if size < self.layout.length:
      raise ValueError(
        f"the layers {cfg.layers} give {size} numbers, fewer than the fingerprint's {self.layout.length}"
      )
    self.secret = embedding.Secret(
      seed=int(rundir.read_secret(secret_path)["seed"]),
      length=self.layout.length,
      size=size,
      code_lengths=self.layout.code_lengths,
    )
    self.x = self.secret.projection(cfg.projection_std)
    self.bases = self.secret.bases()
    self.penalty = embedding.Penalty(self.x, cfg.layer_names, cfg.mu)
    rng = np.random.default_rng(cfg.seed)
    self.customers = np.sort(rng.choice(self.book.num_customers, cfg.customers, replace=False))
    self.steps_per_epoch = len(self.train.images) // cfg.batch_size

  def ckpt(self, name: str) -> ensemble.Checkpointing:
    return ensemble.Checkpointing(os.path.join(self.workdir, "checkpoints", name), fingerprint={"lr": self.cfg.lr})

  def fingerprints(self) -> np.ndarray:
    """F of every customer: community codes of a planted social graph, then identity codes."""
    crc_bits = None
    if self.cfg.crc_bits:
      graph, _ = crc.planted_graph([32] * 8, 0.3, 0.01, self.cfg.seed)
      node_codes = crc.community_codes(graph, crc.CrcConfig(bits=self.cfg.crc_bits, iterations=100))
      crc_bits = node_codes[self.customers % len(node_codes)]
    return np.stack(
      [
        embedding.fingerprint_vector(self.book.e(c), self.bases, self.layout, None if crc_bits is None else crc_bits[i])
        for i, c in enumerate(self.customers)
      ]
    )

  def decide(self, f_hat_L: np.ndarray) -> tracing.Decision:
    _, e = embedding.coefficients(f_hat_L, self.bases, self.layout)
    return tracing.decode_coefficients(e, self.book, self.cfg.tau, issued=self.customers)

  def extract(self, params_M: PyTree) -> np.ndarray:
    return embedding.extract(params_M, self.x, self.cfg.layer_names, members=True)

  def accuracy(self, params_M: PyTree) -> np.ndarray:
    return ensemble.accuracy(self.model, {"params": params_M}, self.test.images, self.test.labels)


def _timed_fit(fit, *args, **kwargs):
  t0 = time.perf_counter()
  out = fit(*args, **kwargs)
  return out, time.perf_counter() - t0


def _epoch_seconds(run: _Run, plain: ensemble.EnsembleTrainer, fp: ensemble.EnsembleTrainer, base, f, reps: int = 3):
  """Seconds of one compiled epoch of M copies without and with the regulariser: the fastest of
  ``reps`` fits of one epoch each, the two kinds interleaved so that a shared machine's load
  falls on both (the first fit of each compiles and is not timed)."""
  m = run.cfg.customers
  keys = jax.random.split(jax.random.key(99), m)

  def fit(trainer, **kwargs):
    t0 = time.perf_counter()
    out = trainer.fit(
      keys,
      run.train.images,
      run.train.labels,
      epochs=1,
      init_state=vendor.stack_copies(base, m),
      progress=False,
      **kwargs,
    )
    jax.block_until_ready(out.state.params)
    return time.perf_counter() - t0

  fit(plain), fit(fp, penalty_data=f)
  times = [(fit(plain), fit(fp, penalty_data=f)) for _ in range(reps)]
  return min(t[0] for t in times), min(t[1] for t in times)


def _coalitions(rng: np.random.Generator, m: int, size: int, count: int) -> list[np.ndarray]:
  return [np.sort(rng.choice(m, size, replace=False)) for _ in range(count if size < m else 1)]


def _averaging_rows(run: _Run, name: str, params_M: PyTree, rng: np.random.Generator) -> list[dict[str, Any]]:
  """Averaging collusion on stored copies: extraction is linear, so each coalition's fingerprint
  is the mean of its members'; three coalitions per size also have their averaged model scored."""
  f_hat = run.extract(params_M)
  rows = []
  for size in range(1, run.cfg.max_colluders + 1):
    groups = _coalitions(rng, run.cfg.customers, size, run.cfg.coalitions)
    decisions = [(run.decide(f_hat[g].mean(0)), run.customers[g]) for g in groups]
    avg = jax.tree.map(lambda *a: jnp.concatenate(a), *[vendor.average(params_M, g) for g in groups[:3]])
    row = {"attack": name, "colluders": size, **studies._rates(decisions, run.cfg.customers)}
    row["accuracy"] = float(run.accuracy(avg).mean())
    rows.append(row)
  return rows


def _attack_rows(run: _Run, name: str, params_M: PyTree, alpha: float, rng: np.random.Generator) -> list[dict]:
  """Averaging, then pruning ``alpha`` of the fingerprinted kernels, then sparse fine-tuning for
  ``finetune_fraction`` of the base's batches: every attacked model one member of an ensemble."""
  cfg = run.cfg
  sizes = studies._ints(cfg.attack_sizes)
  groups = [(size, g) for size in sizes for g in _coalitions(rng, cfg.customers, size, cfg.attack_coalitions)]
  averaged = jax.tree.map(lambda *a: jnp.concatenate(a), *[vendor.average(params_M, g) for _, g in groups])
  pruned = vendor.prune(averaged, cfg.layer_names, alpha) if alpha > 0 else averaged
  steps = max(1, int(round(cfg.finetune_fraction * cfg.base_epochs * run.steps_per_epoch)))
  n = len(groups)
  idx = np.stack([rng.choice(len(run.train.images), steps * cfg.batch_size) for _ in range(n)])
  attacker = ensemble.EnsembleTrainer(run.model, vendor.masked(optax.adam(cfg.lr)), batch_size=cfg.batch_size)
  tuned = attacker.fit(
    jax.random.split(jax.random.key(cfg.seed + 7), n),
    run.train.images,
    run.train.labels,
    indices=idx,
    epochs=1,
    init_state=ensemble.EnsembleState(params=pruned, batch_stats={}, opt_state=None),
    progress=run.progress,
    desc=name,
  ).state.params
  f_hat, acc = run.extract(tuned), run.accuracy(tuned)
  rows = []
  for size in sizes:
    members = [i for i, (s, _) in enumerate(groups) if s == size]
    decisions = [(run.decide(f_hat[i]), run.customers[groups[i][1]]) for i in members]
    row = {"attack": name, "colluders": size, **studies._rates(decisions, cfg.customers)}
    row["accuracy"] = float(acc[members].mean())
    rows.append(row)
  return rows


def run_collusion(cfg: CollusionConfig, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """The model-level study; resumes from ``workdir`` (finished trainings and attacks are kept)."""
  rundir.write_config(workdir, rundir.fingerprint(cfg, measure_costs=True))  # A field added later.
  run = _Run(cfg, workdir, progress)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  base_trainer = ensemble.EnsembleTrainer(run.model, run.tx, batch_size=cfg.batch_size)
  fp_trainer = ensemble.EnsembleTrainer(run.model, run.tx, batch_size=cfg.batch_size, penalty=run.penalty)
  key = jax.random.key(cfg.seed)
  base_fit, base_s = _timed_fit(
    base_trainer.fit,
    key[None],
    run.train.images,
    run.train.labels,
    epochs=cfg.base_epochs,
    checkpoint=run.ckpt("base"),
    progress=progress,
    desc="base",
  )
  base = base_fit.state
  f = run.fingerprints()
  keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(key, 1), c))(jnp.asarray(run.customers))
  fp_fit, embed_s = _timed_fit(
    vendor.embed,
    fp_trainer,
    base,
    f,
    keys,
    run.train.images,
    run.train.labels,
    epochs=cfg.embed_epochs,
    checkpoint=run.ckpt("embed"),
    progress=progress,
    desc="embed",
  )
  copies = fp_fit.state.params
  os.makedirs(os.path.join(workdir, "models"), exist_ok=True)
  save_params(os.path.join(workdir, "models", "base.npz"), jax.tree.map(lambda a: a[0], base.params), customer=None)
  for i, c in enumerate(run.customers):
    save_params(
      os.path.join(workdir, "models", f"customer_{c}.npz"), jax.tree.map(lambda a, i=i: a[i], copies), customer=int(c)
    )

  # Accuracy with and without the fingerprint; bit errors; Table III's costs.
  f_hat = run.extract(copies)
  ber = embedding.bit_error_rate(f_hat, f, run.bases, run.layout)
  acc_base = float(run.accuracy(base.params)[0])
  acc_fp = run.accuracy(copies)
  costs_path = os.path.join(workdir, "costs.json")
  if os.path.exists(costs_path):
    costs = rundir.read_json(costs_path)
  elif not cfg.measure_costs:
    costs = {}
  else:
    plain_epoch, fp_epoch = _epoch_seconds(run, base_trainer, fp_trainer, base, f)
    one = jax.tree.map(lambda a: a[:1], copies)
    t0 = time.perf_counter()
    for _ in range(5):
      run.decide(run.extract(one)[0])
    extract_s = (time.perf_counter() - t0) / 5
    costs = {
      "base_training_s": base_s if base_fit.resumed_from == 0 else None,
      "embedding_s": embed_s if fp_fit.resumed_from == 0 else None,
      "epoch_plain_s": plain_epoch,
      "epoch_with_regulariser_s": fp_epoch,
      "regulariser_overhead": fp_epoch / plain_epoch - 1,
      "extraction_and_decoding_s": extract_s,
      "extraction_vs_training": extract_s / (plain_epoch / cfg.customers * cfg.base_epochs),
    }
    rundir.write_json(costs_path, costs)
  summary = {
    "accuracy_base": acc_base,
    "accuracy_fingerprinted_mean": float(acc_fp.mean()),
    "accuracy_fingerprinted_min": float(acc_fp.min()),
    "bit_error_rate_max": float(ber.max()),
    "fingerprint_length": run.layout.length,
    "theta_size": run.secret.size,
    "customers": [int(c) for c in run.customers],
  }
  rundir.append_jsonl(jsonl, {"stage": "embedded", **summary})

  # Attacks, each kept once finished.
  attacks = [("average", None), ("finetune", 0.0)] + [(f"prune{a:g}", a) for a in studies._floats(cfg.prune_alphas)]
  if cfg.independent:
    attacks.insert(1, ("average-independent", None))
  rows = []
  for i, (name, alpha) in enumerate(attacks):
    path = os.path.join(workdir, "attacks", f"{name}.json")
    if os.path.exists(path):
      rows += rundir.read_json(path)
      continue
    rng = np.random.default_rng([cfg.seed, i])
    if name == "average":
      part = _averaging_rows(run, name, copies, rng)
    elif name == "average-independent":
      ind_keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(key, 2), c))(jnp.asarray(run.customers))
      ind = fp_trainer.fit(
        ind_keys,
        run.train.images,
        run.train.labels,
        epochs=cfg.base_epochs + cfg.embed_epochs,
        penalty_data=f,
        checkpoint=run.ckpt("independent"),
        progress=progress,
        desc="independent",
      ).state.params
      part = _averaging_rows(run, name, ind, rng)
    else:
      part = _attack_rows(run, name, copies, alpha, rng)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.write_json(path, part)
    for r in part:
      rundir.append_jsonl(jsonl, r)
    rows += part
  return _write_results(run, rows, summary, costs)


def _write_results(run: _Run, rows: list[dict], summary: dict, costs: dict) -> dict[str, Any]:
  cfg, workdir = run.cfg, run.workdir
  cols = ["attack", "colluders", "detection", "false_alarm", "any_innocent_accused", "accuracy"]
  cols += [f"status_{s}" for s in tracing.STATUSES]
  rundir.write_table(os.path.join(workdir, "collusion"), rows, cols, title="Detection and false alarm vs colluders")
  by = {}
  for r in rows:
    by.setdefault(r["attack"], []).append(r)
  for metric, label in (("detection", "share of colluders named"), ("false_alarm", "share of innocents named")):
    series = {a: ([r["colluders"] for r in rs], [r[metric] for r in rs]) for a, rs in by.items()}
    studies._plot(os.path.join(workdir, f"{metric}.png"), series, label, f"{cfg.design} x{cfg.books}, tau {cfg.tau}")
  acc_rows = [
    {"model": "base (no fingerprint)", "accuracy": summary["accuracy_base"]},
    {"model": f"fingerprinted copies, mean of {cfg.customers}", "accuracy": summary["accuracy_fingerprinted_mean"]},
    {"model": "fingerprinted copies, worst", "accuracy": summary["accuracy_fingerprinted_min"]},
  ]
  rundir.write_table(os.path.join(workdir, "accuracy"), acc_rows, ["model", "accuracy"], title="Test accuracy")
  cost_rows = [{"quantity": k, "value": v} for k, v in costs.items()]
  rundir.write_table(os.path.join(workdir, "costs"), cost_rows, ["quantity", "value"], title="Costs (Table III)")
  worst = max(r["any_innocent_accused"] for r in rows)
  report = [
    "# Fingerprints under collusion",
    "",
    f"{cfg.customers} customers' copies of an MLP ({cfg.hidden}-{cfg.hidden}) on {run.train.source}, fine-tuned "
    f"from one base as one ensemble; fingerprint of {run.layout.length} numbers ({cfg.crc_bits} community bits + "
    f"{cfg.books} x {run.layout.code_lengths[0]} identity coefficients) in theta_sub of {cfg.layers} "
    f"({run.secret.size} numbers); mu {cfg.mu}, tau {cfg.tau}, X ~ N(0, {cfg.projection_std}^2). The secret is in "
    "`secret.json` (mode 0600).",
    "",
    f"Accuracy: base {summary['accuracy_base']:.4f}, fingerprinted {summary['accuracy_fingerprinted_mean']:.4f} "
    f"(worst {summary['accuracy_fingerprinted_min']:.4f}); largest bit error rate {summary['bit_error_rate_max']:.4f}.",
    (
      f"Regulariser overhead per epoch: {costs['regulariser_overhead']:.1%}; extraction + decoding of one model: "
      f"{costs['extraction_and_decoding_s'] * 1e3:.1f} ms ({costs['extraction_vs_training']:.3%} of training it)."
      if costs
      else "Costs not measured (--no-measure_costs)."
    ),
    f"Largest share of coalitions with an innocent accused: {worst:.3g}.",
    "",
    rundir.markdown_table(rows, cols[:6]),
  ]
  rundir.write_text(os.path.join(workdir, "report.md"), "\n".join(report))
  metrics = {**summary, "costs": costs, "max_any_innocent_accused": worst, "rows": rows}
  rundir.write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics


def trace(workdir: str, model_paths: list[str]) -> tracing.Decision:
  """Names the colluders behind a suspicious model: the average of ``model_paths`` (one path: the
  model itself), decoded with the secret and codebooks of the study in ``workdir``.

  Raises:
    OSError: Missing files. ValueError: Models of another architecture or layers.
  """
  saved = rundir.read_json(os.path.join(workdir, "config.json"))["config"]
  cfg = CollusionConfig(**saved)
  book, layout = cfg.codebook(), cfg.layout()
  seed = int(rundir.read_secret(os.path.join(workdir, "secret.json"))["seed"])
  params = [load_params(p) for p in model_paths]
  stacked = jax.tree.map(lambda *a: np.stack(a), *params)
  size = embedding.theta_size(params[0], embedding.layer_predicate(cfg.layer_names))
  secret = embedding.Secret(seed=seed, length=layout.length, size=size, code_lengths=layout.code_lengths)
  f_hat = embedding.extract(stacked, secret.projection(cfg.projection_std), cfg.layer_names, members=True).mean(0)
  _, e = embedding.coefficients(f_hat, secret.bases(), layout)
  issued = (
    rundir.read_json(os.path.join(workdir, "metrics.json"))["customers"]
    if os.path.exists(os.path.join(workdir, "metrics.json"))
    else None
  )
  return tracing.decode_coefficients(e, book, cfg.tau, issued=issued)

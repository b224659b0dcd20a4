"""Tests for IPProtect's main job, its flags, the ablation's variants and the saturation diagnostic."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from jipguard import data, rundir
from jipguard.ipprotect import ablation, cli, job, sanitizer, sellers


def test_smoke_preset_end_to_end_and_rerun_reuses_everything(tmp_path):
  cfg = job.preset("smoke")
  m = job.run(cfg, str(tmp_path), progress=False)
  for key in (
    "utility_mae",
    "seller_utility_original",
    "seller_utility_sanitized",
    "compliance_train",
    "compliance_val",
    "risk_train",
    "risk_val",
    "rank_correlation",
    "compliance_lower_bound",
    "images_per_second",
  ):
    assert key in m
  assert len(m["seller_utility_original"]) == 8
  # The cheapest attack's figure is in every run (far above chance would say the images are tied to their originals).
  assert 0 <= m["linkage"]["top1"] <= 1 and m["linkage"]["chance_top1"] == pytest.approx(1 / cfg.buyer_size)
  assert 0 <= m["utility_mae_fresh_images"] <= 1 and 0 <= m["utility_mae_val_oob"] <= 1
  # The fresh-images reference: are as many other test images, none of them a buyer image.
  buyer, _ = job.load_data(cfg)
  ref = job.reference_set(cfg, len(buyer))
  assert len(ref) == len(buyer)
  flat = lambda d: {a.tobytes() for a in d.images}
  assert not flat(ref) & flat(buyer)
  for name in ("config.json", "metrics.json", "report.md", "sanitized.npz", "examples.png", "sellers.png"):
    assert (tmp_path / name).exists(), name
  assert "loss = margin (kappa = 1.0)" in (tmp_path / "report.md").read_text()  # The smoke preset's loss.
  assert "stopping rule on (every 10 steps from step 20)" in (tmp_path / "report.md").read_text()  # smoke's schedule.
  assert "linkage: the original is the most correlated buyer image" in (tmp_path / "report.md").read_text()
  # sanitized.npz: sanitized images and labels only, none of them (close to) an original.
  buyer, _ = job.load_data(cfg)
  with np.load(tmp_path / "sanitized.npz") as f:
    assert sorted(f.files) == ["images", "labels", "sanitized"]
    san, lab = f["images"], f["labels"]
  np.testing.assert_array_equal(lab, buyer.labels)
  x = buyer.images.reshape(len(buyer), -1)
  s = san.reshape(len(san), -1)
  rms = np.sqrt(((s[:, None] - x[None]) ** 2).mean(-1))
  assert rms.min() > 0.5, rms.min()
  xc = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  sc = (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)
  assert (sc @ xc.T / x.shape[1]).max() < 0.8
  # A seller loads the sanitized set back (pixels outside [0, 1] allowed because the file says what it is).
  back = data.load(str(tmp_path / "sanitized.npz"))
  np.testing.assert_array_equal(back.images, san)
  # The anchor secret stays in the private checkpoints, in no shared artefact.
  secret_file = tmp_path / "checkpoints" / "anchor_secret.json"
  assert secret_file.stat().st_mode & 0o777 == 0o600  # Its owner's only.
  secret = json.loads(secret_file.read_text())["anchor_secret"]
  assert len(bytes.fromhex(secret)) == 32  # 256 bits.
  for name in ("config.json", "metrics.json", "metrics.jsonl", "report.md", "sanitized.npz"):
    assert secret.encode() not in (tmp_path / name).read_bytes()
  # metrics.jsonl: one line per training epoch of each ensemble and per sanitized batch.
  rows = rundir.read_jsonl(tmp_path / "metrics.jsonl")
  phases = [r["phase"] for r in rows]
  assert phases.count("sellers") == cfg.seller_train.epochs
  assert phases.count("sample_models") == cfg.omega_train.epochs
  assert phases.count("sanitize") == -(-cfg.buyer_size // cfg.sanitizer.data_batch)
  # A rerun resumes from the checkpoints and reproduces the metrics.
  again = job.run(cfg, str(tmp_path), progress=False)
  assert again["utility_mae"] == m["utility_mae"]
  assert again["timings"]["sanitize_s"] < m["timings"]["sanitize_s"]
  # Throughput is that of the sanitization when it ran, not of restoring it.
  assert again["images_per_second"] == m["images_per_second"] > 0
  with pytest.raises(ValueError, match="different configuration"):
    job.run(dataclasses.replace(cfg, omega_tr=5), str(tmp_path), progress=False)


def test_a_given_anchor_seed_leaves_no_plain_trace_in_the_run_directory(tmp_path):
  """Every file of the run directory, checkpoints included: neither the seed, nor a plain hash of
  it, nor the secret derived from it; the commitment's salt makes a rerun resume, another seed refused."""
  seed = 918273645546372819
  cfg = dataclasses.replace(
    job.preset("smoke"),
    anchor_seed=seed,
    buyer_size=8,
    seller_pool_size=256,
    omega_train=sellers.TrainConfig(epochs=1, batch_size=8),
  )
  job.run(cfg, str(tmp_path), progress=False)
  secret = sanitizer.anchor_secret(seed)
  needles = [str(seed), hashlib.sha256(str(seed).encode()).hexdigest(), secret.hex(), hex(seed)[2:]]
  for path in tmp_path.rglob("*"):
    if path.is_file():
      blob = path.read_bytes()
      assert not [n for n in needles if n.encode() in blob], path
  assert not (tmp_path / "checkpoints" / "anchor_secret.json").exists()  # Derived, not stored.
  job.run(cfg, str(tmp_path), progress=False)  # Resumes (the salt is reused).
  with pytest.raises(rundir.ConfigMismatch, match="anchor_seed"):
    job.run(dataclasses.replace(cfg, anchor_seed=seed + 1), str(tmp_path), progress=False)


def test_experiment_flags_override_the_preset():
  cfg, workdir, _ = cli.config_from_flags(
    ["--omega_tr", "10", "--lam", "0.5", "--no_val_stop", "--preset", "paper", "--seller_epochs", "2"]
  )
  assert cfg.omega_tr == 10 and cfg.sanitizer.lam == 0.5 and not cfg.sanitizer.val_stop
  assert cfg.sanitizer.steps == 2000 and cfg.sanitizer.tau == 1.5 and cfg.seller_train.epochs == 2
  assert workdir.endswith("ipprotect-fashion_mnist_subset-paper-tr10-s0")
  json.dumps(job.config_to_json(cfg))
  assert job.config_from_json(json.loads(json.dumps(job.config_to_json(cfg)))) == cfg
  given = dataclasses.replace(cfg, anchor_seed=123456789)
  recorded = json.dumps(job.config_to_json(given))
  assert "123456789" not in recorded and hashlib.sha256(b"123456789").hexdigest() not in recorded
  # Salted: two records of one seed differ, unless the salt is reused (a resumed run).
  assert job.config_to_json(given)["anchor_seed"] != job.config_to_json(given)["anchor_seed"]
  salt = job.config_to_json(given)["anchor_seed"]["salt"]
  assert job.config_to_json(given, anchor_salt=salt) == job.config_to_json(given, anchor_salt=salt)
  cfg, _, _ = cli.config_from_flags(["--margin", "3"])
  assert cfg.sanitizer.loss == "margin" and cfg.sanitizer.margin == 3.0  # The default preset's loss.
  cfg, _, _ = cli.config_from_flags(["--loss", "probs", "--temperature", "2"])
  assert cfg.sanitizer.loss == "probs" and cfg.sanitizer.temperature == 2.0
  cfg, _, _ = cli.config_from_flags([])
  assert (cfg.sanitizer.val_every, cfg.sanitizer.min_steps) == (10, 50)  # The default preset's schedule.
  cfg, _, _ = cli.config_from_flags(["--val_every", "25", "--min_steps", "75"])
  assert (cfg.sanitizer.val_every, cfg.sanitizer.min_steps) == (25, 75)


def test_saturation_diagnostic_restores_the_runs_sampled_models(tmp_path, capsys):
  import re

  flags = ["--preset", "smoke", "--cache_dir", str(tmp_path), "--images", "8", "--checkpoints", "40", "5"]
  assert cli.saturation_main(flags) == 0
  first = capsys.readouterr().out
  # The two ensembles, where job.run keeps a run's models with this --cache_dir.
  assert sorted(d.split("-")[0] for d in os.listdir(tmp_path)) == ["omega", "sellers"]
  found = re.findall(r"noise (\d\.\d+) \(> 0.999: (\d\.\d+)\)", first)
  assert len(found) == 2 and all(0 <= float(v) <= 1 for pair in found for v in pair)
  # The trajectory, in step order; the smoke preset's margin loss fits every Omega_Tr model.
  steps = re.findall(r"step (\d+): compliance Omega_Tr (\d\.\d+), stuck (\d\.\d+)", first)
  assert [s[0] for s in steps] == ["5", "40"]
  assert float(steps[-1][1]) == 1.0 and float(steps[-1][2]) == 0.0
  # Rerun: the same, from the restored ensembles.
  assert cli.saturation_main(flags) == 0
  assert capsys.readouterr().out == first


def test_every_ablation_variant_parses_and_names_its_loss():
  # A variant that left the loss to the preset would silently change when the preset does
  # (it did: the default went from probs to margin).
  for name, flags in ablation.VARIANTS.items():
    assert "--loss" in flags, name
    cfg, _, _ = cli.config_from_flags([*ablation.BASE, *flags])
    assert name.split(" ")[0].split(",")[0] in (cfg.sanitizer.loss, "paper"), name

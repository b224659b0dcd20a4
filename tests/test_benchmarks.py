"""Tests for the benchmark harness (benchmarks/): rows, equivalence check, result files.

Skipped without PyTorch (the optional ``bench`` extra), which CI may not install.
"""

import dataclasses
import json
import os
import pathlib
import re
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Makes `benchmarks` importable.

from benchmarks import harness, kernels  # noqa: E402
from jipguard.ipprotect import objective  # noqa: E402

_ROW_KEYS = {
  "kernel",
  "size",
  "jax_s",
  "jax_compile_s",
  "torch_best_s",
  "torch_func_s",
  "torch_loop_s",
  "ratio",
  "gflops",
  "torch_gflops",
  "check_max_rel_err",
  "check_passed",
}


def test_smallest_ensemble_row_has_keys_and_passes_equivalence_check(tmp_path):
  # The quick size (M=10 MLP) with a 4-step epoch: same code path, ~5x less timed work.
  size = dataclasses.replace(kernels.KERNELS["ensemble_train_epoch"].sizes(True)[0], n=512)
  row = kernels.ensemble_row(size, repeats=1)
  assert _ROW_KEYS <= set(row)
  assert row["kernel"] == "ensemble_train_epoch" and row["size"] == size.label
  assert row["check_passed"] and row["check_max_rel_err"] < kernels.CHECK_RTOL
  for k in ("jax_s", "torch_func_s", "torch_loop_s"):
    assert row[k] > 0
  assert row["torch_best_s"] == min(row["torch_func_s"], row["torch_loop_s"])
  assert row["ratio"] == pytest.approx(row["jax_s"] / row["torch_best_s"])
  assert row["gflops"] == pytest.approx(size.flops / row["jax_s"] / 1e9)
  assert np.isfinite([row["final_loss_jax"], row["final_loss_torch_func"], row["final_loss_torch_loop"]]).all()

  harness.add_roofline([row])  # No GEMM rows: no roofline.
  assert row["roofline_fraction"] is None
  harness.write(tmp_path, [row], harness.machine_info(["benchmarks/run.py", "--quick"]) | {"loadavg_end": [0, 0, 0]})
  assert json.loads((tmp_path / "results.json").read_text())[0]["size"] == size.label
  assert size.label in (tmp_path / "results.md").read_text()


def test_equivalence_check_compares_all_three_implementations():
  check = kernels.check_equivalence("mlp")
  assert check.jax.shape == check.torch_func.shape == check.torch_loop.shape == (2, 2)  # (epochs, members)
  assert check.passed
  # Members differ (own keys and samples), so matching per-member losses is not a coincidence.
  assert not np.allclose(check.jax[:, 0], check.jax[:, 1])


def test_roofline_fraction_is_relative_to_best_gemm():
  rows = [
    {"kernel": "gemm_roofline", "gflops": 50.0, "torch_gflops": 100.0},
    {"kernel": "ensemble_train_epoch", "gflops": 25.0, "torch_gflops": 10.0},
  ]
  harness.add_roofline(rows)
  assert rows[1]["roofline_fraction"] == 0.25 and rows[1]["torch_roofline_fraction"] == 0.1
  assert rows[0]["roofline_fraction"] == 0.5
  assert rows[0]["roofline_for_target"] is None and rows[1]["roofline_for_target"] is None  # No targets.


def test_roofline_for_target_is_where_the_ratio_meets_the_target():
  """At equal FLOPs ratio = torch roofline / JAX roofline: a JAX row at ``roofline_for_target``
  of the peak has exactly the target ratio; a faster torch row asks for more than the peak."""
  rows = [
    {"kernel": "gemm_roofline", "gflops": 100.0, "torch_gflops": 80.0},
    {"kernel": "k", "gflops": 60.0, "torch_gflops": 40.0, "ratio": 40.0 / 60.0, "target": 0.5},
    {"kernel": "k", "gflops": 90.0, "torch_gflops": 60.0, "ratio": 60.0 / 90.0, "target": 0.5},
  ]
  harness.add_roofline(rows)
  assert rows[1]["roofline_for_target"] == pytest.approx(0.8)
  assert rows[1]["torch_roofline_fraction"] / rows[1]["roofline_for_target"] == pytest.approx(rows[1]["target"])
  assert rows[2]["roofline_for_target"] == pytest.approx(1.2)  # Torch at 0.6 of the peak: 0.5 needs 1.2.


def test_run_marks_rows_against_their_kernel_targets():
  timing = harness.Timing(1.0, (1.0,))
  registry = {
    "gemm_roofline": kernels.Kernel(
      lambda q: [_Size("gemm")], lambda *a: harness.make_row("gemm_roofline", "gemm", 1e11, timing, 0.0, None, timing)
    ),
    "k": kernels.Kernel(
      lambda q: [_Size("fast"), _Size("slow |Omega|=4")],
      lambda size, *a: harness.make_row(
        "k", size.label, 5e10, harness.Timing(1.0, (0.4 if size.label == "fast" else 0.6,)), 0.0, None, timing
      ),
      target=0.5,
    ),
  }
  rows = harness.run(registry, list(registry), quick=True, repeats=1, log=lambda s: None)
  assert [r["met"] for r in rows] == [None, True, False]
  assert [r["target"] for r in rows] == [None, 0.5, 0.5]
  assert rows[1]["roofline_for_target"] == pytest.approx(0.5 / 0.5)  # torch: 50 of 100 GFLOP/s.
  table = harness.markdown(rows, harness.machine_info(["x"]) | {"loadavg_end": [0, 0, 0]})
  assert "| ok |" in table and "| FAIL |" in table
  cells = [len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines() if line.startswith("|")]
  assert len(cells) == 5 and len(set(cells)) == 1, cells  # The label's "|" is escaped, not a new cell.
  assert {k: kernels.KERNELS[k].target for k in kernels.KERNELS} == {
    "gemm_roofline": None,
    "ensemble_train_epoch": 0.5,
    "sanitize_step": 0.8,
    "sanitize_dataset": 0.5,
    "watermark_grid_search": 0.5,
    "authorization_fsp": 0.5,
  }


@dataclasses.dataclass(frozen=True)
class _Size:
  label: str


@pytest.mark.parametrize("model, hwc", [("mlp", (28, 28, 1)), ("cnn", (32, 32, 3)), ("resnet8", (32, 32, 3))])
def test_analytic_flops_match_xla_cost_analysis(model, hwc):
  """The forward count (grid search, sanitizer) and the training step's count (forward, kernel
  gradients, input gradients of all layers but the first) against XLA's own count."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from jipguard import models  # noqa: PLC0415

  if model != "mlp" and jax.default_backend() != "cpu":
    pytest.skip("XLA:GPU's cost analysis leaves out convolutions run as cuDNN calls (4.6 of 53 MFLOP on an H100)")
  net = models.get_model(model, 10)
  batch = 4
  x, y = jnp.zeros((batch, *hwc)), jnp.zeros((batch,), jnp.int32)
  variables = jax.eval_shape(net.init, jax.random.key(0), x)  # Shapes suffice to lower.

  def xla_flops(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    return (lowered.cost_analysis() or lowered.compile().cost_analysis())["flops"]  # XLA:GPU: compiled only.

  def kernel_grads(v, x, y):
    def loss(params):
      logits, _ = net.apply(
        {**v, "params": params}, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(v["params"])

  # XLA also counts biases, ReLUs, batch norm, pooling, dropout and the loss, but skips the taps
  # of SAME padding (4% of a 32x32 3x3 conv), which the conventional count includes.
  forward = xla_flops(lambda v, x: net.apply(v, x), variables, x)
  assert 0.9 <= forward / (batch * kernels.forward_flops(model, hwc)) <= 1.05
  training = xla_flops(kernel_grads, variables, x, y)
  assert 0.9 <= training / (batch * kernels.training_flops(model, hwc)) <= 1.05
  # The MLP's input layer is three quarters of its products: no input gradient there is a
  # quarter less work than "3 x forward", which XLA's count would not match.
  if model == "mlp":
    assert training / (batch * 3 * kernels.forward_flops(model, hwc)) < 0.8


def test_time_calls_respects_budget():
  calls = []
  timing = harness.time_calls(lambda: calls.append(1), repeats=4)
  assert len(calls) == 5 and len(timing.times_s) == 4
  slow = harness.time_calls(lambda: __import__("time").sleep(0.02), repeats=5, budget_s=0.03)
  assert len(slow.times_s) == 1


def test_sanitize_step_row_matches_torch_reference():
  """Both torch variants give the same per-image utility losses over 4 steps as the JAX step."""
  row = kernels.sanitize_row(kernels.SanitizeSize("mlp", 4, 8), repeats=1)
  assert row["check_passed"], row["check_max_rel_err"]
  assert row["kernel"] == "sanitize_step" and row["ratio"] > 0 and row["gflops"] > 0
  assert row["jax_compile_s"] > 0  # The step first compiles in the equivalence check: it counts.


@pytest.mark.parametrize("loss", objective.LOSSES)  # Every loss of the sanitizer: a new one needs torch's too.
def test_torch_reference_loss_equals_the_sanitizers(loss):
  import jax.numpy as jnp
  import torch

  from benchmarks import torch_reference

  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((6, 4, 10)).astype(np.float32) * 3 for _ in range(2))
  want = objective.distance(jnp.asarray(a), jnp.asarray(b), loss, 2.0, 1.5)
  got = torch_reference._distance(torch.from_numpy(a), torch.from_numpy(b), loss, 2.0, 1.5)
  np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_sanitize_dataset_row_times_torch_at_the_same_and_at_the_reference_schedule(tmp_path):
  """The row runs torch with the preset's stopping schedule and again with REFERENCE_SCHEDULE."""
  size = kernels.DatasetSize(6, 3, 48, steps=120, sellers=2)
  row = kernels.sanitize_dataset_row(size, repeats=1)
  schedule = kernels._dataset_problem(size)[-1]
  assert (schedule.val_every, schedule.min_steps) != tuple(kernels.REFERENCE_SCHEDULE.values())
  assert row["torch_reference_schedule"] == kernels.REFERENCE_SCHEDULE
  # Every image runs at least min_steps under each schedule.
  assert row["steps_mean_torch_reference_schedule"] >= kernels.REFERENCE_SCHEDULE["min_steps"]
  assert schedule.min_steps <= row["steps_mean_jax"] < kernels.REFERENCE_SCHEDULE["min_steps"]
  assert row["ratio_reference_schedule"] == pytest.approx(row["jax_s"] / row["torch_reference_schedule_s"])
  for q in (row["quality_jax"], row["quality_torch"], row["quality_torch_reference_schedule"]):
    assert set(q) == {"mae_omega_v", "compliance_omega_v", "mae_sellers", "compliance_sellers"}
  harness.write(tmp_path, [row], harness.machine_info(["benchmarks/run.py"]) | {"loadavg_end": [0, 0, 0]})
  assert "at the reference schedule" in (tmp_path / "results.md").read_text()


def test_run_writes_finished_rows_before_a_later_row_fails(tmp_path):
  # A stand-in registry: the second size fails as a killed or crashed run would stop.
  @dataclasses.dataclass(frozen=True)
  class Size:
    label: str

  class Fake:
    def sizes(self, quick):
      return [Size("first"), Size("second")]

    def row(self, size, repeats, budget_s):
      if size.label == "second":
        raise RuntimeError("stopped part-way")
      t = harness.Timing(warmup_s=0.5, times_s=(0.5,))
      return harness.make_row("fake", size.label, 1e9, t, 0.1, t, None)

  machine = harness.machine_info(["benchmarks/run.py"])
  with pytest.raises(RuntimeError, match="part-way"):
    harness.run(
      {"fake": Fake()},
      ["fake"],
      quick=True,
      repeats=1,
      log=lambda s: None,
      on_row=lambda rows: harness.write(tmp_path, rows, machine),
    )
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [r["size"] for r in rows] == ["first"] and rows[0]["ratio"] == 1.0
  assert "| fake | first |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("fake,first,")
  # Written through a temporary file, yet readable as a plainly created file would be.
  umask = os.umask(0o022)
  os.umask(umask)
  assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
  assert not list(tmp_path.glob(".tmp-*"))


def test_retable_fills_targets_of_an_old_results_file(tmp_path, capsys):
  from benchmarks import run  # noqa: PLC0415

  old = [
    {"kernel": "gemm_roofline", "size": "mm", "ratio": 1.0, "gflops": 100.0, "torch_gflops": 90.0},
    {"kernel": "watermark_grid_search", "size": "K=3 x N=2", "ratio": 0.6, "gflops": 90.0, "torch_gflops": 54.0},
  ]
  (tmp_path / "results.json").write_text(json.dumps(old))
  run.main(["--retable", str(tmp_path / "results.json")])
  lines = capsys.readouterr().out.splitlines()
  assert "JAX roofline for target" in lines[0] and len(lines) == 4
  assert "| 0.5 | FAIL | 1.08 |" in lines[3]  # torch at 0.54 of the peak: a 0.5 ratio needs 1.08 of it.
  (tmp_path / "other.json").write_text(json.dumps({"rows": old}))
  for bad in ("other.json", "missing.json"):
    with pytest.raises(SystemExit):
      run.main(["--retable", str(tmp_path / bad)])
    assert "--retable:" in capsys.readouterr().err


def test_optimizer_share_times_both_optimisers_and_rejects_bad_sizes(capsys):
  from benchmarks import optimizer_share  # noqa: PLC0415

  medians = optimizer_share.main(["--members", "2", "--n", "64", "--batch_size", "32", "--epochs", "2"])
  assert set(medians) == {"adam", "sgd"} and all(0 < t < 60 for t in medians.values())
  assert "adam / sgd:" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    optimizer_share.main(["--batch_size", "400", "--n", "300"])


def test_run_without_torch_says_how_to_install_it():
  import subprocess  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  code = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['run.py', '--quick', '--workdir', 'unused']; "
    "runpy.run_path('benchmarks/run.py', run_name='__main__')"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr
  assert "PyTorch, which is not installed here: pip install -e '.[bench]'" in r.stderr

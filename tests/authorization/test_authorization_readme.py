"""README's authorization snippet, executed as written on images the test makes."""

import numpy as np


def test_readme_snippet_runs_as_written(readme_snippet):
  rng = np.random.default_rng(0)
  clean_u8 = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  fsp_u8 = np.clip(clean_u8.astype(int) + rng.integers(-18, 19, clean_u8.shape), 0, 255).astype(np.uint8)
  scope = {"clean_u8": clean_u8, "fsp_u8": fsp_u8}
  exec(readme_snippet("authorization"), scope)  # Its own assert: restored bit for bit.
  assert not np.array_equal(scope["p"].images, clean_u8)  # The protected images are not the originals.

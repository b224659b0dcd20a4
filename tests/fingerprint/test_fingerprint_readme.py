"""README's fingerprint snippet, executed as written."""

from jipguard import fingerprint as fp


def test_readme_snippet_runs_as_written(readme_snippet, capsys):
  exec(readme_snippet("fingerprint"), {})
  printed = capsys.readouterr().out
  book = fp.paper_codebook()
  decision = fp.decode_coefficients(fp.tracing.averaged_coefficients(book, [5, 929]), book, tau=0.85)
  assert printed.strip() == decision.message and decision.message
  assert book.num_customers == 132 * 132

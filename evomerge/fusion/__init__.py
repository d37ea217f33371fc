"""Fusion: the black-box mode over API models, whose weights are out of reach. A candidate is a
fusion of their answers instead of a merge of their weights; the same search drives it.

  spec     the fusion pool (API models, their key's env var, prices) and the probe before any work
  cache    every answer the search paid for, in the run dir (queries.sqlite): asked once
  client   the queries, concurrent, retried with backoff, a missing answer counted, not fatal
  rules    the arithmetic of log-linear pooling and the weighted vote (no I/O)
  backend  FusedBackend: a fusion recipe behind the backend interface suites are scored through
  worker   FusionWorker: the Worker interface, each result with its serving cost and spending
  serve    a picked fusion answering prompts (`evomerge fuse`)
The rules are declared with the merge methods (evomerge/methods/fusion.py), so search spaces
derive a gate and a signed weight per model from them as they do for experts.
"""

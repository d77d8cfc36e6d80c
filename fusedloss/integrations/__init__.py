"""The seed systems' own call forms, where they differ from our modules (``fusedloss.integrations.<system>``).

- ``tigas``: the published ``tigas-metric`` package's ``TIGASLoss`` (and ``apply()``, which makes
  its ``CombinedLoss`` and ``TIGASTrainer`` use ours).
"""

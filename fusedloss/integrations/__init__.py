"""The published code's own call forms of KoeMorph, Ditto and TIGAS, where they differ from our modules (``fusedloss.integrations.<system>``).

- ``tigas``: the published ``tigas-metric`` package's ``TIGASLoss`` (and ``apply()``, which makes
  its ``CombinedLoss`` and ``TIGASTrainer`` use ours).
- ``koemorph``: the repository's ``KoeMorphLoss`` (its terms, groups and metrics dict).
- ``ditto``: ``MotionDiffusion.p_losses`` / ``_get_pva_loss`` and its ``TrainOptions``.
"""

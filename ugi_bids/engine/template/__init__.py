"""Unbiased deformable templates (sessions of one subject, or a cohort), one job per module.

* ``affine_mean``: the mean of world affines and its rotation/scale read-out (numpy, no torch);
* ``space``: the template's grid (covering every input) and the coverage-weighted average of the
  inputs resampled into it (numpy, no torch);
* ``build``: :func:`~.build.build_template`, the ANTs-style loop of registrations, averages and
  shape updates with a loaded :class:`~ugi_bids.engine.registrar.Registrar` (and its resume
  cache).
"""

"""The command line's runs: configs, the fit and evaluate commands, run directories.

* :mod:`.config`: :class:`~.config.FitConfig`, every flag with its default;
* :mod:`.parts` and :mod:`.build`: parts by registry name or import path, and the
  (model, guide) pair a config names: the only place, with :mod:`.fit`, that
  imports both :mod:`pyro_vae.models` and :mod:`pyro_vae.guides`;
* :mod:`.fit` (``python -m pyro_vae.fit``) and :mod:`.run`: a training run from
  start to end, with :mod:`.preflight` before training, :mod:`.finish` after it,
  and :mod:`.signals` for Ctrl-C and SIGTERM outside training;
* :mod:`.rundir` and :mod:`.runlock`: the run directory, its files and its lock;
* :mod:`.evaluate` (``python -m pyro_vae.evaluate``) and :mod:`.evaluation`: scoring
  a run directory, on several processes with :mod:`.evaluation_sharded` and
  :mod:`.sharding`;
* :mod:`.figures`, :mod:`.plots` and :mod:`.report` (``report.md``);
* :mod:`.loading` and :mod:`.generate`: :func:`pyro_vae.load` and what a loaded run
  can do.

The top layer: it may import every other part of pyro_vae; nothing imports it.
"""

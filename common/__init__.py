"""The foundation the harness (``bench``) and its components (``defenses``, ``attacks``) share.

Components must not import the harness, yet they raise the same errors, validate their
arguments the same way and derive their seeds from the same table. Those three things live
here, with no dependency beyond torch and tqdm:

* :mod:`common.errors`: the error family; every message names the bad value and what is allowed.
* :mod:`common.checks`: argument validators that raise :class:`common.errors.ConfigError`.
* :mod:`common.seeds`: every seed the project derives from another, named.
* :mod:`common.progress`: the progress bar, periodic log line and loss curve of a training loop.
"""

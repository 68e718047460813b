"""``make perf``: how close the evaluation engine runs to the cost of its own passes (issue 7).

Adversarial evaluation of a purifier is dominated by forward and backward passes through it, so
the engine is judged against that floor and against the libraries it replaces, side by side in
one run, on the same model, the same points and the same attack budget. Compared variants run
interleaved (A B, B A, A B, ...) so that drift in the machine's load hits both; every ratio is
the median over the repetitions of the per-repetition ratio (:mod:`.timing`). Robust accuracy
is judged by the engine's :class:`~bench.engine.decision.Judge`, every compared attack on the
same fresh purifications.

Before the first measurement, the data and every network are prepared (loaded, or trained when
the cache lacks them), announced and timed on their own (:mod:`.setup`); no measurement
includes that time. The measurements, one module each:

0. :mod:`.chunk`: the EOT chunk sweep behind :func:`bench.engine.attack_view.auto_chunk`.
1. :mod:`.overhead`: the harness's EOT-PGD on a stochastic defense against the *floor* of the
   same passes of the same view, timed bare. Target <= 1.15.
2. :mod:`.vs_torchattacks`: against ``torchattacks.EOTPGD`` at the same budget; time ratio
   (target <= 0.8) and robust accuracy (the harness's must be no higher).
3. :mod:`.vs_autoattack`: :class:`attacks.autoattack.AutoAttack` against
   ``pyautoattack.AutoAttack`` called directly. Target <= 1.05.
4. :mod:`.cascade`: a suite through :func:`bench.run.evaluate` with ``suite.cascade`` true
   against false.
5. :mod:`.memory`: the memory one exact, checkpointed gradient adds against DiffPure's and
   PurSAMERE's steps (:func:`bench.tools.fidelity.memory`), with the spread of repeated reads.
6. :mod:`.scaling`: the exponent of the attack's time against the number of images.

And, on CUDA, bf16 / channels-last / ``torch.compile`` with their accuracy impact
(:mod:`.cuda`). ``python -m bench.tools.perf`` (config ``conf/perf.yaml``; :mod:`.runner`,
:mod:`.report`) writes ``perf.md`` and ``perf.json`` in ``paths.results_dir`` and prints the
table.
"""

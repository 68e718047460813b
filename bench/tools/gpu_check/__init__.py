"""``make gpu-check``: what one GPU gives the harness, measured in one command (issue 18).

Four steps, in this order, each timed; ``gpu.md`` and ``gpu.json`` are rewritten after every
step, so a run stopped half-way still leaves the steps it finished. How large each step is:
:mod:`.sizes`; the settings compared: :mod:`.settings`. The steps, one module each:

1. :mod:`.tests_step`, **GPU tests**: ``pytest -m gpu`` in a subprocess; the counts come from
   its JUnit XML file.
2. :mod:`.networks`: a CIFAR-sized task without downloads (scikit-learn's 8x8 digits, upsampled
   to 3x32x32 with a random colour pair per image), and trained on it for a few hundred steps a
   CIFAR ResNet-18 classifier and an AToP inpainter (:class:`defenses.atop.Inpainter`, L1
   reconstruction through RT2). Small, so that the later steps fit the time budget.
3. :mod:`.options`, on the :mod:`.subjects`: bf16 autocast, channels-last and
   ``torch.compile``, and all three together, against fp32 on three subjects: the classifier,
   the inpainter network, and the harness's own
   :class:`~bench.engine.attack_view.AttackView` of ``classifier(AToP.purify(x))`` under its
   ``precision`` / ``channels_last`` / ``compile`` options. Per subject and setting, on one
   batch: how far the outputs move from fp32's (the predictions' agreement, the largest
   absolute difference of the outputs, the cosine similarity of the input gradients), and how
   long a forward pass and a gradient pass (forward and backward to the input: an attack step)
   take: the median of synchronised repetitions after warm-up, the settings interleaved
   (:func:`bench.tools.perf.timing.interleave`), the speedup being the median of the paired
   per-repetition ratios fp32 / setting. The fp32 row compares fp32 with a second fp32 run:
   the noise floor of the comparison.
4. :mod:`.paper_row`: one ``profile=paper`` evaluation through :func:`bench.api.evaluate` of
   AToP (the trained inpainter, RT2) in front of the trained classifier on the task's test
   images, Linf 8/255, timed as a whole and per attack.

``python -m bench.tools.gpu_check`` (:mod:`.runner`, :mod:`.report`) needs CUDA: without it,
it says so in one line and exits with status 2 before it loads any data. ``--device cpu
--tiny`` runs every step on the CPU at tiny sizes (tests/test_gpu_check.py); those numbers are
a CPU's, not a GPU's, and without ``--out`` they go to ``runs/gpu-check-test/`` in the results
folder (git-ignored), not over a GPU run's ``gpu.md``. The status is 1 when a step, a GPU test
or a setting failed (``gpu.md`` lists what), else 0.
"""

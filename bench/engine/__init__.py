"""The evaluation engine: it measures; :mod:`bench.reporting` describes.

Plan and validation, the runner and its stages, the attack view, decision rules,
diagnostics and resume.
"""

"""Everything the harness trains and caches.

Classifier architectures and sources, checked checkpoint loading, the one cache, the training
loops, and the purifiers' trained parts.
"""

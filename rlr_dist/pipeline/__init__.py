"""The distributed pipeline on Ray: sampler and reward actors, DeepSpeed learners under Ray Train.

``run.train(cfg)`` is the entry point; ``controller.py`` holds the per-iteration loop.
"""

"""The distributed pipeline on Ray: sampler and reward actors, DeepSpeed learners under Ray Train.

``run.train(cfg)`` is the entry point (the driver); ``learner.py`` is the Ray learner's loop, ``pools.py`` its
handle on the actors, ``workers.py`` the actors, ``engine.py`` the DeepSpeed glue.
"""

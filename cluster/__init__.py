"""Deployment manifests for rlr-dist (Ray cluster launcher, KubeRay) and their offline validator."""

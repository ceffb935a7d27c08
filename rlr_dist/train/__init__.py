"""Training: the typed config and the sample / score / learn steps shared by every runner."""

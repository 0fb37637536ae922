import hyp  # noqa: F401  (registers and loads the Hypothesis profile)

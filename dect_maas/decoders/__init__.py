"""The decoders: what is trained locally on the cached answers, and nothing else (no I/O).

``dect.py`` holds the DecT math and its one trainer; ``estimator.py`` the scikit-learn style
``DecTClassifier``; ``baselines.py`` zero-shot, prototypes and the linear probe; ``auto.py`` the
search policy that picks among those public estimators by cross-validation.

Internal: import the public names from ``dect_maas`` (they load torch on first use).
"""

"""The demo: a small LLaVA trained by our own script on a generated task suite.

``tasks`` draws the questions, ``model`` builds the model and its inputs,
``train`` trains it, ``evaluate`` scores it per task family. The trained
weights ship in ``demo/weights`` and are what ``tamp-prune`` prunes by default.
"""

"""``tamp-prune``'s run (``run``), its recipe checks before loading (``recipe_check``) and its
console (``console``); the argument parsing that needs no heavy import is ``tamp_prune.py``."""

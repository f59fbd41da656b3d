"""``tamp-prune``'s run (``run``), its recipe checks before loading (``recipe_check``) and its
console (``console``); the argument parsing and checks that need no heavy import are ``arguments``."""

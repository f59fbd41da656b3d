"""Ready recipes, shipped as package data (tamp_modifier.recipes)."""

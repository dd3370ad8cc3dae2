"""Training helpers for the recipes: optimiser / EMA / clipping, checkpoint state, config schema, SFT pieces."""

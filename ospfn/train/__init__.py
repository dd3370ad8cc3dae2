"""Training helpers for the recipes: the SFT step (``step.Trainer``) and its FSDP2 form
(``distributed.FSDPTrainer``), run construction (``build``), optimiser / EMA / clipping, checkpoint state,
config schema, SFT pieces."""

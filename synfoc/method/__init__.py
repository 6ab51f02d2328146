"""The method: SynFoC's training step, its baselines, losses and EMA teachers."""

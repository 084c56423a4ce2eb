"""Expert placement across tiers (VRAM, RAM, flash): store, cache, scheduler."""

"""Training presets: each module's `get_config()` returns a koclip.train.TrainConfig."""

"""`conveyor train` presets: TOML files of TrainConfig fields, named by their file (`--config gpt2-124m`)."""

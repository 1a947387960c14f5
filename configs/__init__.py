"""The presets of train.py (`--config=configs/<file>.py:<preset>`), importable as a package
(`from configs import ldm`) from the repository root: the presets share their builders this way."""

"""Checkpoint formats: readers and writers of the files published models come in.

The weight-file names are here, at the bottom, because the hub client needs
them to know what to download and the readers to know what to open.
"""

# Preference order when a directory holds several.
WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")
# Sharded checkpoints: the index file -> the weight file it stands for.
INDEX_FILES = {"model.safetensors.index.json": "model.safetensors",
               "pytorch_model.bin.index.json": "pytorch_model.bin"}

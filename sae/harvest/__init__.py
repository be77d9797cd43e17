"""harvest: run a causal LM over text and write one layer's residual stream to an activation cache.

Modules, one job each:
  config.py   HarvestConfig, the settings the CLI fills and the cache records
  text.py     text sources: hub datasets (streamed), local files, the offline ``python-docs``
  packing.py  tokenization + packing into BOS-led windows, in a background thread
  model.py    loading (hub id, folder, .gguf) and cutting the model after the harvested block
  ranks.py    torchrun's RANK/WORLD_SIZE: which windows this process takes
  pipeline.py the overlapped loop (forward, pinned D2H on a side stream, store writer thread)
  report.py   the summary printed at the end
  command.py  the ``sae harvest`` CLI

See docs/harvest.md for the hook convention, the data sources and resume/multi-GPU behaviour.
"""

"""The model as a graph: channel sets traced with torch.fx (graph/channels.py), and compaction
(graph/compact.py), which removes unused channels and folds what they still contribute."""

"""Data: `sources` (one registered DataSource per `data.dataset`), `datasets` (what a dataset holds,
the checks download runs, the train/val loaders), `images` (digits, Fashion-MNIST and fake images
held in memory), `imagefolder` (decoded on the fly), `cifar`, `presets` (a model's resize, crop and
normalisation) and `samplers` (one rank's share).
"""

"""Models: the alive/dead crop classifier and the U-Net cell detector (torch lives here only).

* :mod:`cellspot.ml.common`: progress events, device/threads, checkpoint folders.
* :mod:`cellspot.ml.data`: training data from the store or an annotated folder, one split rule.
* :mod:`cellspot.ml.augment`: albumentations pipelines.
* :mod:`cellspot.ml.classifier`, :mod:`cellspot.ml.detector`: models, ``fit`` and inference.
* :mod:`cellspot.ml.registry`: model runs in the store, promote / roll back.
* :mod:`cellspot.ml.predict`: detect + classify images, write CSVs / overlays.
* :mod:`cellspot.ml.project_predictions`: predict a project's images and keep the cells in the store.
"""

"""Models of the defense: classifiers (this module's registry), purifier and RvS generator.

The purifier (``atop.models.purifier``) and RvS generator (``atop.models.rvs``) are imported
from their own modules.
"""

from atop.models.classifiers import (
    CLASSIFIERS,
    DATASET_STATS,
    ImageClassifier,
    build_classifier,
    classifier_checkpoint,
    load_classifier,
)

__all__ = [
    "CLASSIFIERS",
    "DATASET_STATS",
    "ImageClassifier",
    "build_classifier",
    "classifier_checkpoint",
    "load_classifier",
]

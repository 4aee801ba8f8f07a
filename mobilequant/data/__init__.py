"""Data: images in, float32 NCHW batches normalised by the model's ``PreprocessConfig`` out (labels int64).

* :func:`load_data` resolves what a user names: ``"builtin"`` / ``"fashion-mnist"`` or a path
  (folder of images, image file, ``.npy`` / ``.npz``).
* :func:`calibration_set`: the 512-image Fashion-MNIST subset shipped inside the package.
* :func:`builtin_dataset`, :func:`load_fashion_mnist`: the full splits from the Debian package
  ``dataset-fashion-mnist``.
* :func:`preprocess_images`: the one place preprocessing happens.
* :func:`fit_labels`: class-folder labels matched to a model's classes, and checked against them.
* :func:`photo_crops`: crops of real photos for ImageNet models, two disjoint halves; ``collection="skimage"``
  (12 scikit-image photos, the default) or ``"offline"`` (62 photos of scikit-image, scikit-learn,
  matplotlib and Debian's opencv-doc).
"""

from .builtin import BUILTIN_DATASETS, builtin_dataset, calibration_manifest, calibration_set, load_data, stratified_indices
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import load_fashion_mnist
from .labels import LabelWarning, fit_labels
from .photos import CROPS_PER_PHOTO, OFFLINE_PHOTO_SPLITS, PHOTO_COLLECTIONS, PHOTO_SPLITS, Photo, photo_crops, photo_list
from .preprocess import preprocess_image, preprocess_images, to_layout
from .readers import BadImageWarning, ImageData, read_images

__all__ = [
    "BUILTIN_DATASETS",
    "CROPS_PER_PHOTO",
    "FASHION_MNIST_CLASSES",
    "OFFLINE_PHOTO_SPLITS",
    "PHOTO_COLLECTIONS",
    "PHOTO_SPLITS",
    "BadImageWarning",
    "ImageData",
    "LabelWarning",
    "Photo",
    "builtin_dataset",
    "calibration_manifest",
    "calibration_set",
    "fit_labels",
    "load_data",
    "load_fashion_mnist",
    "photo_crops",
    "photo_list",
    "preprocess_image",
    "preprocess_images",
    "read_images",
    "stratified_indices",
    "to_layout",
]

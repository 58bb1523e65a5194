"""Reading and writing medical images by suffix; properties travel with the arrays.

``read_images(path)`` returns float32 slices ``[N, H, W]`` (rows x columns as a viewer shows them,
raw intensities) and an :class:`ImageProperties`; ``write_image(path, array, like=properties)``
puts a result back on the input's grid. Supported: PNG/JPEG/TIFF (Pillow), NIfTI (nibabel),
DICOM files and series folders (pydicom), ``.npy`` and ``.npz``. Heavy libraries are imported
only when a file of their format is read or written.

Orientation conventions:
    - PNG/JPEG/TIFF: ``array[row, col]`` as decoded; colour -> BT.601 luminance; pages -> slices.
    - DICOM: the stored pixel matrix (row 0 at the top); frames or series slices -> slices.
    - NIfTI: ``image = np.rot90(vol_slice)`` for the slice along ``slice_axis``
      (``image[row, col] = vol_slice[col, B-1-row]``); the writer applies the exact inverse.
    - ``.npy``/``.npz``: ``[H, W]`` or ``[N, H, W]`` as stored.

``slice_orientation(properties)`` names the patient directions of a stack's columns, rows and slices
(``LPS`` for axial slices in the radiological view); ``training_geometry`` and ``geometry_mismatch``
record the training inputs' orientation and pixel size and compare an input with them.
"""

from __future__ import annotations

from synomaly.io._api import read_images, read_mask, write_image
from synomaly.io._base import SUPPORTED_SUFFIXES, WRITABLE_SUFFIXES, ImageProperties, suffix_of
from synomaly.io._geometry import geometry_mismatch, model_pixel_spacing, slice_orientation, training_geometry
from synomaly.io._nifti import slices_to_volume, volume_to_slices
from synomaly.io._numpy import read_npz_ids, read_npz_slices
from synomaly.io._paths import list_inputs, output_stem

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "ImageProperties",
    "geometry_mismatch",
    "list_inputs",
    "model_pixel_spacing",
    "output_stem",
    "read_images",
    "read_mask",
    "read_npz_ids",
    "read_npz_slices",
    "slice_orientation",
    "slices_to_volume",
    "suffix_of",
    "training_geometry",
    "volume_to_slices",
    "write_image",
]

"""Readers and writers: round trips per format, orientation of non-square images, bad inputs."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from synomaly.errors import ConfigError, InputError
from synomaly.io import (
    SUPPORTED_SUFFIXES,
    ImageProperties,
    list_inputs,
    output_stem,
    read_images,
    read_mask,
    slices_to_volume,
    volume_to_slices,
    write_image,
)

H, W = 48, 64  # non-square everywhere, so a transpose or flip cannot go unnoticed


def pattern(dtype=np.uint16, offset: int = 0) -> np.ndarray:
    """An asymmetric ``[H, W]`` ramp: no flip or transpose of it equals itself."""
    return (np.arange(H * W).reshape(H, W) + offset).astype(dtype)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    position: tuple[float, float, float] | None = None,
    instance: int | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    series: str = "1.2.826.0.1.3680043.8.498.1",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.5, 0.75),
) -> None:
    """A minimal single-frame CT file with ``pixels`` (uint16 ``[rows, cols]``) written by pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", series
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing = list(spacing)
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


# --- PNG / JPEG / TIFF -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_keeps_bit_depth_and_orientation(tmp_path, dtype):
    image = pattern(dtype) if dtype == np.uint16 else pattern(np.uint16) % 251
    image = image.astype(dtype) * (20 if dtype == np.uint16 else 1)
    write_image(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as png:
        assert png.size == (W, H)  # Pillow reports (width, height)
        assert png.getpixel((5, 2)) == image[2, 5]
    images, props = read_images(tmp_path / "a.png")
    assert images.shape == (1, H, W) and images.dtype == np.float32
    np.testing.assert_array_equal(images[0], image)
    assert props.format == "png" and props.dtype == np.dtype(dtype).name and props.stack_shape == (1, H, W)


def test_rgb_and_rgba_become_luminance(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[3, 7] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        images, props = read_images(tmp_path / name)
        assert images.shape == (1, H, W)
        assert images[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50, abs=1e-4)
        assert images[0, 3, 7] == pytest.approx(255.0)
        assert props.shape[:2] == (H, W)


def test_jpeg_gray_is_read(tmp_path):
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(tmp_path / "a.jpg", quality=100)
    images, props = read_images(tmp_path / "a.jpg")
    assert props.format == "jpeg" and images.shape == (1, H, W)
    assert np.abs(images - 77).max() <= 1


def test_multipage_tiff_gives_slices_and_range(tmp_path):
    pages = [pattern(offset=1000 * k) for k in range(3)]
    frames = [Image.fromarray(page) for page in pages]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    images, props = read_images(tmp_path / "stack.tif")
    np.testing.assert_array_equal(images, np.stack(pages))
    assert props.format == "tiff" and props.slice_count == 3
    part, props = read_images(tmp_path / "stack.tif", slice_range=(1, 3))
    np.testing.assert_array_equal(part, np.stack(pages[1:]))
    assert props.slice_indices == [1, 2]


def test_tiff_writer_keeps_float_maps_exactly(tmp_path):
    maps = np.random.default_rng(0).random((3, H, W)).astype(np.float32)
    write_image(tmp_path / "maps.tiff", maps)
    back, props = read_images(tmp_path / "maps.tiff")
    np.testing.assert_array_equal(back, maps)
    assert props.dtype == "float32"


def test_png_float_map_is_scaled_to_16_bit_with_its_range_recorded(tmp_path):
    heat = np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(H, W)
    write_image(tmp_path / "map.png", heat)
    with Image.open(tmp_path / "map.png") as png:
        assert png.mode.startswith("I;16")
        low, high = (float(v) for v in png.text["synomaly.value_range"].split())
    back, _ = read_images(tmp_path / "map.png")
    assert (back.min(), back.max()) == (0.0, 65535.0)
    np.testing.assert_allclose(back[0] / 65535.0 * (high - low) + low, heat, atol=1e-4)


def test_bool_mask_is_written_as_0_255_and_read_back_as_mask(tmp_path):
    mask = np.zeros((H, W), bool)
    mask[5:11, 40:61] = True
    write_image(tmp_path / "m.png", mask)
    values, props = read_images(tmp_path / "m.png")
    assert set(np.unique(values)) == {0.0, 255.0} and props.dtype == "uint8"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", props), mask[None])


def test_png_mask_stays_aligned_with_its_image(tmp_path):
    image = np.zeros((H, W), np.uint8)
    image[5:11, 40:61] = 200  # upper right, wider than tall
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray((image > 0).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    images, props = read_images(tmp_path / "img.png")
    mask = read_mask(tmp_path / "mask.png", props)
    assert mask.dtype == bool and mask.shape == images.shape
    np.testing.assert_array_equal(mask, images > 0)


def test_png_refuses_several_slices(tmp_path):
    with pytest.raises(InputError, match="one 2-D image"):
        write_image(tmp_path / "x.png", np.zeros((2, H, W), np.uint8))


# --- NIfTI -------------------------------------------------------------------------------------

AFFINE = np.array([[-0.9, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])


def make_volume(tmp_path: Path, shape=(64, 40, 10), name="vol.nii.gz") -> tuple[Path, np.ndarray]:
    volume = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    image = nib.Nifti1Image(volume, AFFINE)
    image.header["descrip"] = b"synomaly test"
    nib.save(image, tmp_path / name)
    return tmp_path / name, volume


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slices_follow_the_documented_convention_and_write_back(tmp_path, axis):
    path, volume = make_volume(tmp_path)
    images, props = read_images(path, slice_axis=axis, slice_range=(2, 5))
    expected = np.stack([np.rot90(np.take(volume, k, axis=axis)) for k in range(2, 5)])
    np.testing.assert_array_equal(images, expected)
    write_image(tmp_path / "out.nii.gz", images * 2, props)
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == volume.shape
    np.testing.assert_allclose(out.affine, AFFINE)
    assert out.header["descrip"] == b"synomaly test"
    data = out.get_fdata()
    kept = np.take(data, range(2, 5), axis=axis)
    np.testing.assert_allclose(kept, 2.0 * np.take(volume, range(2, 5), axis=axis).astype(np.float64))
    assert np.abs(np.delete(data, range(2, 5), axis=axis)).max() == 0  # slices not processed stay zero


def test_nifti_axial_slice_of_non_square_volume(tmp_path):
    path, volume = make_volume(tmp_path, shape=(W, H, 3))
    images, props = read_images(path)  # axis 2: [N, H, W] with W along the volume's first axis
    assert images.shape == (3, H, W)
    assert images[1, 0, 0] == volume[0, H - 1, 1]  # top-left is (i=0, j=last): anterior up for RAS
    assert images[1, H - 1, W - 1] == volume[W - 1, 0, 1]
    assert props.spacing == pytest.approx((0.8, 0.9))


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PSR", "ILA"])
def test_the_same_scan_stored_in_any_orientation_gives_the_same_slices_and_writes_back_in_its_own(tmp_path, codes):
    from nibabel import orientations

    path, volume = make_volume(tmp_path)  # stored LAS, the canonical order
    reference, _ = read_images(path)
    ornt = orientations.axcodes2ornt(tuple(codes))
    transform = orientations.ornt_transform(orientations.axcodes2ornt(("L", "A", "S")), ornt)
    stored = orientations.apply_orientation(volume, transform)
    affine = AFFINE @ orientations.inv_ornt_aff(transform, volume.shape)  # the same voxels in world space
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / f"{codes}.nii.gz")
    images, props = read_images(tmp_path / f"{codes}.nii.gz")
    np.testing.assert_array_equal(images, reference)
    assert props.extra["axcodes"] == codes and props.spacing == pytest.approx((0.8, 0.9))
    write_image(tmp_path / "out.nii.gz", images + 1, props)
    out = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(out.get_fdata(), stored + 1.0)


@pytest.mark.parametrize("codes", ["LAS", "RAS", "LPS", "PSR"])
def test_slice_orientation_names_where_columns_rows_and_slices_run_however_the_scan_is_stored(tmp_path, codes):
    from nibabel import orientations

    from synomaly.io import slice_orientation

    _, volume = make_volume(tmp_path)
    transform = orientations.ornt_transform(orientations.axcodes2ornt(("L", "A", "S")), orientations.axcodes2ornt(tuple(codes)))
    affine = AFFINE @ orientations.inv_ornt_aff(transform, volume.shape)
    nib.save(nib.Nifti1Image(orientations.apply_orientation(volume, transform), affine), tmp_path / "v.nii.gz")
    # Axial slices in the radiological view: columns to the patient's left, rows to posterior; sagittal and coronal.
    for axis, expected in ((2, "LPS"), (0, "AIL"), (1, "LIA")):
        assert slice_orientation(read_images(tmp_path / "v.nii.gz", slice_axis=axis)[1]) == expected


def test_dicom_axial_slices_share_the_nifti_axial_orientation_and_images_have_none(tmp_path):
    from synomaly.io import slice_orientation

    for k in range(2):
        write_dicom(tmp_path / f"{k}.dcm", pattern(), position=(0.0, 0.0, 2.0 * k), instance=k + 1)
    assert slice_orientation(read_images(tmp_path)[1]) == "LPS"
    Image.fromarray(pattern(np.uint8)).save(tmp_path / "a.png")
    assert slice_orientation(read_images(tmp_path / "a.png")[1]) is None


def test_a_nan_in_the_affine_is_one_line_naming_the_file(tmp_path):
    path, volume = make_volume(tmp_path)
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 1] = np.nan
    broken = nib.Nifti1Image(np.asarray(image.dataobj), None, header=image.header)
    broken.header.set_sform(affine, code=1)
    broken.header.set_qform(None, code=0)
    nib.save(broken, tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="nan.nii.gz: the affine"):
        read_images(tmp_path / "nan.nii.gz")


def test_slice_convention_helpers_invert_each_other():
    volume = np.random.default_rng(1).random((5, 6, 7))
    for axis in range(3):
        np.testing.assert_array_equal(slices_to_volume(volume_to_slices(volume, axis), axis), volume)


def test_nifti_mask_read_with_same_options_stays_aligned(tmp_path):
    path, volume = make_volume(tmp_path)
    lesion = volume > volume.max() * 0.6
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), AFFINE), tmp_path / "mask.nii.gz")
    images, props = read_images(path, slice_axis=1, slice_range=(10, 30))
    mask = read_mask(tmp_path / "mask.nii.gz", props)  # axis and range come from props
    np.testing.assert_array_equal(mask, images > volume.max() * 0.6)
    assert mask.any() and not mask.all()


def test_nifti_scaling_is_applied_and_float_output_is_not_rescaled(tmp_path):
    image = nib.Nifti1Image(pattern(np.int16)[..., None], np.eye(4))
    image.header.set_slope_inter(2.0, -5.0)
    nib.save(image, tmp_path / "scaled.nii")
    images, props = read_images(tmp_path / "scaled.nii")
    # A single-slice volume is kept in its stored order, like a 2-D image.
    np.testing.assert_array_equal(images[0], np.rot90(pattern(np.float32)) * 2 - 5)
    write_image(tmp_path / "out.nii", images / 7, props)
    out = nib.load(tmp_path / "out.nii")
    assert out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.get_fdata()[..., 0], (pattern(np.float64) * 2 - 5) / 7, rtol=1e-6)


def test_nifti_2d_and_single_volume_4d_keep_their_shape(tmp_path):
    nib.save(nib.Nifti1Image(pattern(np.float32).T.copy(), np.eye(4)), tmp_path / "flat.nii")
    images, props = read_images(tmp_path / "flat.nii", slice_axis=0)  # axis does not apply to 2-D
    np.testing.assert_array_equal(images[0], np.rot90(pattern(np.float32).T))
    write_image(tmp_path / "flat_out.nii", images > 100, props)
    out = nib.load(tmp_path / "flat_out.nii")
    assert out.shape == (W, H) and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.get_fdata(), pattern(np.float32).T > 100)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), tmp_path / "one.nii")
    images, props = read_images(tmp_path / "one.nii")
    write_image(tmp_path / "one_out.nii", images, props)
    assert images.shape == (6, 5, 4) and nib.load(tmp_path / "one_out.nii").shape == (4, 5, 6, 1)


def test_nifti_written_from_2d_inputs_uses_the_same_convention(tmp_path):
    write_image(tmp_path / "p.nii.gz", pattern()[None])
    back, props = read_images(tmp_path / "p.nii.gz")
    np.testing.assert_array_equal(back[0], pattern())
    assert props.shape == (W, H, 1)


# --- DICOM -------------------------------------------------------------------------------------


def test_dicom_file_applies_rescale_and_keeps_orientation(tmp_path):
    write_dicom(tmp_path / "a.dcm", pattern(), slope=2.0, intercept=-1024.0, position=(0, 0, 0))
    images, props = read_images(tmp_path / "a.dcm")
    np.testing.assert_array_equal(images[0], pattern(np.float32) * 2 - 1024)
    assert props.format == "dicom" and props.spacing == (0.5, 0.75) and props.dtype == "uint16"


def test_dicom_series_is_sorted_by_position_not_by_file_name(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for name, z in (("a.dcm", 10.0), ("b.dcm", 0.0), ("c.dcm", 5.0)):
        write_dicom(folder / name, pattern(offset=int(z) * 100), position=(-20.0, -30.0, z), instance=1)
    images, props = read_images(folder)
    assert images.shape == (3, H, W)
    for n, z in enumerate((0, 5, 10)):
        np.testing.assert_array_equal(images[n], pattern(np.float32, offset=z * 100))
    assert props.extra["files"] == ["b.dcm", "c.dcm", "a.dcm"] and props.extra["sorted_by"] == "position"
    assert read_images(folder, slice_range=(1, 3))[0].shape == (2, H, W)


def test_dicom_series_affine_puts_nifti_output_on_the_patient_grid(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for k, z in enumerate((4.0, 0.0, 2.0)):
        write_dicom(folder / f"{k}.dcm", pattern(offset=k), position=(-20.0, -30.0, z))
    images, props = read_images(folder)
    write_image(tmp_path / "out.nii.gz", images, props)
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == (W, H, 3)
    # Voxel (a, b, n) holds pixel (row H-1-b, col a) of slice n; DICOM gives its LPS position.
    a, b, n = 7, 5, 2
    row, col = H - 1 - b, a
    lps = np.array([-20.0 + col * 0.75, -30.0 + row * 0.5, 2.0 * n])
    np.testing.assert_allclose(out.affine @ [a, b, n, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-9)
    assert out.get_fdata()[a, b, n] == images[n, row, col]
    np.testing.assert_array_equal(read_images(tmp_path / "out.nii.gz")[0], images)


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    for name, instance in (("x.dcm", 3), ("y.dcm", 1), ("z.dcm", 2)):
        write_dicom(tmp_path / name, pattern(offset=instance), instance=instance)
    images, props = read_images(tmp_path)
    assert props.extra["sorted_by"] == "instance"
    assert [images[n, 0, 0] for n in range(3)] == [1.0, 2.0, 3.0]


def test_folder_with_two_series_is_refused(tmp_path):
    write_dicom(tmp_path / "a.dcm", pattern(), instance=1, series="1.2.3")
    write_dicom(tmp_path / "b.dcm", pattern(), instance=2, series="1.2.4")
    with pytest.raises(InputError, match="2 DICOM series"):
        read_images(tmp_path)


@pytest.mark.parametrize("orientation, spacing, problem", [
    ((0, 0, 0, 0, 0, 0), (0.5, 0.75), r"ImageOrientationPatient \(0, 0, 0, 0, 0, 0\) is not two perpendicular unit vectors"),
    ((1, 0, 0, 1, 0, 0), (0.5, 0.75), "ImageOrientationPatient .* is not two perpendicular unit vectors"),
    ((1, 0, 0, 0, 1, 0), (0.0, 0.75), r"PixelSpacing \(0, 0.75\) is not two positive numbers"),
])
def test_dicom_geometry_that_describes_no_grid_is_refused_naming_the_file(tmp_path, orientation, spacing, problem):
    write_dicom(tmp_path / "a.dcm", pattern(), position=(0, 0, 0), orientation=orientation, spacing=spacing)
    with pytest.raises(InputError, match=problem) as error:  # before: a nibabel traceback when the output was written
        read_images(tmp_path / "a.dcm")
    assert str(error.value).startswith(str(tmp_path / "a.dcm")) and "\n" not in str(error.value)
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(2):
        write_dicom(folder / f"s{k}.dcm", pattern(), position=(0, 0, k), orientation=orientation, spacing=spacing)
    with pytest.raises(InputError, match=problem):
        read_images(folder)


def test_a_series_with_two_slices_at_one_position_is_refused_naming_the_folder(tmp_path):
    for k, z in enumerate((0.0, 2.0, 2.0, 4.0)):  # e.g. two echoes of one slice in the folder
        write_dicom(tmp_path / f"s{k}.dcm", pattern(offset=k), position=(0, 0, z), instance=k + 1)
    with pytest.raises(InputError, match="2 slices lie at the same position .s1.dcm and s2.dcm at 2 mm") as error:
        read_images(tmp_path)
    assert str(error.value).startswith(f"{tmp_path}: ") and "own folder" in str(error.value)


def test_a_series_mixing_orientations_is_read_by_instance_number_with_one_warning(tmp_path, caplog):
    for k, orientation in enumerate([(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0)]):
        write_dicom(tmp_path / f"s{k}.dcm", pattern(offset=k), position=(0, 0, 2 * k), instance=3 - k, orientation=orientation)
    with caplog.at_level(logging.WARNING, logger="synomaly.io"):
        images, props = read_images(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path}: the slices of this series have 2 different orientations")
    assert props.extra["sorted_by"] == "instance" and props.affine is None
    assert [images[n, 0, 0] for n in range(3)] == [2.0, 1.0, 0.0]


def test_npz_ids_that_are_not_one_per_slice_are_ignored_with_a_warning(tmp_path, caplog):
    from synomaly.io import read_npz_ids

    np.savez(tmp_path / "b.npz", images=np.zeros((2, 8, 8)), images_ids=np.array("p1"), other_ids=np.array(["a", "b"]))
    with caplog.at_level(logging.WARNING, logger="synomaly.io"):
        assert read_npz_ids(tmp_path / "b.npz", "images", 2) is None  # before: a 0-d array raised a TypeError
    assert f"{tmp_path / 'b.npz'}: images_ids of shape () is not one id per slice (2 slices read)" in caplog.text
    assert read_npz_ids(tmp_path / "b.npz", "other", 2) == ["a", "b"]
    np.savez(tmp_path / "o.npz", images=np.zeros((2, 8, 8)), images_ids=np.array([{"a": 1}, "b"], dtype=object))
    with pytest.raises(InputError, match="o.npz: cannot read images_ids"):
        read_npz_ids(tmp_path / "o.npz", "images", 2)


def test_a_scale_slope_beyond_float32_is_refused_without_numpy_warnings(tmp_path):
    image = nib.Nifti1Image(np.full((8, 8, 2), 1000, np.int16), np.eye(4))
    image.header.set_slope_inter(1e38, 0)
    nib.save(image, tmp_path / "slope.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="slope.nii.gz: contains NaN or infinite values .or values beyond float32"):
            read_images(tmp_path / "slope.nii.gz")


@pytest.mark.parametrize("name, shape", [("CT_small.dcm", (1, 128, 128)), ("MR_small.dcm", (1, 64, 64))])
def test_pydicom_test_files(name, shape):
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name  # no download attempts
    if not path.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    images, props = read_images(path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    assert images.shape == shape
    np.testing.assert_allclose(images[0], expected)
    assert props.affine is not None and props.spacing is not None


# --- NumPy -------------------------------------------------------------------------------------


def test_npz_key_and_missing_key(tmp_path):
    stack = np.stack([pattern(np.uint8, offset=k) for k in range(4)])
    masks = stack > 100
    np.savez(tmp_path / "d.npz", test_anomalous=stack, test_masks=masks.astype(np.uint8))
    images, props = read_images(tmp_path / "d.npz", key="test_anomalous", slice_range=(1, 3))
    np.testing.assert_array_equal(images, stack[1:3])
    assert props.extra["key"] == "test_anomalous" and props.slice_indices == [1, 2]
    np.testing.assert_array_equal(read_mask(tmp_path / "d.npz", props, key="test_masks"), masks[1:3])
    with pytest.raises(InputError, match="test_anomalous") as error:
        read_images(tmp_path / "d.npz", key="nope")
    assert "test_masks" in str(error.value) and str(tmp_path / "d.npz") in str(error.value)
    with pytest.raises(InputError, match="pass key="):
        read_images(tmp_path / "d.npz")


def test_npy_round_trip_keeps_2d_and_3d_shapes(tmp_path):
    np.save(tmp_path / "one.npy", pattern(np.float32))
    images, props = read_images(tmp_path / "one.npy")
    write_image(tmp_path / "one_out.npy", images, props)
    np.testing.assert_array_equal(np.load(tmp_path / "one_out.npy"), pattern(np.float32))
    stack = np.random.default_rng(2).random((3, H, W))
    write_image(tmp_path / "stack.npy", torch.from_numpy(stack)[:, None])  # [N, 1, H, W] tensor
    np.testing.assert_array_equal(np.load(tmp_path / "stack.npy"), stack)


# --- bad inputs --------------------------------------------------------------------------------


def _corrupt_png(p: Path) -> Path:
    p = p / "bad.png"
    p.write_bytes(np.random.default_rng(3).bytes(37))
    return p


def _truncated_png(p: Path) -> Path:
    Image.fromarray(pattern(np.uint8)).save(p / "full.png")
    data = (p / "full.png").read_bytes()
    (p / "cut.png").write_bytes(data[: len(data) // 2])
    return p / "cut.png"


def _empty(p: Path) -> Path:
    (p / "empty.nii.gz").touch()
    return p / "empty.nii.gz"


def _unknown(p: Path) -> Path:
    (p / "notes.txt").write_text("hello")
    return p / "notes.txt"


def _nan_npy(p: Path) -> Path:
    array = np.zeros((H, W), np.float32)
    array[3, 4] = np.nan
    np.save(p / "nan.npy", array)
    return p / "nan.npy"


def _one_d_npy(p: Path) -> Path:
    np.save(p / "line.npy", np.arange(10))
    return p / "line.npy"


def _object_npy(p: Path) -> Path:
    np.save(p / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return p / "obj.npy"


def _four_d_nifti(p: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), p / "t.nii.gz")
    return p / "t.nii.gz"


def _corrupt_nifti(p: Path) -> Path:
    (p / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    return p / "bad.nii.gz"


def _corrupt_dicom(p: Path) -> Path:
    (p / "bad.dcm").write_bytes(np.random.default_rng(4).bytes(300))
    return p / "bad.dcm"


def _corrupt_npz(p: Path) -> Path:
    (p / "bad.npz").write_bytes(b"PK\x03\x04" + b"x" * 50)
    return p / "bad.npz"


def _missing(p: Path) -> Path:
    return p / "nowhere.png"


def _empty_folder(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


@pytest.mark.parametrize(
    "make, problem",
    [
        (_corrupt_png, "cannot read image"),
        (_truncated_png, "cannot read image"),
        (_empty, "empty"),
        (_unknown, "unsupported file type"),
        (_nan_npy, "NaN"),
        (_one_d_npy, "2-D image or a 3-D stack"),
        (_object_npy, "cannot read .npy"),
        (_four_d_nifti, "one volume only"),
        (_corrupt_nifti, "cannot read NIfTI"),
        (_corrupt_dicom, "not a readable DICOM"),
        (_corrupt_npz, "cannot read .npz"),
        (_missing, "does not exist"),
        (_empty_folder, "no .dcm files"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError, match=problem) as error:
        read_images(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_unknown_suffix_lists_supported_ones(tmp_path):
    with pytest.raises(InputError) as error:
        read_images(_unknown(tmp_path))
    assert all(suffix in str(error.value) for suffix in SUPPORTED_SUFFIXES)


def test_mask_with_other_values_is_refused(tmp_path):
    np.save(tmp_path / "img.npy", pattern(np.float32))
    mask = np.zeros((H, W), np.uint8)
    mask[1, 2] = 2
    np.save(tmp_path / "mask.npy", mask)
    _, props = read_images(tmp_path / "img.npy")
    with pytest.raises(InputError, match="0/1 or 0/255; found 0, 2") as error:
        read_mask(tmp_path / "mask.npy", props)
    assert str(tmp_path / "mask.npy") in str(error.value)
    np.save(tmp_path / "mask16.npy", mask.astype(np.uint16) * 0 + np.uint16(255))
    with pytest.raises(InputError, match="must be 0/1;"):  # 0/255 is only for 8-bit data
        read_mask(tmp_path / "mask16.npy", props)


def test_mask_shape_mismatch_is_refused(tmp_path):
    np.save(tmp_path / "img.npy", pattern(np.float32))
    np.save(tmp_path / "mask.npy", np.zeros((W, H), np.uint8))  # transposed
    _, props = read_images(tmp_path / "img.npy")
    with pytest.raises(InputError, match="does not match image shape"):
        read_mask(tmp_path / "mask.npy", props)


def test_mask_with_more_slices_than_the_image_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", img=np.zeros((3, H, W)), mask=np.zeros((5, H, W), np.uint8))
    _, props = read_images(tmp_path / "d.npz", key="img")
    with pytest.raises(InputError, match="5 slices"):
        read_mask(tmp_path / "d.npz", props, key="mask")


def test_slice_options_are_validated(tmp_path):
    path, _ = make_volume(tmp_path)
    with pytest.raises(ConfigError, match="slice_axis"):
        read_images(path, slice_axis=3)
    with pytest.raises(ConfigError, match="slice_range"):
        read_images(path, slice_range=(5, 2))
    with pytest.raises(InputError, match="outside the 10 slices"):
        read_images(path, slice_range=(5, 12))


@pytest.mark.parametrize("name", ["out.jpg", "out.dcm", "out.gif"])
def test_unwritable_suffixes_are_refused(tmp_path, name):
    with pytest.raises(InputError, match="cannot write"):
        write_image(tmp_path / name, np.zeros((H, W), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_shape_against_properties_and_leaves_no_temp_files(tmp_path):
    np.save(tmp_path / "img.npy", pattern(np.float32))
    _, props = read_images(tmp_path / "img.npy")
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "out.png", np.zeros((W, H)), props)
    write_image(tmp_path / "out" / "deep" / "m.png", np.ones((H, W), bool), props)
    assert sorted(p.name for p in (tmp_path / "out" / "deep").iterdir()) == ["m.png"]


def test_properties_survive_json(tmp_path):
    path, _ = make_volume(tmp_path)
    images, props = read_images(path, slice_range=(1, 4))
    again = ImageProperties.from_dict(json.loads(json.dumps(props.to_dict())))
    assert again == props
    write_image(tmp_path / "out.nii.gz", images, again)
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, AFFINE)


# --- listing inputs and naming outputs ---------------------------------------------------------


def _only_subfolders(root):
    folder = root / "nested"
    (folder / "deeper").mkdir(parents=True)
    Image.fromarray(pattern(np.uint8)).save(folder / "deeper" / "x.png")
    return folder


def test_list_inputs_expands_folders_and_series(tmp_path):
    (tmp_path / "p1" / "ct").mkdir(parents=True)
    for k in range(2):
        write_dicom(tmp_path / "p1" / "ct" / f"{k}.dcm", pattern(), instance=k)
    np.save(tmp_path / "p1" / "b.npy", np.zeros((H, W)))
    Image.fromarray(pattern(np.uint8)).save(tmp_path / "a.PNG")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / ".a.png.tmp.png").write_bytes(b"partial")
    found = list_inputs(tmp_path, recursive=True)
    assert found == [tmp_path / "a.PNG", tmp_path / "p1" / "b.npy", tmp_path / "p1" / "ct"]
    assert [read_images(p)[0].shape[0] for p in found] == [1, 1, 2]
    assert list_inputs(tmp_path) == [tmp_path / "a.PNG"]  # subfolders only when asked for
    assert list_inputs(tmp_path / "p1" / "ct") == [tmp_path / "p1" / "ct"]  # a folder of .dcm files is one series
    with pytest.raises(InputError, match="subfolders are searched only with --recursive"):
        list_inputs(_only_subfolders(tmp_path))
    assert list_inputs(tmp_path / "a.PNG") == [tmp_path / "a.PNG"]
    with pytest.raises(InputError, match="unsupported"):
        list_inputs(tmp_path / "readme.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="no supported images"):
        list_inputs(tmp_path / "none")
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(tmp_path / "gone")


@pytest.mark.parametrize(
    "relative",
    [
        "p01/flair.nii.gz",
        "../../etc/passwd.png",
        ".hidden.png",
        "..png",
        "a/../../b.dcm",
        "dir with spaces/ünï cödé?.tif",
        "-rf.npy",
        "x" * 300 + ".png",
        "a/.../b.npz",
        "trailing..png",
    ],
)
def test_output_stem_cannot_escape_the_output_folder(tmp_path, relative):
    root = tmp_path / "in"
    stem = output_stem(root / relative, root)
    assert stem and "/" not in stem and "\\" not in stem and ".." not in stem
    assert not stem.startswith((".", "-")) and not stem.endswith(".") and len(stem) <= 200
    out = tmp_path / "out"
    assert (out / f"{stem}.png").resolve().parent == out.resolve()


def test_output_stem_keeps_relative_path_information(tmp_path):
    root = tmp_path / "in"
    assert output_stem(root / "p01" / "flair.nii.gz", root) == "p01__flair"
    assert output_stem(root / "p02" / "flair.nii.gz", root) == "p02__flair"
    assert output_stem(root / "series", root / "series") == "series"
    assert output_stem(tmp_path / "elsewhere" / "x.png", root) == "x"
    long_a = output_stem(root / ("y" * 300 + "a.png"), root)
    assert long_a != output_stem(root / ("y" * 300 + "b.png"), root)


def test_png_slices_stacked_as_the_readme_says_read_back_as_the_same_slices(tmp_path):
    slices = [np.random.default_rng(i).random((5, 7)).astype(np.float32) for i in range(3)]
    volume = np.stack([np.rot90(s, -1) for s in slices], axis=-1)
    nib.save(nib.Nifti1Image(volume, np.diag([-0.9, 0.8, 3.0, 1.0])), tmp_path / "v.nii.gz")
    images, props = read_images(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(images, np.stack(slices))
    assert props.extra["axcodes"] == "LAS" and props.spacing == pytest.approx((0.8, 0.9))


# --- resource limits: sizes come from headers, before pixels are decoded or decompressed ----------


def test_an_npz_array_is_sized_from_its_header_before_it_is_decompressed(tmp_path, monkeypatch):
    import tracemalloc

    np.savez_compressed(tmp_path / "bomb.npz", images=np.zeros((64, 1024, 1024), np.uint8))  # 64 MiB in about 64 kB
    monkeypatch.setattr("synomaly.io._base.MAX_DECOMPRESSED_BYTES", 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"bomb.npz: array 'images' of shape \(64, 1024, 1024\) takes 0.1 GiB once "
                                             r"decompressed; at most 0.000976562 GiB \(the limit\)"):
            read_images(tmp_path / "bomb.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # the 64 MiB array was never unpacked


def test_a_nii_gz_volume_is_sized_from_its_header_before_it_is_decompressed(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    monkeypatch.setattr("synomaly.io._base.MAX_DECOMPRESSED_BYTES", 2**16)
    with pytest.raises(InputError, match=r"v.nii.gz: volume of shape \(64, 64, 64\) takes 0.0 GiB once decompressed"):
        read_images(tmp_path / "v.nii.gz")
    monkeypatch.setattr("synomaly.io._base.MAX_SLICES", 32)
    monkeypatch.setattr("synomaly.io._base.MAX_DECOMPRESSED_BYTES", 2**31)
    with pytest.raises(InputError, match="v.nii.gz: 64 slices; at most 32 per input"):
        read_images(tmp_path / "v.nii.gz")


def test_image_sides_pages_and_pixels_are_checked_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((16, 20000), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match="wide.png: image is 20000x16 pixels; at most 16384 pixels per side"):
        read_images(tmp_path / "wide.png")
    pages = [Image.fromarray(np.zeros((8, 8), np.uint8)) for _ in range(5)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    monkeypatch.setattr("synomaly.io._base.MAX_SLICES", 4)
    with pytest.raises(InputError, match="pages.tif: 5 slices; at most 4 per input"):
        read_images(tmp_path / "pages.tif")
    monkeypatch.setattr("synomaly.io._base.MAX_PIXELS", 100)
    np.save(tmp_path / "stack.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(InputError, match="stack.npy: 2 slices of 8x8 are 128 pixels; at most 100 per input"):
        read_images(tmp_path / "stack.npy")


def test_dicom_sizes_and_unreadable_numbers_are_refused_naming_the_file(tmp_path):
    import struct

    write_dicom(tmp_path / "ok.dcm", pattern())
    data = (tmp_path / "ok.dcm").read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00" + struct.pack("<H", H)
    assert rows in data
    (tmp_path / "tall.dcm").write_bytes(data.replace(rows, rows[:-2] + struct.pack("<H", 60000)))
    with pytest.raises(InputError, match=f"tall.dcm: image is {W}x60000 pixels; at most 16384 pixels per side"):
        read_images(tmp_path / "tall.dcm")
    frames = b"\x28\x00\x08\x00IS" + struct.pack("<H", 5002) + b"9" * 5001 + b" "  # NumberOfFrames of 5,001 digits
    (tmp_path / "digits.dcm").write_bytes(data.replace(rows, frames + rows))
    with pytest.warns(UserWarning), pytest.raises(InputError) as error:  # pydicom warns of the value's length
        read_images(tmp_path / "digits.dcm")
    assert str(error.value).startswith(str(tmp_path / "digits.dcm")) and len(str(error.value)) < 300


def test_an_empty_npz_key_is_refused_naming_the_bundle(tmp_path):
    from synomaly.data import Source

    np.savez(tmp_path / "b.npz", images=np.zeros((2, 8, 8)))
    source = Source.parse(f"{tmp_path / 'b.npz'}:")
    assert source == Source(tmp_path / "b.npz", "")
    with pytest.raises(InputError, match=r"b.npz: no array named after ':' \(write b.npz:KEY\); available keys: \['images'\]"):
        read_images(source.path, key=source.key)

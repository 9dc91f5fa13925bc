"""Image I/O: geometry and voxel values survive a write and a read; bad input fails with a clear error.

The volumes are built here with numpy: a random proper rotation (oblique, non-axis-aligned),
anisotropic spacing and an off-centre origin, on a small 20 x 24 x 16 grid so the file runs fast.
Real DICOM files come from the pydicom-data package (``data_store``); nothing is downloaded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.io import (
    DimensionError,
    EmptyImageError,
    Image,
    ImageError,
    NonFiniteError,
    TooLargeError,
    UnreadableImageError,
    read_image,
    validate,
    write_image,
)

SIZE_IJK = (20, 24, 16)
SPACING = (0.9, 1.1, 3.2)
ORIGIN = (-97.3, 121.7, -60.2)
TOL = 1e-5


def _rotation(seed: int, det: float = 1.0) -> np.ndarray:
    """A random 3 x 3 orthonormal matrix with determinant ``det`` and no axis-aligned column."""
    rng = np.random.default_rng(seed)
    while True:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) * det < 0:
            q[:, 0] = -q[:, 0]
        if np.abs(q).max() < 0.95:  # every axis clearly tilted against every LPS axis
            return q


def _volume(seed: int = 0) -> np.ndarray:
    """A float32 ``[k, j, i]`` array with structure (a gradient) and noise, nothing constant."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE_IJK[::-1]], indexing="ij")
    return (10.0 * k - 3.0 * j + 0.5 * i + rng.normal(0.0, 20.0, k.shape)).astype(np.float32)


def _oblique(seed: int = 0, det: float = 1.0) -> Image:
    return Image(_volume(seed), SPACING, ORIGIN, tuple(_rotation(seed, det).ravel()))


def _assert_same_geometry(got: Image, want: Image) -> None:
    assert got.size == want.size
    np.testing.assert_allclose(got.spacing, want.spacing, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.origin, want.origin, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.direction, want.direction, atol=TOL, rtol=0)


def _assert_error(excinfo: pytest.ExceptionInfo, path: Path, *phrases: str) -> None:
    message = str(excinfo.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message


@pytest.fixture(scope="module")
def pydicom_data() -> Path:
    """Folder of pydicom-data's real DICOM files (the distribution's import name is ``data_store``)."""
    data_store = pytest.importorskip("data_store")
    return Path(data_store.DataStore().data_path)


# ------------------------------------------------------------------------------------ round trips

def test_test_volume_is_oblique_and_anisotropic():
    img = _oblique()
    d = img.direction_matrix
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    assert np.abs(d).max() < 0.95 and np.abs(d).min() > 1e-3  # not a permutation of the LPS axes
    assert len(set(img.spacing)) == 3


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha"])
@pytest.mark.parametrize("det", [1.0, -1.0], ids=["right-handed", "left-handed"])
def test_file_round_trip_keeps_geometry_and_float32_values_exactly(tmp_path, suffix, det):
    img = _oblique(seed=3, det=det)
    path = write_image(img, tmp_path / f"vol{suffix}")
    back = read_image(path)
    _assert_same_geometry(back, img)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, img.array)
    # The same voxel is at the same physical point.
    ijk = np.array([[0, 0, 0], [19, 23, 15], [7.5, 3.25, 11]])
    np.testing.assert_allclose(back.index_to_physical(ijk), img.index_to_physical(ijk), atol=1e-4)
    # Atomic writes leave no temporary files; a detached header names its data file by its own name.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["vol.nhdr", "vol.raw.gz"] if suffix == ".nhdr" else [f"vol{suffix}"])


def test_nifti_file_holds_the_ras_affine_of_the_lps_geometry(tmp_path):
    """Checked with an independent reader: NIfTI stores RAS, so x and y flip sign."""
    nib = pytest.importorskip("nibabel")
    img = _oblique(seed=4)
    path = write_image(img, tmp_path / "vol.nii.gz")
    nii = nib.load(str(path))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(nii.affine, lps_to_ras @ img.affine(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), img.array)


def test_dicom_series_round_trip_keeps_geometry_and_values_within_rescale_step(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    img = _oblique(seed=5)
    folder = write_image(img, tmp_path / "series", dicom_uid="42.7")
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"slice_{k:04d}.dcm" for k in range(SIZE_IJK[2])]

    back = read_image(folder)
    _assert_same_geometry(back, img)
    first = pydicom.dcmread(files[0])
    step = float(first.RescaleSlope)
    assert 0 < step < 1e-2  # int16 over the value range: a fine quantisation, not slope 1
    err = np.abs(back.array.astype(np.float64) - img.array)
    assert err.max() <= step / 2 + 1e-4  # + float32 rounding of values around 200
    assert err.max() > 0  # float values really went through int16

    # What the files say, read without ITK: classic MR, the geometry in DICOM's own terms.
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    d = img.direction_matrix
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient],
                               np.r_[d[:, 0], d[:, 1]], atol=1e-9)
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], ORIGIN, atol=1e-9)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [SPACING[1], SPACING[0]])
    last = pydicom.dcmread(files[-1])
    np.testing.assert_allclose([float(v) for v in last.ImagePositionPatient],
                               img.index_to_physical([0, 0, SIZE_IJK[2] - 1]), atol=1e-9)
    np.testing.assert_allclose(first.pixel_array * step + float(first.RescaleIntercept), img.array[0],
                               atol=step / 2 + 1e-4)


def test_dicom_series_keeps_integer_images_exactly(tmp_path):
    labels = (np.arange(np.prod(SIZE_IJK)).reshape(SIZE_IJK[::-1]) % 7 - 3).astype(np.int16)
    img = Image(labels, SPACING, ORIGIN, tuple(_rotation(6).ravel()))
    back = read_image(write_image(img, tmp_path / "labels", dicom=True), dtype=None)
    _assert_same_geometry(back, img)
    np.testing.assert_array_equal(back.array, labels)


def test_dicom_series_uids_follow_dicom_uid_and_stale_slices_go(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    img = _oblique(seed=7)
    a = write_image(img, tmp_path / "a", dicom_uid="1.2")
    b = write_image(img, tmp_path / "b", dicom_uid="1.2")
    c = write_image(img, tmp_path / "c")
    uid = [pydicom.dcmread(f / "slice_0000.dcm").SeriesInstanceUID for f in (a, b, c)]
    assert uid[0] == uid[1] != uid[2]
    assert (a / "slice_0003.dcm").read_bytes() == (b / "slice_0003.dcm").read_bytes()

    # Rewriting a folder with fewer slices must not leave the old ones to join the new series.
    thin = Image(img.array[:5], SPACING, ORIGIN, img.direction)
    write_image(thin, a, dicom_uid="1.3")
    assert len(list(a.iterdir())) == 5
    assert read_image(a).size == (20, 24, 5)


def test_dicom_series_refuses_what_it_cannot_store(tmp_path):
    left = _oblique(seed=8, det=-1.0)
    with pytest.raises(ImageError) as e:
        write_image(left, tmp_path / "left", dicom=True)
    _assert_error(e, tmp_path / "left", "left-handed")
    bad = _volume()
    bad[2, 3, 4] = np.nan
    with pytest.raises(NonFiniteError) as e:
        write_image(Image(bad, SPACING, ORIGIN, tuple(np.eye(3).ravel())), tmp_path / "nan", dicom=True)
    _assert_error(e, tmp_path / "nan", "NaN")


def test_bool_mask_writes_as_uint8(tmp_path):
    mask = _volume() > 50
    img = Image(mask, SPACING, ORIGIN, tuple(_rotation(9).ravel()))
    back = read_image(write_image(img, tmp_path / "mask.nii.gz"), dtype=None)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.astype(np.uint8))


def test_image_affine_agrees_with_itk(tmp_path):
    img = _oblique(seed=10)
    ref = img.reference()
    assert ref.GetSize() == img.size and ref.GetPixelID() == sitk.sitkUInt8
    ijk = [(0.0, 0.0, 0.0), (19.0, 2.5, 15.0), (3.0, 23.0, 7.25)]
    itk = np.array([ref.TransformContinuousIndexToPhysicalPoint(p) for p in ijk])
    np.testing.assert_allclose(img.index_to_physical(ijk), itk, atol=1e-9)
    np.testing.assert_allclose(img.physical_to_index(itk), ijk, atol=1e-9)
    assert img.same_geometry(Image.from_sitk(img.to_sitk()))
    assert not img.same_geometry(Image(img.array, SPACING, (ORIGIN[0] + 1e-3, *ORIGIN[1:]), img.direction))


# ------------------------------------------------------------------------------------ real DICOM

def test_real_multiframe_dicom_reads_as_3d_with_sane_spacing(pydicom_data):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom_data / "emri_small.dcm"
    ds = pydicom.dcmread(path)
    img = read_image(path)
    assert img.ndim == 3
    assert img.array.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns) == (10, 64, 64)
    assert all(np.isfinite(s) and 0.1 < s < 10 for s in img.spacing)
    # The file records no frame positions, only Spacing Between Slices; that is the k spacing.
    assert img.spacing[2] == pytest.approx(float(ds.SpacingBetweenSlices)) == pytest.approx(1.2)
    np.testing.assert_array_equal(img.array, ds.pixel_array.astype(np.float32))


def test_real_single_frame_dicom_is_2d(pydicom_data):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom_data / "RG1_UNCI.dcm"
    with pytest.raises(DimensionError) as e:
        read_image(path)
    _assert_error(e, path, "is 2-D", "a 3-D volume is needed")
    flat = read_image(path, require_3d=False)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert flat.ndim == 2 and flat.array.shape == (ds.Rows, ds.Columns)


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, phrase", [
    ("garbage.nii.gz", "not in an image format we can read"),
    ("garbage.nii", "not in an image format we can read"),
    ("garbage.nrrd", "not in an image format we can read"),
    ("garbage", "not in an image format we can read"),
    ("garbage.dcm", "cannot be read as an image"),
])
def test_garbage_file_is_unreadable(tmp_path, name, phrase):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(11).bytes(4000))
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, phrase)


@pytest.mark.parametrize("suffix, compress", [(".nii.gz", True), (".nii", False), (".nrrd", True),
                                              (".nrrd", False), (".mha", False)])
def test_file_cut_in_half_is_truncated(tmp_path, suffix, compress):
    path = write_image(_oblique(), tmp_path / f"vol{suffix}", compress=compress)
    read_image(path)  # whole, it reads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, "is truncated")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_file_cut_inside_its_header_is_truncated(tmp_path, suffix):
    path = write_image(_oblique(), tmp_path / f"vol{suffix}")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, "is truncated")


def test_nifti_with_a_few_bytes_missing_is_truncated(tmp_path):
    """ITK would zero-fill the missing voxels; the header's size gives it away."""
    path = write_image(_oblique(), tmp_path / "vol.nii", compress=False)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    n = int(np.prod(SIZE_IJK)) * 4
    _assert_error(e, path, "is truncated", f"declares {n} bytes", f"holds only {n - 4}")


def test_gzip_with_corrupt_data_is_unreadable(tmp_path):
    path = write_image(_oblique(), tmp_path / "vol.nii.gz")
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC/length trailer: the stream is complete but wrong
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, "corrupt")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.nii.gz"
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(UnreadableImageError) as e:
        read_image(path)
    _assert_error(e, path, "empty (0 bytes)")


@pytest.mark.parametrize("name", ["flat.nii.gz", "flat.png", "one_slice.nrrd"])
def test_2d_file_where_3d_is_needed(tmp_path, name):
    plane = (np.random.default_rng(12).random((24, 20)) * 200).astype(np.uint8)
    arr = plane[None] if name.startswith("one_slice") else plane  # a 3-D file one slice thick is 2-D
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(DimensionError) as e:
        read_image(path)
    _assert_error(e, path, "is 2-D", "a 3-D volume is needed")
    assert read_image(path, require_3d=False).array.shape == (24, 20)


def test_4d_file_with_several_volumes(tmp_path):
    vols = [sitk.GetImageFromArray(_volume(s)) for s in range(3)]
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    with pytest.raises(DimensionError) as e:
        read_image(path)
    _assert_error(e, path, "is 4-D", "3 volumes")


def test_4d_file_with_one_volume_is_3d(tmp_path):
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_volume())]), str(path))
    np.testing.assert_array_equal(read_image(path).array, _volume())


def test_colour_image_is_not_scalar(tmp_path):
    path = tmp_path / "rgb.png"
    rgb = (np.random.default_rng(13).random((24, 20, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    with pytest.raises(DimensionError) as e:
        read_image(path, require_3d=False)
    _assert_error(e, path, "3 components")


@pytest.mark.parametrize("bad, counts", [((np.nan,), "2 NaN and 0 infinite"),
                                         ((np.inf,), "0 NaN and 2 infinite"),
                                         ((np.nan, -np.inf), "1 NaN and 1 infinite")])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_finite_voxels(tmp_path, bad, counts, suffix):
    arr = _volume()
    arr[1, 2, 3] = bad[0]
    arr[4, 5, 6] = bad[-1]
    # ITK's NIfTI reader silently turns NaN and Inf into 0: the NIfTI cases test that they are found anyway.
    path = write_image(Image(arr, SPACING, ORIGIN, tuple(np.eye(3).ravel())), tmp_path / f"v{suffix}")
    with pytest.raises(NonFiniteError) as e:
        read_image(path)
    _assert_error(e, path, f"has {counts} voxels")


def test_constant_volume(tmp_path):
    arr = np.full(SIZE_IJK[::-1], 3.5, np.float32)
    path = write_image(Image(arr, SPACING, ORIGIN, tuple(np.eye(3).ravel())), tmp_path / "flat.nii.gz")
    with pytest.raises(EmptyImageError) as e:
        read_image(path)
    _assert_error(e, path, "is constant", "3.5")


def _nrrd_header(sizes: str) -> bytes:
    return f"NRRD0004\ntype: float\ndimension: 3\nsizes: {sizes}\nencoding: raw\nendian: little\n\n".encode()


def test_zero_size_volume_in_a_file(tmp_path):
    # NIfTI: a valid file whose header is edited to declare 0 slices (ITK alone would read it as 1).
    nii = write_image(_oblique(), tmp_path / "zero.nii", compress=False)
    data = bytearray(nii.read_bytes())
    data[46:48] = struct.pack("<h", 0)  # dim[3]
    nii.write_bytes(bytes(data))
    nrrd = tmp_path / "zero.nrrd"
    nrrd.write_bytes(_nrrd_header("20 24 0"))
    for path in (nii, nrrd):
        with pytest.raises(EmptyImageError) as e:
            read_image(path)
        _assert_error(e, path, "has no voxels", "(20, 24, 0)")


def test_zero_size_volume_in_memory():
    empty = Image(np.zeros((0, 24, 20), np.float32), SPACING, ORIGIN, tuple(np.eye(3).ravel()))
    with pytest.raises(EmptyImageError) as e:
        validate(empty)
    assert "<in-memory image>" in str(e.value) and "has no voxels" in str(e.value)
    with pytest.raises(EmptyImageError) as e:
        validate(empty, "/data/x.nii")
    assert str(e.value).startswith("/data/x.nii: ")


def test_too_large_is_refused_before_the_voxels_are_read(tmp_path):
    n = int(np.prod(SIZE_IJK))
    path = write_image(_oblique(), tmp_path / "vol.nii", compress=False)
    assert read_image(path, max_voxels=n).size == SIZE_IJK  # at the limit is fine
    # Keep the header, drop the voxels: only a reader that never reaches the voxels says "too large".
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(TooLargeError) as e:
        read_image(path, max_voxels=n - 1)
    _assert_error(e, path, f"has {n} voxels", f"more than the limit of {n - 1}")
    with pytest.raises(UnreadableImageError):
        read_image(path, max_voxels=n)


def test_too_large_dicom_series(tmp_path):
    folder = write_image(_oblique(), tmp_path / "series", dicom=True)
    with pytest.raises(TooLargeError) as e:
        read_image(folder, max_voxels=1000)
    _assert_error(e, folder, "more than the limit of 1000")


def test_dicom_series_with_a_truncated_slice(tmp_path):
    folder = write_image(_oblique(), tmp_path / "series", dicom=True)
    bad = folder / "slice_0006.dcm"
    bad.write_bytes(bad.read_bytes()[:600])
    with pytest.raises(UnreadableImageError) as e:
        read_image(folder)
    _assert_error(e, folder, "cannot be read (truncated or corrupt)", "slice_0006.dcm")


def test_dicom_series_with_a_missing_slice(tmp_path):
    folder = write_image(_oblique(), tmp_path / "series", dicom=True)
    (folder / "slice_0006.dcm").unlink()
    with pytest.raises(UnreadableImageError) as e:
        read_image(folder)
    _assert_error(e, folder, "not evenly spaced", "a slice is missing")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UnreadableImageError) as e:
        read_image(tmp_path)
    _assert_error(e, tmp_path, "no readable DICOM series")


def test_error_classes_are_value_errors_with_path_and_problem(tmp_path):
    path = tmp_path / "nowhere.nrrd"
    with pytest.raises(ValueError) as e:
        read_image(path)
    assert isinstance(e.value, UnreadableImageError)
    assert e.value.path == str(path) and e.value.problem == "no such file or folder"

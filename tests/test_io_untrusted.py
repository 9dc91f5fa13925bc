"""Untrusted image reading (issue 17): what a crafted upload could make the reader do, refused.

Every test builds its files here (headers written by hand where a writer would not produce them),
on volumes of at most 64^3, so the module runs in seconds. Each refusal is checked for its own
exception class and a one-line message naming the problem. Where ITK alone would have done the
harm (followed a path, hidden a NaN spacing), a test shows that too, so the check is known to matter.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import pickle
import resource
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from xai_core.io import (
    BudgetBusyError,
    DecodeBudgetError,
    DecompressionBombError,
    DetachedDataError,
    DimensionError,
    EmptyImageError,
    GeometryError,
    Image,
    ImageError,
    MemoryBudget,
    NonImageDicomError,
    SpacingError,
    TooLargeError,
    TooSmallError,
    UnreadableImageError,
    decode_budget,
    read_image,
    read_untrusted_image,
    sniff_format,
    write_image,
)
from xai_core.settings import Settings

SPACING = (1.2, 0.9, 2.5)
ORIGIN = (-20.0, 15.0, 7.5)
SECRET = b"canary-" + os.urandom(8).hex().encode() + b"\n"  # bytes that must never come back from a read


def volume(shape_kji=(12, 14, 16), seed=0) -> Image:
    rng = np.random.default_rng(seed)
    return Image(rng.normal(100.0, 20.0, shape_kji).astype(np.float32), SPACING, ORIGIN, (1, 0, 0, 0, 1, 0, 0, 0, 1))


def meta_header(data_file: str, dims=(256, 1, 2), extra: str = "", etype="MET_UCHAR") -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, dims))}\n{extra}"
            f"ElementType = {etype}\nElementDataFile = {data_file}\n").encode()


def nrrd_header(fields: str, dims=(256, 1, 2), typ="uint8", encoding="raw") -> bytes:
    return (f"NRRD0004\ntype: {typ}\ndimension: 3\nsizes: {' '.join(map(str, dims))}\nencoding: {encoding}\n"
            f"{fields}").encode()


def one_line(e: ImageError) -> str:
    msg = str(e)
    assert "\n" not in msg and e.problem in msg
    return msg


@pytest.fixture
def secret(tmp_path) -> Path:
    """A server file an upload must not reach (stands in for /etc/passwd; 256 x 1 x 2 bytes of it)."""
    path = tmp_path / "server_secret.txt"
    path.write_bytes((SECRET * 64)[:512])
    return path


@pytest.fixture(scope="module")
def pydicom_data() -> Path:
    data_store = pytest.importorskip("data_store")
    return Path(data_store.DataStore().data_path)


# ------------------------------------------------------------------------------- what still reads

@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd", "v.mha", "series"])
def test_good_files_read_as_read_image_reads_them(tmp_path, name):
    path = write_image(volume(), tmp_path / name)
    got, want = read_untrusted_image(path), read_image(path)
    np.testing.assert_array_equal(got.array, want.array)
    assert got.same_geometry(want) and got.spacing == pytest.approx(SPACING, abs=1e-5)


def test_real_multiframe_dicom_image_still_reads(pydicom_data):
    got = read_untrusted_image(pydicom_data / "emri_small.dcm")
    assert got.size == (64, 64, 10)


def test_format_is_told_by_content_not_by_name(tmp_path):
    """A MetaImage sent as 'x.nii.gz' (clients choose names) is read as the MetaImage it is."""
    path = write_image(volume(), tmp_path / "v.mha")
    renamed = path.rename(tmp_path / "upload.nii.gz")
    assert sniff_format(renamed) == "meta"
    np.testing.assert_array_equal(read_untrusted_image(renamed).array, volume().array)


def test_read_image_untrusted_flag_is_the_untrusted_reader(tmp_path, secret):
    path = tmp_path / "leak.mha"
    path.write_bytes(meta_header(str(secret)))
    with pytest.raises(DetachedDataError):
        read_image(path, untrusted=True)


def test_all_zero_label_is_allowed_only_when_asked(tmp_path):
    path = write_image(volume().with_array(np.zeros((12, 14, 16), np.uint8)), tmp_path / "label.nii.gz")
    with pytest.raises(EmptyImageError, match="constant"):
        read_untrusted_image(path, dtype=None)
    label = read_untrusted_image(path, dtype=None, allow_constant=True)
    assert label.array.dtype == np.uint8 and not label.array.any()


# ---------------------------------------------------------------------------- headers naming files

def test_itk_alone_would_serve_the_named_file(tmp_path, secret):
    """The attack is real: SimpleITK reads the bytes of the file a MetaImage header names."""
    path = tmp_path / "leak.mha"
    path.write_bytes(meta_header(str(secret)))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes().startswith(SECRET)


@pytest.mark.parametrize("data_file", ["SECRET", "/etc/passwd", "/no/such/file", "LIST", "slice%03d.raw 1 10 1",
                                       "../../x.raw", "local.raw"])
def test_metaimage_naming_another_file_is_refused(tmp_path, secret, data_file):
    data_file = str(secret) if data_file == "SECRET" else data_file
    path = tmp_path / "upload.mha"
    path.write_bytes(meta_header(data_file) + b"\0" * 512)
    with pytest.raises(DetachedDataError, match="ElementDataFile") as e:
        read_untrusted_image(path)
    assert "ElementDataFile = LOCAL" in one_line(e.value)


@pytest.mark.parametrize("field", ["data file: SECRET", "datafile: SECRET", "data file: LIST\nSECRET",
                                   "data file: slice%03d.raw 0 9 1", "DATA FILE: SECRET"])
def test_nrrd_with_detached_data_is_refused(tmp_path, secret, field):
    path = tmp_path / "upload.nrrd"
    path.write_bytes(nrrd_header(field.replace("SECRET", str(secret)) + "\n\n"))
    with pytest.raises(DetachedDataError, match="NRRD header that takes its voxels from another file"):
        read_untrusted_image(path)


def test_nrrd_detached_header_without_data_is_refused(tmp_path):
    path = tmp_path / "upload.nhdr"
    path.write_bytes(nrrd_header("space: left-posterior-superior\n"))  # no blank line, no data
    with pytest.raises(UnreadableImageError, match="no voxel data follows"):
        read_untrusted_image(path)


@pytest.mark.parametrize("kind", ["nifti-pair", "analyze"])
def test_hdr_img_pairs_are_refused(tmp_path, kind):
    hdr = write_image(volume(), tmp_path / "pair.hdr")  # ITK writes a NIfTI pair: pair.hdr + pair.img
    assert (tmp_path / "pair.img").exists()
    data = bytearray(hdr.read_bytes())
    if kind == "analyze":
        data[344:348] = b"\0\0\0\0"  # Analyze 7.5 has no NIfTI magic
    upload = tmp_path / "upload.nii"  # what an upload named 'x.hdr' is saved as
    upload.write_bytes(bytes(data))
    with pytest.raises(DetachedDataError, match=r"separate .*file") as e:
        read_untrusted_image(upload)
    assert ("Analyze" in e.value.problem) == (kind == "analyze")


def test_named_file_is_never_opened(tmp_path):
    """The header check runs before ITK: a FIFO named by the header is never opened (opening it to read
    would block until a writer came)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name, header in (("u.mha", meta_header(str(fifo))), ("u.nrrd", nrrd_header(f"data file: {fifo}\n\n"))):
        (tmp_path / name).write_bytes(header)
        outcome: list[BaseException | None] = []
        t = threading.Thread(target=lambda n=name, out=outcome: out.append(_raises(read_untrusted_image, tmp_path / n)),
                             daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"{name}: the reader opened the FIFO the header names"
        assert isinstance(outcome[0], DetachedDataError)
    with pytest.raises(OSError) as e:  # no process holds the FIFO open for reading
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert e.value.errno == errno.ENXIO


def _raises(fn, path, budget: MemoryBudget | None = None) -> BaseException | None:
    try:
        fn(path, budget=budget)
    except BaseException as e:  # noqa: BLE001 - handed back to the test thread
        return e
    return None


@pytest.mark.parametrize("content, error, words", [
    (b"\x1f\x8b" + gzip.compress(b"NRRD0004\n")[2:], UnreadableImageError, "compress NIfTI only"),
    (b"P5\n16 16\n255\n" + bytes(256), UnreadableImageError, "not in a format uploads may use"),
    (b"# vtk DataFile Version 3.0\n", UnreadableImageError, "not in a format uploads may use"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), UnreadableImageError, "not in a format uploads may use"),
])
def test_only_the_upload_formats_are_read(tmp_path, content, error, words):
    path = tmp_path / "upload.nii.gz"
    path.write_bytes(content)
    with pytest.raises(error, match=words):
        read_untrusted_image(path)


# ---------------------------------------------------------------------------------- non-image DICOM

@pytest.mark.parametrize("source, name", [
    ("data_store:liver.dcm", "Segmentation Storage"),
    ("pydicom:test-SR.dcm", "Comprehensive SR Storage"),
    ("pydicom:rtdose.dcm", "RT Dose Storage"),
    ("pydicom:rtplan.dcm", "RT Plan Storage"),
    ("made:1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set Storage"),
    ("made:1.2.840.10008.5.1.4.1.1.11.1", "Grayscale Softcopy Presentation State Storage"),
    ("made:1.2.840.10008.5.1.4.1.1.88.59", "Key Object Selection Document Storage"),
    ("made:1.2.3.4.5.6.7", "unknown"),
])
def test_non_image_dicom_is_refused_by_name(tmp_path, pydicom_data, source, name):
    where, _, what = source.partition(":")
    if where == "data_store":
        path = pydicom_data / what
    elif where == "pydicom":
        from pydicom.data import get_testdata_file

        path = Path(get_testdata_file(what))
    else:
        path = _dicom_object(tmp_path / "object.dcm", what)
    with pytest.raises(NonImageDicomError, match=name) as e:
        read_untrusted_image(path)
    assert "not an image" in one_line(e.value)


def test_segmentation_disguised_as_ct_in_its_file_meta_is_refused(tmp_path, pydicom_data):
    import pydicom
    from pydicom.uid import CTImageStorage

    ds = pydicom.dcmread(pydicom_data / "liver.dcm")
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.save_as(tmp_path / "seg_as_ct.dcm")
    with pytest.raises(NonImageDicomError, match="Segmentation Storage"):
        read_untrusted_image(tmp_path / "seg_as_ct.dcm")


def test_dicom_without_part10_header_is_refused(tmp_path, pydicom_data):
    raw = (pydicom_data / "emri_small.dcm").read_bytes()
    path = tmp_path / "no_preamble.dcm"
    path.write_bytes(raw[132:])  # dataset without preamble and DICM marker
    with pytest.raises(NonImageDicomError, match="Part 10"):
        read_untrusted_image(path)


def _dicom_object(path: Path, sop_class: str) -> Path:
    """A minimal Part 10 DICOM object of ``sop_class`` (no pixels), as a client could send one."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", "X"
    ds.is_little_endian, ds.is_implicit_VR = True, False
    pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


# ------------------------------------------------------------------------------------------ spacing

def _nifti_with(tmp_path: Path, gz: bool, **patch) -> Path:
    """A NIfTI-1 file whose header fields are overwritten (pixdim1 = first spacing, qoffset_x = origin x)."""
    raw = write_image(volume(), tmp_path / "v.nii", compress=False).read_bytes()
    data = bytearray(raw)
    offsets = {"pixdim1": 80, "pixdim3": 88, "qoffset_x": 268, "srow_x0": 280}
    for key, value in patch.items():
        struct.pack_into("<f", data, offsets[key], value)
    path = tmp_path / ("bad.nii.gz" if gz else "bad.nii")
    path.write_bytes(gzip.compress(bytes(data), 1) if gz else bytes(data))
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("value", [float("nan"), 0.0, -2.0, float("inf")])
def test_nifti_spacing_that_itk_would_hide_is_refused(tmp_path, gz, value):
    path = _nifti_with(tmp_path, gz, pixdim1=value)
    assert sitk.ReadImage(str(path)).GetSpacing()[0] in (1.0, 2.0, float("inf"))  # what ITK makes of it
    with pytest.raises(SpacingError, match="spacing") as e:
        read_untrusted_image(path)
    assert "finite and positive" in one_line(e.value)


def test_nifti_zero_length_sform_axis_is_refused(tmp_path):
    with pytest.raises(SpacingError, match="zero-length axis"):
        read_untrusted_image(_nifti_with(tmp_path, False, srow_x0=0.0))


def test_nifti_non_finite_origin_is_refused(tmp_path):
    with pytest.raises(GeometryError, match="non-finite"):
        read_untrusted_image(_nifti_with(tmp_path, False, qoffset_x=float("nan")))


@pytest.mark.parametrize("fields", ["spacings: nan 1 1\n", "spacings: 0 1 1\n", "spacings: 1 -1 1\n",
                                    "space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n",
                                    "space: left-posterior-superior\nspace directions: (nan,0,0) (0,1,0) (0,0,1)\n"])
def test_nrrd_bad_spacing_is_refused(tmp_path, fields):
    path = tmp_path / "upload.nrrd"
    path.write_bytes(nrrd_header(fields + "\n", dims=(10, 10, 10)) + np.arange(1000, dtype=np.uint8).tobytes())
    with pytest.raises(SpacingError):
        read_untrusted_image(path)


@pytest.mark.parametrize("spacing", ["nan 1 1", "0 1 1", "-1 1 1"])
def test_metaimage_bad_spacing_is_refused(tmp_path, spacing):
    path = tmp_path / "upload.mha"
    path.write_bytes(meta_header("LOCAL", dims=(10, 10, 10), extra=f"ElementSpacing = {spacing}\n")
                     + np.arange(1000, dtype=np.uint8).tobytes())
    with pytest.raises(SpacingError, match="spacing"):
        read_untrusted_image(path)


# -------------------------------------------------------------------------------------- small volumes

def test_volume_below_the_minimum_size_is_refused(tmp_path):
    path = write_image(volume((4, 30, 30)), tmp_path / "thin.nii.gz")
    with pytest.raises(TooSmallError, match=r"size \(30, 30, 4\).*at least 8 voxels") as e:
        read_untrusted_image(path)
    one_line(e.value)
    assert read_untrusted_image(path, settings=Settings(untrusted_min_size=4)).size == (30, 30, 4)
    assert read_untrusted_image(write_image(volume((8, 8, 8)), tmp_path / "cube.nii.gz")).size == (8, 8, 8)


def test_label_whose_header_has_a_zero_dimension_is_refused(tmp_path):
    raw = bytearray(write_image(volume(), tmp_path / "v.nii", compress=False).read_bytes())
    struct.pack_into("<h", raw, 46, 0)  # dim[3] = 0
    (tmp_path / "zero.nii").write_bytes(bytes(raw))
    with pytest.raises(EmptyImageError, match="no voxels"):
        read_untrusted_image(tmp_path / "zero.nii", dtype=None, allow_constant=True)


# -------------------------------------------------------------------------------- compression bombs

_ZEROS_MEMBER: bytes | None = None


def _zeros_member() -> bytes:
    """One gzip member inflating to 64 MiB of zeros (made once; 64 KiB)."""
    global _ZEROS_MEMBER
    if _ZEROS_MEMBER is None:
        _ZEROS_MEMBER = gzip.compress(bytes(64 << 20), 6)
    return _ZEROS_MEMBER


def gzip_nifti_with_trailing(image: Image, tmp: Path, trailing_mib: int) -> bytes:
    """A .nii.gz of ``image`` followed, in the same gzip file, by ``trailing_mib`` MiB of zeros (whole
    64 MiB members: gzip readers inflate every member). 2.2 GB of trailing data is about 2.2 MB."""
    nii = write_image(image, tmp / "plain.nii", compress=False).read_bytes()
    assert trailing_mib % 64 == 0
    return gzip.compress(nii, 6) + _zeros_member() * (trailing_mib // 64)


def test_gzip_nifti_with_gigabytes_of_trailing_data_is_refused_in_milliseconds(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip_nifti_with_trailing(volume((64, 64, 64)), tmp_path, 34 * 64))  # 2.2 GB inflated
    assert path.stat().st_size < 3 * 2**20
    for reader in (read_untrusted_image, read_image):  # the trusted reader stops at the cap too
        cpu = time.process_time()
        with pytest.raises(DecompressionBombError, match="inflates to more than") as e:
            reader(path)
        assert time.process_time() - cpu < 0.5
        one_line(e.value)


def test_gzip_nifti_with_a_little_padding_still_reads(tmp_path):
    image = volume((16, 16, 16))
    nii = write_image(image, tmp_path / "plain.nii", compress=False).read_bytes()
    path = tmp_path / "padded.nii.gz"
    path.write_bytes(gzip.compress(nii + bytes(200_000)))  # within the 1 MiB slack
    np.testing.assert_array_equal(read_untrusted_image(path).array, image.array)


def test_gzip_nrrd_that_inflates_beyond_its_header_is_refused(tmp_path):
    data = np.arange(1000, dtype=np.uint8).tobytes() + bytes(8 << 20)
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(nrrd_header("\n", dims=(10, 10, 10), encoding="gzip") + gzip.compress(data, 1))
    with pytest.raises(DecompressionBombError):
        read_untrusted_image(path)


def test_compressed_metaimage_that_inflates_beyond_its_header_is_refused(tmp_path):
    data = np.arange(1000, dtype=np.uint8).tobytes() + bytes(8 << 20)
    blob = zlib.compress(data, 1)
    path = tmp_path / "bomb.mha"
    path.write_bytes(meta_header("LOCAL", dims=(10, 10, 10),
                                 extra=f"CompressedData = True\nCompressedDataSize = {len(blob)}\n") + blob)
    with pytest.raises(DecompressionBombError, match="zlib"):
        read_untrusted_image(path)


# ----------------------------------------------------------------------------------- memory budget

def gzip_nifti_declaring(tmp: Path, size_ijk=(512, 512, 512), datatype=16, bitpix=32) -> Path:
    """A .nii.gz whose header declares ``size_ijk`` voxels (float32 by default) of zeros: 512^3 float32
    is 512 MiB once inflated and about 0.5 MiB on the wire."""
    raw = bytearray(write_image(volume((8, 8, 8)), tmp / "small.nii", compress=False).read_bytes()[:352])
    struct.pack_into("<4h", raw, 40, 3, *size_ijk)
    struct.pack_into("<2h", raw, 70, datatype, bitpix)
    nbytes = int(np.prod(size_ijk)) * bitpix // 8
    assert nbytes % (64 << 20) == 0
    path = tmp / "declares_big.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)) + _zeros_member() * (nbytes // (64 << 20)))
    return path


def test_declared_voxels_too_costly_to_decode_are_refused_before_decoding(tmp_path):
    path = gzip_nifti_declaring(tmp_path)
    assert path.stat().st_size < 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = time.process_time()
    with pytest.raises(DecodeBudgetError, match="per-upload limit") as e:
        read_untrusted_image(path)
    assert isinstance(e.value, TooLargeError)  # 413 over HTTP
    assert time.process_time() - cpu < 0.5  # refused from the header: nothing inflated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024  # KiB: nothing allocated
    one_line(e.value)


def test_memory_budget_refuses_more_than_it_holds_and_times_out_when_busy():
    budget = MemoryBudget(100)
    with pytest.raises(DecodeBudgetError, match="decode budget"):
        with budget.reserve(101, timeout=1):
            pass
    with budget.reserve(60, timeout=1):
        assert budget.used == 60
        start = time.monotonic()
        with pytest.raises(BudgetBusyError, match="try again"):
            with budget.reserve(50, timeout=0.2):
                pass
        assert 0.15 < time.monotonic() - start < 2
        with budget.reserve(40, timeout=0):
            assert budget.used == 100
    assert budget.used == 0
    with pytest.raises(RuntimeError):
        with budget.reserve(100, timeout=0):
            raise RuntimeError("a failing decode still gives its share back")
    assert budget.used == 0


def test_memory_budget_is_never_exceeded_by_concurrent_holders():
    budget = MemoryBudget(1000)
    seen, errors = [], []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            n = int(rng.integers(100, 700))
            try:
                with budget.reserve(n, timeout=5):
                    with lock:
                        seen.append(budget.used)
                    time.sleep(0.001)
            except ImageError as e:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(seen) == 240 and max(seen) <= 1000 and budget.used == 0


def test_untrusted_reads_reserve_in_the_shared_budget(tmp_path):
    path = write_image(volume((16, 16, 16)), tmp_path / "v.nii.gz")
    cost = 16**3 * (2 * 4 + 5)  # float32 stored: ITK buffer + numpy copy + result + mask
    budget = MemoryBudget(cost)
    fast = Settings(untrusted_budget_wait_s=0.1)
    with budget.reserve(1, timeout=0):  # another upload holds part of the budget
        with pytest.raises(BudgetBusyError):
            read_untrusted_image(path, budget=budget, settings=fast)
    assert read_untrusted_image(path, budget=budget, settings=fast).size == (16, 16, 16)
    assert budget.used == 0
    nan = volume((16, 16, 16))
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(ImageError):
        read_untrusted_image(write_image(nan, tmp_path / "nan.nrrd"), budget=budget, settings=fast)
    assert budget.used == 0  # a refused read gives its share back


class TrackingBudget(MemoryBudget):
    """A budget that records the most it ever held and holds each share a little longer (so that
    concurrent reads really overlap)."""

    peak = 0

    @contextlib.contextmanager
    def reserve(self, nbytes, **kw):
        with super().reserve(nbytes, **kw):
            self.peak = max(self.peak, self.used)
            time.sleep(0.05)
            yield


def test_concurrent_reads_wait_for_each_other_within_the_budget(tmp_path):
    paths = [write_image(volume((16, 16, 16), seed=i), tmp_path / f"v{i}.nii.gz") for i in range(6)]
    cost = 16**3 * (2 * 4 + 5)
    budget = TrackingBudget(2 * cost)  # room for two reads at once
    results: list[BaseException | None] = []
    threads = [threading.Thread(target=lambda p=p: results.append(_raises(read_untrusted_image, p, budget)))
               for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [None] * 6
    assert cost <= budget.peak <= 2 * cost and budget.used == 0


def test_the_process_wide_budget_is_one_object():
    assert decode_budget() is decode_budget(Settings(untrusted_memory_budget_mb=1))
    assert decode_budget().limit == int(Settings().untrusted_memory_budget_mb * 2**20)


# ------------------------------------------------------------------------------------ the error family

@pytest.mark.parametrize("cls", [DetachedDataError, NonImageDicomError, GeometryError, SpacingError,
                                 TooSmallError, DecompressionBombError, DecodeBudgetError, BudgetBusyError])
def test_refusals_are_image_errors_with_path_and_problem(cls):
    e = cls("/uploads/x.nii.gz", "is wrong in one way")
    assert isinstance(e, ImageError) and isinstance(e, ValueError)
    assert str(e) == "/uploads/x.nii.gz: is wrong in one way"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and back.problem == e.problem
    assert issubclass(DecodeBudgetError, TooLargeError) and issubclass(SpacingError, GeometryError)
    assert not issubclass(TooSmallError, DimensionError)


def test_compressed_metaimage_with_crlf_header_reads(tmp_path):
    """The inflation check finds the data after a header with Windows line ends."""
    raw = write_image(volume(), tmp_path / "v.mha").read_bytes()  # ITK compresses MetaImage data
    head, sep, data = raw.partition(b"ElementDataFile = LOCAL\n")
    assert b"CompressedData = True" in head
    path = tmp_path / "crlf.mha"
    path.write_bytes(head.replace(b"\n", b"\r\n") + sep.replace(b"\n", b"\r\n") + data)
    np.testing.assert_array_equal(read_untrusted_image(path).array, volume().array)

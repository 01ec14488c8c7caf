"""Medical Segmentation Decathlon listing, train/validation split and dataset integrity checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from .config import DEFAULT_VAL_FRACTION
from .errors import DataError as DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True, kw_only=True, slots=True)
class Dataset:
    """A Decathlon dataset: labelled pairs (sorted by file name) and unlabelled test images."""

    root: Path
    labelled: list[dict[str, str]]  # [{"image": path, "label": path}], sorted
    test: list[str]

    def split(self, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Sorted split: the last ceil(val_fraction * N) cases (at least 1) validate.

        With MSD Task09 (41 cases) and the default 0.2 this is the bundle's split: first 32 train,
        last 9 validate.
        """
        n = len(self.labelled)
        if n < 2:
            raise DataError(
                f"{self.root}: found {n} labelled case(s); training needs at least 2 "
                "(one to train, one to validate) in imagesTr/labelsTr"
            )
        n_val = min(max(1, math.ceil(val_fraction * n - 1e-9)), n - 1)
        return self.labelled[: n - n_val], self.labelled[n - n_val :]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_files(directory: Path) -> list[Path]:
    # MSD archives ship macOS "._" resource files next to the volumes; they are not images.
    return sorted(p for p in directory.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("._"))


def list_dataset(root: str | Path) -> Dataset:
    """List a Decathlon dataset from `dataset.json` if present, else by globbing the folders.

    Raises:
        DataError: missing folders or files, or unmatched image/label names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset directory {str(root)!r} does not exist: pass --data DIR with imagesTr/ and labelsTr/")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        labelled, test = _from_json(root, meta_path)
    else:
        labelled, test = _from_folders(root)
    labelled.sort(key=lambda d: Path(d["image"]).name)
    test.sort(key=lambda p: Path(p).name)
    return Dataset(root=root, labelled=labelled, test=test)


def _from_json(root: Path, meta_path: Path) -> tuple[list[dict[str, str]], list[str]]:
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: not valid JSON ({exc}); fix or remove it to list the folders instead") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training", []), list):
        raise DataError(f"{meta_path}: expected an object with a 'training' list of {{image, label}} entries")
    labelled = []
    for i, entry in enumerate(meta.get("training", [])):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training[{i}] must be an object with 'image' and 'label'")
        image, label = root / entry["image"], root / entry["label"]
        for p in (image, label):
            if not p.is_file():
                raise DataError(f"{meta_path}: training[{i}] names {str(p)!r}, which does not exist")
        labelled.append({"image": str(image), "label": str(label)})
    test = []
    for i, entry in enumerate(meta.get("test", [])):
        rel = entry["image"] if isinstance(entry, dict) else entry
        p = root / rel
        if not p.is_file():
            raise DataError(f"{meta_path}: test[{i}] names {str(p)!r}, which does not exist")
        test.append(str(p))
    return labelled, test


def _from_folders(root: Path) -> tuple[list[dict[str, str]], list[str]]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(
                f"{str(d)!r} is missing: a Decathlon dataset needs imagesTr/ and labelsTr/ (or a dataset.json)"
            )
    images = {_stem(p): p for p in _nifti_files(images_dir)}
    labels = {_stem(p): p for p in _nifti_files(labels_dir)}
    only_images = sorted(set(images) - set(labels))
    only_labels = sorted(set(labels) - set(images))
    if only_images:
        raise DataError(
            f"{images[only_images[0]]}: no label with the same name in {labels_dir} ({len(only_images)} unmatched image(s))"
        )
    if only_labels:
        raise DataError(
            f"{labels[only_labels[0]]}: no image with the same name in {images_dir} ({len(only_labels)} unmatched label(s))"
        )
    labelled = [{"image": str(images[k]), "label": str(labels[k])} for k in sorted(images)]
    test_dir = root / "imagesTs"
    test = [str(p) for p in _nifti_files(test_dir)] if test_dir.is_dir() else []
    return labelled, test


def read_volume(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a NIfTI file once and check it is a finite 3D volume; return its array and the image.

    The array is in the file's stored dtype (scaled by nibabel if the header asks for it), so a
    caller that needs the voxels does not decompress the file a second time.

    Raises:
        DataError: unreadable, not 3D, or holding NaN/Inf.
    """
    path = Path(path)
    try:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels; fix or drop this case")
    return data, img


def check_volume(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI file and check it is a finite 3D volume; return the image.

    Raises:
        DataError: unreadable, not 3D, or holding NaN/Inf.
    """
    return read_volume(path)[1]


def check_arrays(image, label, affine_image, affine_label, image_path, label_path) -> None:
    """Checks shared by `check-data` and the training loader, on arrays already in memory."""
    for arr, path in ((image, image_path), (label, label_path)):
        if arr.ndim != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {tuple(arr.shape)}")
        if np.issubdtype(np.asarray(arr).dtype, np.floating) and not np.isfinite(arr).all():
            raise DataError(f"{path}: contains NaN or Inf voxels; fix or drop this case")
    if tuple(image.shape) != tuple(label.shape):
        raise DataError(f"{label_path}: shape {tuple(label.shape)} differs from its image's {tuple(image.shape)}")
    if not np.allclose(
        np.asarray(affine_image, dtype=np.float64), np.asarray(affine_label, dtype=np.float64), atol=1e-3, rtol=1e-4
    ):
        raise DataError(
            f"{label_path}: affine differs from its image's ({image_path}); resample the label onto the image grid"
        )
    values = np.unique(np.asarray(label))
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        raise DataError(f"{label_path}: label values must be 0 (background) or 1 (spleen), found {bad[:5]}")


def check_pair(image_path: str | Path, label_path: str | Path) -> None:
    """Check one labelled pair: both 3D and finite, same shape and affine, labels in {0, 1}."""
    image, img = read_volume(image_path)
    label, lab = read_volume(label_path)
    check_arrays(image, label, img.affine, lab.affine, image_path, label_path)


def check_dataset(root: str | Path) -> Dataset:
    """List and fully check a dataset. Returns it if everything is usable; raises DataError otherwise."""
    ds = list_dataset(root)
    if not ds.labelled:
        raise DataError(f"{ds.root}: no labelled cases found in imagesTr/labelsTr")
    for pair in ds.labelled:
        check_pair(pair["image"], pair["label"])
    for path in ds.test:
        check_volume(path)
    return ds


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as float32 + affine, rejecting non-3D and non-finite volumes with the file named.

    The file is decompressed once: the array the check read is the one converted and returned.
    """
    data, img = read_volume(path)
    return data.astype(np.float32, copy=False), img.affine


def write_mask(path: str | Path, mask: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(dtype, copy=False), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))

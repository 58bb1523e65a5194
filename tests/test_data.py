"""Loading sources with masks and ids: the real LGG FLAIR bundle (when present) and source specs."""

from pathlib import Path

import numpy as np
import pytest

from synomaly.data import Source, load_cases
from synomaly.errors import InputError
from synomaly.preprocess import Preprocessing


def test_source_spec_parsing():
    assert Source.parse("a/b.npz:test_masks") == Source(Path("a/b.npz"), "test_masks")
    assert Source.parse("scan.nii.gz") == Source(Path("scan.nii.gz"))
    assert Source.parse("C:/data/x.png").key is None


def test_lgg_validation_split_loads_aligned_with_patient_groups(shared_data):
    bundle = shared_data / "lgg_flair" / "lgg_flair.npz"
    cases = load_cases([f"{bundle}:val_healthy", f"{bundle}:val_anomalous"], Preprocessing(size=64),
                       ["none", f"{bundle}:val_masks"])
    assert cases.images.shape == (167 + 114, 1, 64, 64)
    assert cases.images.min() == -1 and cases.images.max() == 1
    anomalous = cases.masks.flatten(1).any(1).numpy()
    assert not anomalous[:167].any() and anomalous[167:].all()
    assert len(set(cases.group_ids)) == 9  # nine validation patients
    # Masks sit on bright FLAIR signal: the lesion is brighter than the rest of the slice on average.
    lesion = cases.images[cases.masks].mean()
    assert lesion > cases.images[167:][~cases.masks[167:]].mean()
    raw = np.load(bundle)["val_masks"]
    assert cases.masks[167:].sum() == pytest.approx(raw.sum() / 4, rel=0.15)  # 128 -> 64 px


def test_mask_count_must_match_sources(shared_data):
    bundle = shared_data / "lgg_flair" / "lgg_flair.npz"
    with pytest.raises(InputError, match="2 mask sources given for 1"):
        load_cases([f"{bundle}:val_anomalous"], Preprocessing(size=64), [f"{bundle}:val_masks", "none"])

"""The pre-alignment on a real thoracic CT pair, against ANTs' affine registration.

The two chest CTs of pyradiomics (:func:`tests.realdata.chest_ct`: different patients, different
z-coverage, origins about 400 mm apart) at 2 mm, registered as a user would
(``Registrar.register(..., fixed_modality="ct", moving_modality="ct")``) with the
identity-deformable checkpoint, so the result is the pre-alignment alone. The figure is the
Dice overlap of the lungs (:func:`tests.realdata.lung_mask`, threshold and connected
components) after the moving lungs are carried onto the fixed image (nearest neighbour). ANTs:
antspyx ``registration(type_of_transform="Affine")`` on the same two images, its defaults, a
fixed random seed. What real weights would add (the deformable part) is not shown here.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import realdata
from tests.checkpoints import write_random_checkpoint
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.volume import Volume

pytestmark = pytest.mark.slow


def _ants_affine_dice(fixed: Volume, fixed_lungs, moving: Volume, moving_lungs,
                      folder) -> float:
    ants = pytest.importorskip("ants")
    import nibabel as nib

    images = {}
    for name, volume in (("fixed", fixed), ("moving", moving),
                         ("moving_lungs", Volume(moving.grid, moving_lungs.astype(np.float32)))):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.data, volume.grid.affine), path)
        images[name] = ants.image_read(str(path))
    fit = ants.registration(images["fixed"], images["moving"], type_of_transform="Affine",
                            random_seed=1)
    carried = ants.apply_transforms(images["fixed"], images["moving_lungs"],
                                    fit["fwdtransforms"], interpolator="nearestNeighbor")
    return realdata.dice(carried.numpy() > 0.5, fixed_lungs)


def test_chest_ct_pair_lungs_overlap_at_least_as_well_as_ants_affine(tmp_path):
    fixed, moving = realdata.chest_ct(1), realdata.chest_ct(2)
    fixed_lungs, moving_lungs = realdata.lung_mask(fixed), realdata.lung_mask(moving)
    registrar = Registrar(weights=write_random_checkpoint(tmp_path / "identity.trch", seed=5,
                                                          lastconv_scale=0.0),
                          network_size=65, device="cpu")
    result = registrar.register(fixed, moving, fixed_modality="ct", moving_modality="ct",
                                io_iterations=0)
    ours = realdata.carried_dice(fixed, fixed_lungs, moving, moving_lungs, result.prealign)
    by_header = realdata.carried_dice(fixed, fixed_lungs, moving, moving_lungs, np.eye(4))
    theirs = _ants_affine_dice(fixed, fixed_lungs, moving, moving_lungs, tmp_path)
    report = result.settings["prealign_report"]
    print(f"\nlung Dice: ours {ours:.4f} (start {report['start']}, scales {report['scales']}, "
          f"shear {report['max_shear']}), ANTs affine {theirs:.4f}, headers {by_header:.4f}")
    assert by_header < 0.05  # the origins are far apart: the headers alone give nothing
    assert report["fallback"] is None and report["max_shear"] < 0.2
    assert ours >= theirs, (ours, theirs)

"""Unbiased deformable templates (:mod:`ugi_bids.engine.template`), on real brains.

The official weights cannot be used here, so the registrations run with synthetic checkpoints
(``tests/checkpoints.py``), and each test says what it proves with them and what only real
weights would show:

* the identity-deformable checkpoint (``lastconv_scale=0``): every map is the affine
  pre-alignment (plus a zero field), so the template loop is exercised end to end with real
  world-space affines of real brains: the affine average, the template frame, the covering
  grid, the averaging, the affine part of the shape update, the cache;
* the difference checkpoint: deformable, the identity for equal images and non-affine maps
  otherwise (a few mm), so the deformable shape update is exercised; its maps are not a
  registration, so nothing here shows that a real network's template is sharp.

The 2 mm template of three different brains (2009c stored LPS, FSL's MNI152 on an oblique grid,
nilearn's 2009a on a 2x2x6 mm grid) is built once (4 iterations, cached) and reused by the
unbiasedness, drift, order and resume tests.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import linalg

from tests import realdata
from tests.checkpoints import write_difference_checkpoint, write_random_checkpoint
from ugi_bids.engine.formats.itk import read_composite_h5
from ugi_bids.engine.preprocess import preprocess
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.transforms import WorldTransform, compose
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.engine.spatial.warp import apply_transform, displacement_on_grid
from ugi_bids.engine.template.affine_mean import (
    affine_mean,
    affine_summary,
    rotation_degrees,
    scale_factors,
)
from ugi_bids.engine.template.build import build_template, foreground, shape_update_map
from ugi_bids.engine.template.space import (
    average_into,
    covering_grid,
    field_of_view_corners,
)

NETWORK_SIZE = 65


def _pose(angles_deg, shift_mm) -> np.ndarray:
    """A rigid world change (4x4, RAS mm): rotation about the world origin, then a shift."""
    change = np.eye(4)
    change[:3, :3] = realdata.rotation_matrix(angles_deg)
    change[:3, 3] = shift_mm
    return change


def _axis_aligned_grid(volume: Volume, spacing) -> Grid:
    """An axis-aligned (RAS) grid of ``spacing`` mm covering ``volume``'s field of view."""
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(volume.grid.shape) * volume.grid.spacing
    shape = np.ceil(extent / spacing).astype(int)
    affine = np.diag(np.append(spacing, 1.0))
    affine[:3, 3] = volume.grid.centre() - spacing * (shape - 1) / 2
    return Grid(tuple(shape), affine)


def _brains(factor: float, count: int = 3) -> list[Volume]:
    """The first ``count`` of three different real brains at ``factor`` mm: ICBM 2009c, FSL's
    MNI152, nilearn's ICBM 2009a (masked with its GM+WM maps)."""
    loaders = [lambda: load_volume(realdata.mni2009c_brain_path()),
               lambda: load_volume(realdata.fsl_mni_brain_path()),
               realdata.nilearn_2009a_brain]
    return [realdata.downsampled(load(), factor) for load in loaders[:count]]


def _brain_points(template: Volume) -> np.ndarray:
    """World RAS mm (n, 3) of the template's foreground voxels."""
    return template.grid.world_coordinates()[foreground(template)]


def _average_displacement(forward, grid: Grid, mask: np.ndarray) -> np.ndarray:
    """Norm (mm) of ``mean_i(T_i(x)) - x`` at the voxels of ``mask``."""
    total = np.zeros(tuple(grid.shape) + (3,), dtype=np.float64)
    for transform in forward:
        total += displacement_on_grid(transform, grid)
    return np.linalg.norm(total / len(forward), axis=-1)[mask]


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def _centroid_and_volume(mask: np.ndarray, grid: Grid) -> tuple[np.ndarray, float]:
    """World RAS mm centroid and volume (mm^3) of a boolean mask."""
    centroid = grid.index_to_world(np.argwhere(mask).mean(axis=0))
    return centroid, float(mask.sum() * abs(np.linalg.det(grid.affine[:3, :3])))


@pytest.fixture(scope="module")
def identity_registrar(tmp_path_factory) -> Registrar:
    """The identity-deformable network: every map is the affine pre-alignment."""
    path = tmp_path_factory.mktemp("weights") / "identity_deformable.trch"
    return Registrar(weights=write_random_checkpoint(path, seed=5, lastconv_scale=0.0),
                     network_size=NETWORK_SIZE, device="cpu")


@pytest.fixture(scope="module")
def three_brains() -> list[Volume]:
    """Three different brains at 2 mm in three storages, each slightly repositioned (head
    motion between sessions: <= 3 degrees, <= 6 mm):

    0. the 2009c brain stored LPS;
    1. FSL's MNI152 brain resampled onto an oblique 2 mm grid;
    2. nilearn's 2009a brain on an axis-aligned 2x2x6 mm grid (the 1x1x3 mm ratio).
    """
    first, second, third = _brains(2.0)
    first = realdata.store_as(realdata.reheader(first, _pose((2.0, -1.5, 2.5), (4.0, -3.0, 5.0))),
                              "LPS")
    second = realdata.reheader(second, _pose((-1.0, 2.0, -2.0), (-3.0, 5.0, -2.0)))
    second = realdata.resample_to(second, realdata.oblique_anisotropic_grid(second,
                                                                           spacing=(2, 2, 2)))
    third = realdata.reheader(third, _pose((1.5, 1.0, -1.0), (2.0, 2.0, -4.0)))
    third = realdata.resample_to(third, _axis_aligned_grid(third, (2.0, 2.0, 6.0)))
    return [first, second, third]


@pytest.fixture(scope="module")
def built(three_brains, identity_registrar, tmp_path_factory) -> SimpleNamespace:
    """The 4-iteration template of :func:`three_brains`, its cache (``cache_dir``) and the
    folder of its cache key in there (``cache_dir/<digest>/``)."""
    cache = tmp_path_factory.mktemp("template_cache")
    result = build_template(three_brains, identity_registrar, iterations=4, cache_dir=cache)
    folders = [path for path in cache.iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return SimpleNamespace(result=result, cache=cache, folder=folders[0])


@pytest.fixture(scope="module")
def rebuilt_one(built, three_brains, identity_registrar) -> object:
    """The same inputs at ``iterations=1`` from the fixture's cache: the cache key does not
    hold the iteration count, so rounds 0 and 1 (and template 1) are read, nothing computed."""
    return build_template(three_brains, identity_registrar, iterations=1, cache_dir=built.cache)


@pytest.mark.slow
def test_template_of_three_brains_is_unbiased(built):
    """The mean over the inputs of the template -> input displacement is below 0.5 mm (RMS
    over the template's brain), and the log-Euclidean mean of the maps' affines is the identity
    within 0.5 degrees and 0.5 % scale.

    Proves (identity-deformable checkpoint): the affine side of unbiasedness on three real,
    different brains in hard storages (LPS, oblique, 1x1x3 ratio): the template frame is the
    inputs' affine average, not any input's frame, and stays there through 4 shape updates;
    and that ``history[-1]`` reports exactly these figures. Measured: RMS 0.134 mm (each input
    alone 4-8 mm away on average), 0.04 deg, 0.37 % scale. The scale is mostly the affine
    pre-alignment's bias against a smoother (averaged) template (see the two-input test), which
    the identity-deformable network cannot correct. Only real weights would show the
    deformable side (that the average non-affine displacement also vanishes, with sharp
    anatomy).
    """
    result = built.result
    assert len(result.forward) == len(result.inverse) == 3
    assert [entry["iteration"] for entry in result.history] == [0, 1, 2, 3, 4]
    assert result.history[-1]["final"]
    grid = result.template.grid
    mask = foreground(result.template)
    assert mask.sum() > 100_000  # a 2 mm brain: about 1.5 litres / 8 mm^3
    points = grid.world_coordinates()[mask]
    # the inputs are genuinely apart from the template (LPS storage and poses are in the maps)
    alone = [float(np.linalg.norm(t.map_points(points) - points, axis=-1).mean())
             for t in result.forward]
    assert min(alone) > 2.0, alone

    norms = _average_displacement(result.forward, grid, mask)
    rms = _rms(norms)
    assert rms < 0.5, (rms, alone)
    assert rms == pytest.approx(result.history[-1]["rms_displacement_mm"], rel=1e-9, abs=1e-12)
    assert float(norms.mean()) == pytest.approx(result.history[-1]["mean_displacement_mm"],
                                                rel=1e-9, abs=1e-12)

    average = affine_mean([t.affine for t in result.forward])
    summary = affine_summary(average, grid.centre())
    assert rotation_degrees(average) == summary["rotation_deg"]
    assert np.abs(scale_factors(average) - 1).max() == summary["scale_deviation"]
    assert summary["rotation_deg"] < 0.5, summary
    assert summary["scale_deviation"] < 0.005, summary
    assert summary["rotation_deg"] == pytest.approx(
        result.history[-1]["average_affine_rotation_deg"], rel=1e-9, abs=1e-12)
    assert summary["scale_deviation"] == pytest.approx(
        result.history[-1]["average_affine_scale_deviation"], rel=1e-9, abs=1e-12)
    print(f"\nunbiased: RMS {rms:.3f} mm, mean {norms.mean():.3f} mm (inputs alone "
          f"{', '.join(f'{a:.1f}' for a in alone)} mm); average affine "
          f"{summary['rotation_deg']:.3f} deg, scale {100 * summary['scale_deviation']:.2f} %, "
          f"shift {summary['translation_mm']:.3f} mm")


@pytest.mark.slow
def test_template_does_not_drift(built):
    """Over 4 iterations the template's brain mask (the same foreground rule on both) moves
    its centroid by less than 1 mm and changes its volume by less than 1 % against the affine
    average the loop started from (``result.initial``).

    Proves (identity-deformable checkpoint): repeated registration, averaging and affine
    re-centring do not walk the template away or shrink/grow it (the log-Euclidean mean does
    not shrink, and the re-centring is anchored on the inputs). Measured: 0.03 mm, 0.36 %.
    Only real weights would show that the deformable updates (which sharpen the template) do
    not drift either.
    """
    result = built.result
    assert result.initial is not None
    assert result.initial.grid.shape == result.template.grid.shape
    np.testing.assert_allclose(result.initial.grid.affine, result.template.grid.affine)
    centre_0, volume_0 = _centroid_and_volume(foreground(result.initial), result.initial.grid)
    centre_n, volume_n = _centroid_and_volume(foreground(result.template), result.template.grid)
    moved = float(np.linalg.norm(centre_n - centre_0))
    change = abs(volume_n / volume_0 - 1.0)
    assert moved < 1.0, moved
    assert change < 0.01, change
    print(f"\ndrift: centroid {moved:.3f} mm, volume {100 * change:.3f} %")


@pytest.mark.slow
def test_template_does_not_depend_on_input_order(built, rebuilt_one, three_brains,
                                                 identity_registrar):
    """A rebuild with the inputs shuffled gives a template that correlates with the first at
    >= 0.99 inside the brain, and maps within 0.5 mm (95th percentile over the brain of
    ``|T_i(x) - T'_i(x)|`` for the same input). Compared at ``iterations=1``: the unshuffled
    build reuses every registration of the fixture's cache; the shuffled one is computed (the
    input order is part of the cache key).

    Proves (identity-deformable checkpoint): no input is privileged (the provisional frame is
    chosen by content, the affine mean is symmetric), on real affines of real brains.
    Measured: correlation 1.0000, p95 0.000 mm (the same numbers up to float rounding).
    Only real weights would show the same for the deformable part of the maps.
    """
    assert [entry["reused_registrations"] for entry in rebuilt_one.history] == [3, 3]
    order = [2, 0, 1]
    shuffled = build_template([three_brains[i] for i in order], identity_registrar,
                              iterations=1, cache_dir=built.cache)
    assert [entry["reused_registrations"] for entry in shuffled.history] == [0, 0]

    grid = rebuilt_one.template.grid
    mask = foreground(rebuilt_one.template)
    other = apply_transform(shuffled.template, WorldTransform(np.eye(4)), grid, "linear")
    correlation = float(np.corrcoef(rebuilt_one.template.data[mask], other.data[mask])[0, 1])
    assert correlation >= 0.99, correlation

    points = grid.world_coordinates()[mask]
    p95 = []
    for position, i in enumerate(order):
        gap = np.linalg.norm(rebuilt_one.forward[i].map_points(points)
                             - shuffled.forward[position].map_points(points), axis=-1)
        p95.append(float(np.percentile(gap, 95)))
    assert max(p95) < 0.5, p95
    print(f"\norder: correlation {correlation:.5f}, p95 map gaps "
          f"{', '.join(f'{p:.4f}' for p in p95)} mm")


@pytest.mark.slow
def test_template_build_resumes_from_its_cache(built, rebuilt_one, three_brains,
                                               identity_registrar, tmp_path):
    """With one cached transform of round 1 deleted (in a copy of the fixture's cache), a
    rebuild reuses 3 registrations in round 0 and 2 in round 1, computes the missing one, and
    returns the maps and template of the fully cached build to float precision.

    Proves: what the cache keeps, and that a resumed run registers against exactly the
    template the first run used (the templates' grid is the float32 header a NIfTI file
    stores). Measured: affines equal to 4e-15 mm, fields and templates bit-identical. The
    weights do not matter here (any deterministic network).
    """
    cache = tmp_path / "cache"
    shutil.copytree(built.folder, cache / built.folder.name)
    # iter-01_input-0001_forward.h5, or with the instance-optimisation steps in the name
    deleted = sorted(cache.glob("*/iter-01_*input-0001_forward.h5"))
    assert len(deleted) == 1, deleted
    deleted[0].unlink()
    resumed = build_template(three_brains, identity_registrar, iterations=1, cache_dir=cache)
    assert [entry["reused_registrations"] for entry in resumed.history] == [3, 2]
    assert deleted[0].exists()  # the recomputed round is cached again
    np.testing.assert_array_equal(resumed.template.data, rebuilt_one.template.data)
    for mine, cached in zip(resumed.forward + resumed.inverse,
                            rebuilt_one.forward + rebuilt_one.inverse):
        np.testing.assert_allclose(mine.affine, cached.affine, rtol=0, atol=1e-9)
        np.testing.assert_allclose(mine.field.vectors, cached.field.vectors, rtol=0, atol=1e-6)
        np.testing.assert_allclose(mine.field.grid.affine, cached.field.grid.affine, atol=1e-9)


@pytest.fixture(scope="module")
def deformable(tmp_path_factory) -> SimpleNamespace:
    """Three brains at 3 mm (slightly repositioned), templates of the difference checkpoint
    (deformable) with ``gradient_step`` 0.25 and 0, one iteration each."""
    path = tmp_path_factory.mktemp("weights") / "difference.trch"
    registrar = Registrar(weights=write_difference_checkpoint(path, seed=1, lastconv_scale=2.0),
                          network_size=NETWORK_SIZE, device="cpu")
    poses = [((2.0, -1.5, 2.5), (4.0, -3.0, 5.0)), ((-1.0, 2.0, -2.0), (-3.0, 5.0, -2.0)),
             ((1.5, 1.0, -1.0), (2.0, 2.0, -4.0))]
    images = [realdata.reheader(v, _pose(*p)) for v, p in zip(_brains(3.0), poses)]
    cache = tmp_path_factory.mktemp("deformable_cache")
    stepped = build_template(images, registrar, iterations=1, gradient_step=0.25, cache_dir=cache)
    unstepped = build_template(images, registrar, iterations=1, gradient_step=0.0)
    return SimpleNamespace(stepped=stepped, unstepped=unstepped, cache=cache)


@pytest.mark.slow
def test_deformable_shape_update_changes_the_template(deformable):
    """With a deformable network the maps are not affine (field displacement above 1 mm) and
    the shape update (``gradient_step=0.25``) makes a measurable difference against the affine
    re-centring alone (``gradient_step=0``): the two templates differ by more than 0.03 in max
    abs intensity (templates normalised to about 0..1).

    Proves (difference checkpoint): the deformable path of the loop runs (fields on the
    template's lattice, averaged, composed four times, resampled). Measured: fields up to
    1.6-2.5 mm (1.3-2.0 mm non-affine over the brain); templates differ by at most 0.088 (mean
    0.004 over the brain); the round 0 templates are identical. Only real weights would show
    that the update sharpens the template towards the inputs' mean shape.
    """
    stepped, unstepped = deformable.stepped, deformable.unstepped
    np.testing.assert_array_equal(stepped.initial.data, unstepped.initial.data)
    largest = [float(np.linalg.norm(t.field.vectors, axis=-1).max()) for t in stepped.forward]
    assert min(largest) > 1.0, largest
    points = _brain_points(stepped.template)
    non_affine = [float(np.linalg.norm(t.map_points(points) - (points @ t.affine[:3, :3].T
                                                               + t.affine[:3, 3]),
                                       axis=-1).max()) for t in stepped.forward]
    assert min(non_affine) > 1.0, non_affine
    assert stepped.template.grid.shape == unstepped.template.grid.shape
    difference = np.abs(stepped.template.data - unstepped.template.data)
    assert float(difference.max()) > 0.03, float(difference.max())
    print(f"\ndeformable: largest field {', '.join(f'{v:.2f}' for v in largest)} mm; "
          f"non-affine at the brain {', '.join(f'{v:.2f}' for v in non_affine)} mm; templates "
          f"differ by {difference.max():.4f} at most, "
          f"{difference[foreground(stepped.template)].mean():.4f} on average over the brain")


@pytest.mark.slow
def test_shape_update_inverts_the_average_map(deformable):
    """The defining property of the shape update: with ``P`` its pull map
    (:func:`shape_update_map` of round 0's maps), the maps composed with it average to about
    the identity: ``mean_i T_i(P(y)) - y`` is below 30 % of ``mean_i T_i(y) - y`` (RMS over the
    brain); and the average non-affine part of the maps, ``mean_i (T_i(x) - A_i x)``, is
    cancelled to below 15 % of what it was.

    Proves (difference checkpoint, non-affine maps): ``P`` approximates the inverse of the
    average map ``Abar (x + dbar(x))`` (four compositions of ``-0.25 dbar`` after ``Abar^-1``),
    so the updated template sits at the mean of the inputs. Measured: 0.289 mm before, 0.073 mm
    after (25 %); the non-affine part 0.149 mm before, 0.010 mm after (6 %). What remains is
    the affine parts' own floor (0.073 mm: the maps' affines alone, centred by ``Abar^-1``):
    the point average of poses 1.5-3.6 degrees apart differs from their log-Euclidean mean at
    second order, a residual no update of this form removes. With real weights the same
    property is what makes the template unbiased (these maps are no registration).
    """
    folder = next(path for path in deformable.cache.iterdir() if path.is_dir())
    template = load_volume(folder / "iter-00_template.nii.gz")
    forward = [read_composite_h5(next(folder.glob(f"iter-00_*input-{i:04d}_forward.h5")))
               for i in range(3)]
    points = _brain_points(template)
    update = shape_update_map(forward, 0.25)
    recentre = np.linalg.inv(affine_mean([t.affine for t in forward]))
    updated_points = update.map_points(points)
    recentred_points = points @ recentre[:3, :3].T + recentre[:3, 3]

    def average_gap(maps) -> float:
        mean = np.mean([t.map_points(points) for t in maps], axis=0)
        return _rms(np.linalg.norm(mean - points, axis=-1))

    def non_affine(at, affine_at) -> float:
        """RMS norm of ``mean_i (T_i(at) - A_i affine_at)``: the maps' average field part."""
        mean = np.mean([t.map_points(at) - WorldTransform(t.affine).map_points(affine_at)
                        for t in forward], axis=0)
        return _rms(np.linalg.norm(mean, axis=-1))

    before = average_gap(forward)
    after = average_gap([compose(update, t) for t in forward])
    floor = average_gap([compose(WorldTransform(recentre), WorldTransform(t.affine))
                         for t in forward])
    field_before = non_affine(points, points)
    field_after = non_affine(updated_points, recentred_points)
    print(f"\nshape update: average map RMS {before:.3f} mm before, {after:.3f} mm after "
          f"({100 * after / before:.0f} %; affine floor {floor:.3f} mm); non-affine part "
          f"{field_before:.3f} mm before, {field_after:.4f} mm after "
          f"({100 * field_after / field_before:.0f} %)")
    assert field_before > 0.05, field_before  # the round-0 maps' fields do not average out
    assert after < 0.3 * before, (after, before)
    assert field_after < 0.15 * field_before, (field_after, field_before)


@pytest.mark.slow
def test_two_inputs_give_the_symmetric_midpoint(identity_registrar):
    """Two different brains placed 8 mm and 4 degrees apart (each 4 mm and 2 degrees off,
    one stored LPS): the template is their midpoint, ``logm(A_1) + logm(A_2) ~ 0`` for the
    affines of the two forward maps: ``expm((logm A_1 + logm A_2) / 2)`` is the identity within
    0.5 degrees, 0.5 % scale and 0.5 mm at the template's centre (criterion 1's bounds), while
    each map is far from the identity (about 2 degrees and 4 mm).

    Proves (identity-deformable checkpoint, real affines of two real brains): the template
    frame is the symmetric log-Euclidean midpoint; no input is the reference. Measured at 2 mm:
    0.03 deg, 0.28 % scale, 0.04 mm. At 3 mm the scale is 1.0 % off, the same for one brain
    placed twice (a control, so no asymmetry): the affine pre-alignment of a sharp input to
    the smoother average template over-estimates the input's size (measured 1.2 % for a 3 mm
    brain against itself blurred by one voxel, 0.5 % by half a voxel); hence 2 mm here, which
    costs no more time. Real weights would add the deformable midpoint (and absorb that bias
    in the fields).
    """
    first, second = _brains(2.0, count=2)
    images = [realdata.reheader(first, _pose((0.0, 0.0, 2.0), (4.0, 0.0, 0.0))),
              realdata.store_as(realdata.reheader(second, _pose((0.0, 0.0, -2.0),
                                                                (-4.0, 0.0, 0.0))), "LPS")]
    result = build_template(images, identity_registrar, iterations=1)
    centre = result.template.grid.centre()
    logs = [np.real(linalg.logm(t.affine)) for t in result.forward]
    midpoint = affine_summary(linalg.expm((logs[0] + logs[1]) / 2), centre)
    each = [affine_summary(t.affine, centre) for t in result.forward]
    print(f"\nmidpoint: expm((logm A1 + logm A2) / 2) {midpoint['rotation_deg']:.4f} deg, "
          f"scale {100 * midpoint['scale_deviation']:.3f} %, {midpoint['translation_mm']:.3f} mm; "
          "each map " + "; ".join(f"{s['rotation_deg']:.2f} deg, {s['translation_mm']:.2f} mm"
                                  for s in each))
    for summary in each:
        assert summary["rotation_deg"] > 1.5 and summary["translation_mm"] > 3.0, each
    assert midpoint["rotation_deg"] < 0.5, midpoint
    assert midpoint["scale_deviation"] < 0.005, midpoint
    assert midpoint["translation_mm"] < 0.5, midpoint


# ---- fast units (no registration) ---------------------------------------------------------


def _rotation_about(angles_deg, centre) -> np.ndarray:
    rotation = np.eye(4)
    rotation[:3, :3] = realdata.rotation_matrix(angles_deg)
    rotation[:3, 3] = centre - rotation[:3, :3] @ centre
    return rotation


def test_affine_mean_of_opposite_rotations_is_the_identity():
    """Rotations by +/-20 degrees about a centre 400 mm from the origin average to the
    identity (translation included), unlike the arithmetic mean of the matrices, which shrinks
    (determinant cos^2(20 deg) = 0.88 for a rotation about one axis)."""
    centre = np.array([250.0, -180.0, 260.0])
    plus, minus = _rotation_about((0, 0, 20), centre), _rotation_about((0, 0, -20), centre)
    np.testing.assert_allclose(affine_mean([plus, minus]), np.eye(4), atol=1e-9)
    turn = _rotation_about((15, -10, 20), centre)  # about an oblique axis
    tilted = [turn, np.linalg.inv(turn)]
    mean = affine_mean(tilted)
    assert rotation_degrees(mean) < 1e-6
    assert np.abs(scale_factors(mean) - 1).max() < 1e-9
    np.testing.assert_allclose(mean, np.eye(4), atol=1e-8)
    arithmetic = (plus + minus) / 2
    assert np.linalg.det(arithmetic[:3, :3]) == pytest.approx(np.cos(np.radians(20)) ** 2)
    assert affine_summary(plus, centre)["translation_mm"] < 1e-9
    assert affine_summary(plus)["translation_mm"] > 100


def test_affine_mean_commutes_with_a_change_of_world_frame():
    """``affine_mean([C A_i C^-1]) = C affine_mean([A_i]) C^-1``: the mean does not depend on
    where the world origin is or how the world axes are oriented; and the mean of one affine
    is that affine."""
    rng = np.random.default_rng(7)

    def random_affine(rotation_deg, scale, shift):
        a = np.eye(4)
        a[:3, :3] = realdata.rotation_matrix(rng.uniform(-rotation_deg, rotation_deg, 3)) @ \
            np.diag(rng.uniform(1 - scale, 1 + scale, 3))
        a[:3, 3] = rng.uniform(-shift, shift, 3)
        return a

    affines = [random_affine(10, 0.1, 20) for _ in range(4)]
    change = random_affine(40, 0.3, 300)
    mean = affine_mean(affines)
    conjugated = affine_mean([change @ a @ np.linalg.inv(change) for a in affines])
    np.testing.assert_allclose(conjugated, change @ mean @ np.linalg.inv(change), atol=1e-8)
    # recentred on the mean, the logs average to zero
    logs = [np.real(linalg.logm(a @ np.linalg.inv(mean))) for a in affines]
    assert np.abs(np.mean(logs, axis=0)).max() < 1e-8
    np.testing.assert_allclose(affine_mean(affines[:1]), affines[0], atol=1e-10)
    with pytest.raises(ValueError):
        affine_mean([np.diag([-1.0, 1.0, 1.0, 1.0])])
    with pytest.raises(ValueError):
        affine_mean([])


def test_single_input_is_its_own_template():
    """One input: the template is that image normalised, with identity maps; nothing is
    registered (the registrar is not used, so ``None`` will do)."""
    volume = realdata.store_as(realdata.downsampled(load_volume(realdata.mni2009c_brain_path()),
                                                    4.0), "LPS")
    result = build_template([volume], None, iterations=3)
    expected = preprocess(volume, "mri", None, False, "template input 0")
    np.testing.assert_array_equal(result.template.data, expected.data)
    np.testing.assert_array_equal(result.template.grid.affine, volume.grid.affine)
    assert result.initial is result.template
    assert result.history == []
    for transform in result.forward + result.inverse:
        np.testing.assert_array_equal(transform.affine, np.eye(4))
        assert transform.field is None


def test_covering_grid_covers_every_input():
    """An isotropic axis-aligned grid that holds every input's field-of-view corners (LPS,
    oblique 1x1x3, far-apart origins) in template world space, through each input's map."""
    base = Grid((60, 72, 60), np.diag([2.0, 2.0, 2.0, 1.0]) @ np.array(
        [[1, 0, 0, -30.0], [0, 1, 0, -36.0], [0, 0, 1, -30.0], [0, 0, 0, 1]]))
    lps = Grid(base.shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ base.affine)
    volume = Volume(base, np.zeros(base.shape, dtype=np.float32))
    oblique = realdata.oblique_anisotropic_grid(volume, spacing=(1.0, 1.0, 3.0))
    far = Grid((40, 50, 30), _pose((0, 0, 0), (330.0, -220.0, 75.0)) @ base.affine)
    grids = [base, lps, oblique, far]
    maps = [np.eye(4), _pose((3.0, 0.0, -2.0), (5.0, -4.0, 2.0)), _pose((0.0, 8.0, 0.0), (0, 0, 0)),
            _pose((0.0, 0.0, 10.0), (330.0, -220.0, 75.0))]
    grid = covering_grid(grids, maps, 1.5)
    np.testing.assert_allclose(grid.spacing, 1.5)
    np.testing.assert_allclose(grid.direction, np.eye(3), atol=1e-12)
    lattice_low, lattice_high = -0.5 - 1e-6, np.asarray(grid.shape) - 0.5 + 1e-6
    for g, a in zip(grids, maps):
        corners = np.linalg.inv(a)[:3, :3] @ field_of_view_corners(g).T
        corners = corners.T + np.linalg.inv(a)[:3, 3]
        index = grid.world_to_index(corners)
        assert np.all(index >= lattice_low) and np.all(index <= lattice_high), index
    # tight: the union's box spans the grid to within one voxel on every axis
    every = np.concatenate([grid.world_to_index(
        field_of_view_corners(g) @ np.linalg.inv(a)[:3, :3].T + np.linalg.inv(a)[:3, 3])
        for g, a in zip(grids, maps)])
    span = every.max(axis=0) - every.min(axis=0)
    assert np.all(np.asarray(grid.shape) - span < 1.0 + 1e-6), (grid.shape, span)
    with pytest.raises(ValueError):
        covering_grid(grids, maps, 0.0)


def test_average_into_counts_coverage():
    """Mean and median over the inputs covering each voxel: a voxel covered by one input takes
    that input's value, by none zero; the count says how many inputs cover it."""
    grid = Grid((10, 4, 4), np.eye(4))
    left = Volume(Grid((6, 4, 4), np.eye(4)), np.full((6, 4, 4), 1.0, dtype=np.float32))
    right = Volume(Grid((4, 4, 4), _pose((0, 0, 0), (4.0, 0.0, 0.0))),
                   np.full((4, 4, 4), 3.0, dtype=np.float32))
    middle = Volume(Grid((2, 4, 4), _pose((0, 0, 0), (4.0, 0.0, 0.0))),
                    np.full((2, 4, 4), 8.0, dtype=np.float32))
    identity = WorldTransform(np.eye(4))
    # left covers x in [-0.5, 5.5), right [3.5, 7.5), middle [3.5, 5.5): voxels 0-3 left only,
    # 4-5 all three, 6-7 right only, 8-9 nobody
    mean, count = average_into(grid, [(left, identity), (right, identity), (middle, identity)])
    median, count_median = average_into(grid, [(left, identity), (right, identity),
                                               (middle, identity)], "median")
    np.testing.assert_array_equal(count[:, 0, 0], [1, 1, 1, 1, 3, 3, 1, 1, 0, 0])
    np.testing.assert_array_equal(count_median, count)
    np.testing.assert_allclose(mean.data[:, 0, 0], [1, 1, 1, 1, 4, 4, 3, 3, 0, 0])
    np.testing.assert_allclose(median.data[:, 0, 0], [1, 1, 1, 1, 3, 3, 3, 3, 0, 0])
    assert mean.data.dtype == np.float32 and count.dtype == np.int16
    assert mean.grid is grid
    # through a map: the pull map template -> input shifts where each input lands
    shifted, shifted_count = average_into(grid, [(left, WorldTransform(
        _pose((0, 0, 0), (-2.0, 0.0, 0.0))))])
    np.testing.assert_array_equal(shifted_count[:, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(shifted.data[:, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError):
        average_into(grid, [(left, identity)], "mode")

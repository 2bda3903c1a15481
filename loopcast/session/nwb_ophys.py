"""The imaging part of the NWB export (`nwb`): the rig, the recorded neurons as ROIs and the loop's dF/F.

Neuron i of the recording is label i + 1 of the segmentation (0 = background; realtime/preprocess/traces.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hdmf.backends.hdf5 import H5DataIO  # type: ignore[import-untyped]
from hdmf.common import (  # type: ignore[import-untyped]
    DynamicTable,
    VectorData,
    VectorIndex,
)
from pynwb import NWBFile, TimeSeries  # type: ignore[import-untyped]
from pynwb.ophys import (  # type: ignore[import-untyped]
    DfOverF,
    ImageSegmentation,
    ImagingPlane,
    OpticalChannel,
    PlaneSegmentation,
)

from loopcast.session.data import SessionData

VOXEL_DTYPE = np.dtype([("x", "<u4"), ("y", "<u4"), ("z", "<u4"), ("weight", "<f4")])   # NWB voxel_mask
NEURON_DOC = "0-based neuron index of the recording (segmentation label - 1)"


def voxel_masks(segmentation: np.ndarray, neurons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, ends): the labelled voxels of each recorded neuron (label = neuron + 1), grouped in the order of
    `neurons` as NWB voxel_mask rows (x, y, z, weight 1.0); ROI k owns voxels[ends[k-1]:ends[k]]."""
    seg = np.asarray(segmentation)
    if seg.ndim != 3 or seg.dtype.kind not in "ui":
        raise ValueError(f"segmentation must be a 3-D integer label volume, got {seg.shape} {seg.dtype}")
    n_labels = int(seg.max()) if seg.size else 0
    if seg.size and int(seg.min()) < 0:
        raise ValueError("segmentation has negative labels")
    neurons = np.asarray(neurons, dtype=np.int64)
    bad = neurons[(neurons < 0) | (neurons >= n_labels)]
    if bad.size:
        raise ValueError(f"recorded neurons {bad[:5].tolist()} have no label in the segmentation "
                         f"(labels 1..{n_labels})")
    if np.unique(neurons).size != neurons.size:
        raise ValueError("the recorded neurons repeat an index")
    row_of = np.full(n_labels + 1, -1, np.int64)
    row_of[neurons + 1] = np.arange(neurons.size)
    flat = seg.reshape(-1)
    fg = np.flatnonzero(flat)
    rows = row_of[flat[fg]]
    keep = rows >= 0
    order = np.argsort(rows[keep], kind="stable")
    fg, rows = fg[keep][order], rows[keep][order]
    counts = np.bincount(rows, minlength=neurons.size)
    if (counts == 0).any():
        raise ValueError(f"recorded neurons {neurons[counts == 0][:5].tolist()} have no voxels in the segmentation")
    voxels = np.empty(fg.size, VOXEL_DTYPE)
    for axis, coords in zip("xyz", np.unravel_index(fg, seg.shape)):
        voxels[axis] = coords
    voxels["weight"] = 1.0
    return voxels, np.cumsum(counts).astype(np.int64)


def _imaging_plane(nwbfile: NWBFile, data: SessionData) -> ImagingPlane:
    rig = data.config.get("rig", {})
    name = str(data.attrs.get("rig") or rig.get("name") or "rig")
    device = nwbfile.create_device(name=name, description=f"light-sheet microscope of loopcast rig {name!r}")
    channel = OpticalChannel(name="fluorescence", description="calcium indicator fluorescence (wavelength not "
                             "recorded by loopcast: NaN)", emission_lambda=float("nan"))
    period = data.frame_period_s
    return nwbfile.create_imaging_plane(
        name="volume", optical_channel=channel, device=device, excitation_lambda=float("nan"),
        imaging_rate=1.0 / period if period > 0 else float("nan"), indicator="unknown (not recorded by loopcast)",
        location="whole brain", description=f"the imaged volume: {rig.get('shape', 'unknown')} voxels (x, y, z), "
        f"{rig.get('dtype', '')}, one volume every {period} s")


def _roi_table(data: SessionData, plane: ImagingPlane, segmentation: np.ndarray | None) -> DynamicTable:
    neurons = VectorData(name="neuron", description=NEURON_DOC, data=data.neurons.astype(np.int64))
    if segmentation is None:
        return DynamicTable(name="neurons", columns=[neurons], description="The recorded neurons (no segmentation "
                            "was given to the export, so no masks): row k = neuron `neuron[k]`.")
    voxels, ends = voxel_masks(segmentation, data.neurons)
    mask = VectorData(name="voxel_mask", description="voxels of each neuron (x, y, z; weight 1)",
                      data=H5DataIO(data=voxels, compression="gzip", compression_opts=4))
    # hdmf converts a compound dataset row by row in Python (~1 us a voxel: ~10 s for ZAPBench's 8.1 M), and
    # that conversion cannot take a chunk iterator, hence a plain array here and no progress bar.
    return PlaneSegmentation(name="neurons", imaging_plane=plane,
                             columns=[neurons, mask, VectorIndex(name="voxel_mask_index", data=ends, target=mask)],
                             description="The recorded neurons: row k = neuron `neuron[k]`, whose voxels are the "
                             "segmentation's label neuron + 1.")


def add_ophys(nwbfile: NWBFile, data: SessionData, segmentation: np.ndarray | None,
              compress: Callable[[np.ndarray, str], Any]) -> None:
    """/processing/ophys: the ROIs of the recorded neurons and, when recorded, the dF/F over them."""
    if data.neurons.size == 0:
        return
    module = nwbfile.create_processing_module("ophys", "The recorded neurons and the dF/F the loop computed.")
    table = _roi_table(data, _imaging_plane(nwbfile, data), segmentation)
    if isinstance(table, PlaneSegmentation):
        module.add(ImageSegmentation(plane_segmentations=[table]))
    else:
        module.add(table)
    dff = data.dff
    if dff is None or len(dff.seq) == 0:
        return
    container = DfOverF()
    module.add(container)
    series = container.create_roi_response_series(
        name="dff", data=compress(dff.data, "dff"), unit="n.a.", timestamps=data.seconds(dff.t_src_ns),
        rois=table.create_region(name="rois", region=list(range(data.neurons.size)),
                                 description="all recorded neurons"),
        description="the causal dF/F the loop computed (dimensionless), (frame, neuron); rows are every "
        f"{data.attrs.get('frame_every', 1)}-th valid frame, at its source time")
    module.add(TimeSeries(name="dff_frame_seq", data=dff.seq.astype(np.int64), unit="frame", timestamps=series,
                          description="frame seq of each dF/F row"))

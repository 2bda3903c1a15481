"""Trace extraction on a torch device (CUDA on GPU machines): the same CSR index as `realtime.preprocess.traces`.

The volume is copied to the device as it arrives (uint16 travels as int16 bits and is widened there),
the labelled voxels are gathered and summed per neuron with `index_add_`. Results equal the CPU path
to float32 rounding. Only this module (and the other *_torch modules) import torch in `realtime/`.
"""
from __future__ import annotations

import numpy as np
import torch

from loopcast.realtime.preprocess.traces import TraceExtractor, TraceStats
from loopcast.realtime.wire.codec import Order, volume_order


class TorchTraceExtractor:
    """Per-neuron means of each volume on `device`; built from (and validated by) a TraceExtractor."""

    def __init__(self, segmentation: np.ndarray, device: str = "cpu") -> None:
        base = self.base = TraceExtractor(segmentation)   # its CSR index; the registered read's too
        self.shape, self.n_neurons, self.device = base.shape, base.n_neurons, torch.device(device)
        counts = np.diff(base.offsets)
        labels = np.repeat(np.arange(self.n_neurons), counts)            # neuron of each CSR entry
        self._labels = torch.from_numpy(labels).to(self.device)
        orders: tuple[Order, ...] = ("C", "F")
        self._idx = {o: torch.from_numpy(base.indices(o).astype(np.int64)).to(self.device) for o in orders}
        self._inv = torch.from_numpy(1.0 / counts.astype(np.float32)).to(self.device)

    def warm_up(self, dtype: str) -> None:
        """Extract traces once from a synthetic volume of `dtype` in each memory order, on the device (its
        lazy set-up: a CUDA context, its kernels). Stateless."""
        for order in ("F", "C"):
            self.process_with_stats(np.zeros(self.shape, dtype, order=order))

    def to_device(self, volume: np.ndarray) -> tuple[torch.Tensor, Order, np.dtype]:
        """volume (x, y, z) numpy (C or F order) -> (its flat values on the device, order, dtype): uint16
        travels as int16 bits and is widened to int32 there."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {tuple(volume.shape)} != segmentation shape {self.shape}")
        order = volume_order(volume)
        flat = volume.reshape(-1, order=order)
        unsigned16 = flat.dtype == np.uint16
        dev = torch.from_numpy(flat.view(np.int16) if unsigned16 else flat).to(self.device, non_blocking=True)
        if unsigned16:
            dev = dev.to(torch.int32) & 0xFFFF                               # widen back to 0..65535
        return dev, order, flat.dtype

    def process_with_stats(self, volume: np.ndarray | tuple[torch.Tensor, Order, np.dtype]
                           ) -> tuple[torch.Tensor, TraceStats]:
        """volume (x, y, z) numpy (C or F order), or what `to_device` made of it -> ((N,) float32 on device,
        saturation counts)."""
        dev, order, dtype = self.to_device(volume) if isinstance(volume, np.ndarray) else volume
        values = dev[self._idx[order]]                                       # (V_fg,) gathered
        stats = self._saturation(values, dtype)
        sums = torch.zeros(self.n_neurons, dtype=torch.float32, device=self.device)
        sums.index_add_(0, self._labels, values.to(torch.float32))
        return sums * self._inv, stats

    def _saturation(self, values: torch.Tensor, dtype: np.dtype) -> TraceStats:
        if dtype.kind not in "ui":
            return TraceStats(0, 0)
        return count_saturated(values >= int(np.iinfo(dtype).max), self._labels, self.n_neurons)


def count_saturated(hit: torch.Tensor, labels: torch.Tensor, n_neurons: int) -> TraceStats:
    """TraceStats of per-sample saturation flags `hit` (V,) whose neurons are `labels` (V,)."""
    n_vox = int(hit.sum())
    if not n_vox:
        return TraceStats(0, 0)
    per_neuron = torch.zeros(n_neurons, dtype=torch.int32, device=hit.device)
    per_neuron.index_add_(0, labels, hit.to(torch.int32))
    return TraceStats(n_vox, int((per_neuron > 0).sum()))

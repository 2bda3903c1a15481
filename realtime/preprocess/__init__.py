"""Online preprocessing of each volume as it arrives: segmentation labels to per-neuron traces, the causal
running-percentile dF/F (numba kernels, with torch twins for GPU rigs), the downsampled voxel dF/F the video forecaster
reads, and the stage that runs them in order. Spike inference lives beside it in realtime.spikes."""

"""Recordings and sources: stores in the ZAPBench layout (local zarr v3 or remote through TensorStore), the synthetic
fish that a simulated rig runs, writers of synthetic recordings, and the players that publish volumes on the wire as a
microscope would."""
